"""Check functions for tutorial 09, "after the paper" (DoRA, PiSSA, LoRA+, NF4).

    from minilora.exercises_variants import check_dora_dm, check_pissa_init, check_nf4_bytes

Each check behaves like those of ``minilora.exercises``: ✓ and True for a right answer,
``ExerciseError`` with a hint for a wrong one, and a reminder (False) while your function still
raises ``NotImplementedError``.

    tutorial                checks
    09_after_the_paper      check_dora_dm, check_pissa_init, check_nf4_bytes
"""

from __future__ import annotations

import functools

import numpy as np

from . import backend as bk
from .exercises import ExerciseError
from .lora.function import dora_linear
from .quant import quantize_nf4
from .tensor import tensor

__all__ = ["check_dora_dm", "check_nf4_bytes", "check_pissa_init"]


class _NotYet(Exception):
    pass


def _exercise(title: str):
    def wrap(check):
        @functools.wraps(check)
        def run(*args, **kwargs):
            try:
                message = check(*args, **kwargs)
            except _NotYet:
                print(f"… {title}: not attempted yet (your function raises NotImplementedError). "
                      "Fill it in and run this cell again.")
                return False
            print(f"✓ {title}: {message}")
            return True

        return run

    return wrap


def _call(fn, *args):
    if not callable(fn):
        raise ExerciseError(f"expected a function, got {type(fn).__name__}")
    try:
        return fn(*args)
    except NotImplementedError:
        raise _NotYet() from None
    except ExerciseError:
        raise
    except Exception as exc:  # a crash in the student's code: say where it came from
        shapes = ", ".join(str(tuple(a.shape)) if hasattr(a, "shape") else type(a).__name__ for a in args)
        raise ExerciseError(f"your function raised {type(exc).__name__}: {exc}. Hint: it was called with "
                            f"({shapes}); (n, m) @ (m, p) gives (n, p).") from exc


def _as_array(value, what, shape):
    if value is None:
        raise ExerciseError(f"{what}: your function returned None; did you forget `return`?")
    a = np.asarray(bk.to_numpy(getattr(value, "data", value)), dtype=np.float64)
    if a.shape != tuple(shape):
        raise ExerciseError(f"{what}: your result has shape {a.shape}, expected {tuple(shape)}")
    if not np.all(np.isfinite(a)):
        raise ExerciseError(f"{what}: your result has NaN or inf entries")
    return a


def _dora_problem(seed, n=5, k=6, d=4, r=2):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d, k))
    return (rng.standard_normal((n, k)), W, rng.standard_normal((r, k)), rng.standard_normal((d, r)) * 0.3,
            np.linalg.norm(W, axis=1) * rng.uniform(0.7, 1.3, d), rng.standard_normal((n, d)))


@_exercise("DoRA's ∂L/∂m")
def check_dora_dm(fn) -> str:
    """fn(x, W, A, B, m, grad_h, s) -> ∂L/∂m (d,) for h = m ⊙ (W + s·B·A)x / ‖W + s·B·A‖_row.

    Compared with the hand-written backward of ``lora.dora_linear`` (gradchecked in the tests).
    """
    hint = ("Hint: h_i = c_i·P_i with c = m / n and P = x·Vᵀ (N, d), V = W + s·B·A; so ∂L/∂c_i = Σ_rows grad_h ⊙ P "
            "and ∂L/∂m_i = (∂L/∂c_i) / n_i, with n_i = ‖V_i‖ (the norm of row i).")
    for seed, s in ((0, 2.0), (1, 0.5)):
        x, W, A, Bm, m, g = _dora_problem(seed)
        mt = tensor(m, requires_grad=True, dtype="float64")
        args = [tensor(a, dtype="float64") for a in (x, W)]
        out = dora_linear(args[0], args[1], None, tensor(A, dtype="float64"), tensor(Bm, dtype="float64"), mt, s)
        out.backward(g)
        mine = _as_array(_call(fn, x.copy(), W.copy(), A.copy(), Bm.copy(), m.copy(), g.copy(), s), "∂L/∂m", m.shape)
        if not np.allclose(mine, bk.to_numpy(mt.grad), rtol=1e-6, atol=1e-9):
            worst = int(np.argmax(np.abs(mine - bk.to_numpy(mt.grad))))
            raise ExerciseError(f"∂L/∂m (s = {s}): entry {worst} is {mine[worst]:.6g}, the backward gives "
                                f"{float(bk.to_numpy(mt.grad)[worst]):.6g}. {hint}")
    return "your ∂L/∂m equals DoRA's hand-written backward"


@_exercise("PiSSA's start")
def check_pissa_init(fn) -> str:
    """fn(W, r, s) -> (A, B, W_res): A (r, k), B (d, r) with s·B·A the top-r singular part of W, W_res = W − s·B·A."""
    hint = ("Hint: U, S, Vt = np.linalg.svd(W, full_matrices=False); take the first r; split √(S_r / s) between "
            "the two factors: A = √(S_r/s)[:, None] · Vt[:r], B = U[:, :r] · √(S_r/s)[None, :].")
    for seed, (d, k, r, s) in enumerate([(6, 5, 2, 2.0), (4, 7, 3, 0.5), (5, 5, 1, 1.0)]):
        W = np.random.default_rng(seed).standard_normal((d, k))
        result = _call(fn, W.copy(), r, s)
        if not (isinstance(result, tuple) and len(result) == 3):
            raise ExerciseError(f"return three arrays (A, B, W_res), got {type(result).__name__}. {hint}")
        A, Bm, W_res = (_as_array(a, what, shape) for a, what, shape in
                        zip(result, ("A", "B", "W_res"), ((r, k), (d, r), (d, k))))
        U, S, Vt = np.linalg.svd(W, full_matrices=False)
        top = (U[:, :r] * S[:r]) @ Vt[:r]
        if not np.allclose(s * Bm @ A, top, atol=1e-9):
            raise ExerciseError(f"d={d}, k={k}, r={r}, s={s}: s·B·A is not the top-{r} singular part of W. {hint}")
        if not np.allclose(W_res + s * Bm @ A, W, atol=1e-9):
            raise ExerciseError(f"W_res + s·B·A differs from W: the model would not start at the base. {hint}")
        if not np.allclose(np.linalg.norm(A, axis=1), np.linalg.norm(Bm, axis=0), rtol=1e-6):
            raise ExerciseError(f"A and B should carry the same share, √(S_r/s), of each singular value. {hint}")
    return "s·B·A is the top-r SVD part, W_res + s·B·A = W, and A, B are balanced as PiSSA (and PEFT) make them"


@_exercise("bytes of an NF4 weight")
def check_nf4_bytes(fn) -> str:
    """fn(n_values, block_size, double_quant) -> bytes of the NF4 form (codes + scales), as ``quantize_nf4`` stores it."""
    hint = ("Hint: 4 bits per value (padded to whole blocks), one float32 absmax (4 bytes) per block; with double "
            "quantization one byte per block, plus a float32 per 256 blocks and one float32 offset.")
    for n, block, dq in [(64, 64, False), (4096, 64, False), (100, 64, False), (65536, 64, True), (1000, 32, True)]:
        got = _call(fn, n, block, dq)
        expected = quantize_nf4(np.ones(n, dtype=np.float32), block, double_quant=dq).nbytes
        if got != expected:
            raise ExerciseError(f"n_values={n}, block_size={block}, double_quant={dq}: you give {got!r}, "
                                f"quantize_nf4 stores {expected:,} bytes. {hint}")
    return "right, with and without double quantization (4.5 and ≈4.127 bits per value at block 64)"
