"""Exercises of tutorial 07 (GPU): a softmax for any backend, and logits back on the host."""

from __future__ import annotations

import copy

import numpy as np

from .. import backend as bk
from ..tensor import Tensor, no_grad
from .finetune import tiny_gpt
from .harness import Wrong, call, compare, exercise, register, rng

__all__ = ["check_softmax_any_backend", "check_host_logits"]

register(
    "07.1", "a softmax for any backend", "check_softmax_any_backend",
    paper="(implementation) one code for NumPy and CuPy",
    hints=("ask the array for its module (xp = ml.backend.get_array_module(a)) and use xp's functions or the "
           "array's own methods, never np; exp(1000) overflows, so shift each row first (softmax does not change "
           "when you subtract the same number from a whole row).",
           "xp = get_array_module(a); e = xp.exp(a − a.max(axis=−1, keepdims=True)); return e / e.sum(axis=−1, "
           "keepdims=True)."),
    solution='''
    def solution_softmax(a):
        xp = ml.backend.get_array_module(a)               # numpy or cupy: whichever holds a
        e = xp.exp(a - a.max(axis=-1, keepdims=True))     # the largest logit becomes 0: no overflow
        return e / e.sum(axis=-1, keepdims=True)
    ''')

register(
    "07.2", "logits back on the host", "check_host_logits",
    paper="(implementation) results back on the host",
    hints=("run the model without recording a graph, and convert its output, a Tensor on the model's backend, "
           "into a host NumPy array with the backend module's helper.",
           "with ml.no_grad(): return ml.backend.to_numpy(model(idx))  (to_numpy copies from the GPU when needed)."),
    solution='''
    def solution_host_logits(model, idx):
        with ml.no_grad():                                # no graph: nothing will call backward
            return ml.backend.to_numpy(model(idx))        # a Tensor on any backend -> host NumPy
    ''')


def _backends():
    """NumPy, strict (CuPy's rules without a GPU: an np.exp on a device array fails there) and CuPy where present."""
    return ["numpy", "strict", "cupy"] if bk.cupy_available() else ["numpy", "strict"]


@exercise("07.1")
def check_softmax_any_backend(fn) -> str:
    """fn(a) -> softmax of a raw array over its last axis, on the array's own backend and dtype.

    Tried on NumPy and strict float32 and float64 arrays (and CuPy ones where a GPU is present), with
    logits as large as 1000 (a stable softmax subtracts the row maximum first).
    """
    host = rng(0).standard_normal((3, 6)) * 3
    host[1] += 1000.0  # exp(1000) overflows: only a stable softmax survives
    expected = np.exp(host - host.max(axis=-1, keepdims=True))
    expected /= expected.sum(axis=-1, keepdims=True)
    for backend in _backends():
        for dtype in ("float32", "float64"):
            a = bk.asarray(host, dtype=dtype, backend=backend)
            got = call(fn, {"a": a})
            if got is None:
                raise Wrong("your function returned None; did you forget `return`?", with_hints=False)
            if bk.backend_of(got) != backend or not hasattr(got, "dtype"):
                raise Wrong(
                    f"for a {backend} array you returned a {type(got).__module__}.{type(got).__name__}; "
                    "use xp = ml.backend.get_array_module(a) and xp.exp / xp.max, so a CuPy input stays on the GPU")
            if got.dtype != np.dtype(dtype):
                raise Wrong(
                    f"a {dtype} input came back as {got.dtype}: a NumPy float64 scalar (np.float64(...)) "
                    "upcasts float32 arrays; Python floats and the array's own methods keep the dtype")
            tol = 1e-5 if dtype == "float32" else 1e-12
            result = np.asarray(bk.to_numpy(got), dtype=np.float64)
            if not np.all(np.isfinite(result)):
                raise Wrong(f"softmax of a {backend} {dtype} array: your result has NaN or inf entries — row 1 holds "
                            "logits near 1000, and exp(1000) overflows; shift each row by its max first")
            compare(result, expected, f"softmax of a {backend} {dtype} array", rtol=tol, atol=tol)
    where = ", strict and CuPy" if "cupy" in _backends() else " and strict (no GPU here: CuPy is checked where one is present)"
    return f"stable, dtype-preserving, on NumPy{where}"


@exercise("07.2")
def check_host_logits(fn) -> str:
    """fn(model, idx) -> the model's logits for token ids ``idx`` as a host NumPy array.

    Tried with a NumPy model, a strict copy (and a CuPy copy where a GPU is present); compared with model(idx).
    """
    model = tiny_gpt("float32")
    model.eval()
    idx = rng(0).integers(0, 20, size=(2, 5))
    with no_grad():
        expected = bk.to_numpy(model(idx).data)
    for backend in _backends():
        m = model if backend == "numpy" else copy.deepcopy(model).to(backend=backend)
        got = call(fn, {"model": m, "idx": idx.copy()})
        if not isinstance(got, np.ndarray):
            what = "a minilora Tensor" if isinstance(got, Tensor) else f"a {type(got).__module__}.{type(got).__name__}"
            raise Wrong(f"on the {backend} backend you returned {what}; return a NumPy array on the host: "
                        "use ml.backend.to_numpy(...) (it copies from the GPU when needed)")
        compare(got.astype(np.float64), expected.astype(np.float64), f"logits on {backend}", rtol=1e-4, atol=1e-5)
    return "a host NumPy array equal to model(idx)" + ("" if "cupy" in _backends() else " (NumPy and strict: no GPU here)")
