"""The array backend: NumPy by default, CuPy by one switch, and "strict" to check without a GPU.

This is the ONLY module that imports CuPy. Everything else asks for the array
module of its inputs (``get_array_module``) or of the current backend (``xp()``),
so the same op code runs on host and device arrays. The NumPy/CuPy gaps
(scatter-add, random numbers, host transfer) are filled here and nowhere else.

    ml.set_backend("cupy")            # or env MINILORA_BACKEND=cupy
    with ml.backend.use("cupy"): ...  # temporarily
    ml.set_backend("strict")          # NumPy underneath, CuPy's rules on top (no GPU needed)

The "strict" backend computes with NumPy but its arrays (``StrictArray``) refuse what a
``cupy.ndarray`` refuses; its rules are in ``minilora/strict.py``, which this module selects.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

from .strict import IMPLICIT_CONVERSION, BackendMismatchError, StrictArray, StrictProxy  # noqa: F401 (bk.*)
from .strict import scatter_add as _strict_scatter_add

__all__ = [
    "BackendUnavailableError",
    "BackendMismatchError",
    "set_backend",
    "get_backend",
    "use",
    "xp",
    "module_for",
    "get_array_module",
    "backend_of",
    "to_numpy",
    "asarray",
    "manual_seed",
    "rng",
    "dropout_mask",
    "scatter_add",
    "available_backends",
    "cupy_available",
    "StrictArray",
    "strict_module",
]

BACKENDS = ("numpy", "cupy", "strict")


class BackendUnavailableError(RuntimeError):
    """Raised when a backend is asked for but cannot run on this machine."""


_cupy = None  # the cupy module once imported and checked
_cupy_error: str | None = None


def _load_cupy():
    """Import CuPy and check that a GPU is visible; raise a helpful error otherwise."""
    global _cupy, _cupy_error
    if _cupy is not None:
        return _cupy
    if _cupy_error is not None:
        raise BackendUnavailableError(_cupy_error)
    try:
        import cupy  # noqa: PLC0415  (the one place cupy is imported)
    except Exception as exc:  # ImportError, or a broken CUDA install
        _cupy_error = (
            f"the 'cupy' backend needs the CuPy package, which could not be imported ({exc}). "
            "Install it with `pip install minilora[gpu]` (or a cupy-cudaXXx wheel matching your "
            "CUDA version), or stay on the default backend with ml.set_backend('numpy')."
        )
        raise BackendUnavailableError(_cupy_error) from None
    try:
        n_gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        n_gpus, detail = 0, f" ({exc})"
    else:
        detail = ""
    if n_gpus < 1:
        _cupy_error = (
            f"the 'cupy' backend needs an NVIDIA GPU, but CuPy found none{detail}. "
            "Run on a machine with a GPU and a CUDA driver, or use ml.set_backend('numpy')."
        )
        raise BackendUnavailableError(_cupy_error)
    _cupy = cupy
    return cupy


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one GPU."""
    try:
        _load_cupy()
    except BackendUnavailableError:
        return False
    return True


def available_backends() -> tuple[str, ...]:
    """The backends that can run here: ('numpy', 'strict'), plus 'cupy' where a GPU is."""
    return ("numpy", "cupy", "strict") if cupy_available() else ("numpy", "strict")


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    return name


_current = "numpy"
_env_error: Exception | None = None  # a bad MINILORA_BACKEND, raised at first use (not at import)


def _active() -> str:
    """The current backend's name; a bad MINILORA_BACKEND is raised here, where a caller can catch it."""
    if _env_error is not None:
        raise _env_error
    return _current


def set_backend(name: str) -> None:
    """Select the backend new tensors and parameters are created on."""
    global _current, _env_error
    if _check_name(name) == "cupy":
        _load_cupy()
    _current = name
    _env_error = None  # an explicit choice replaces a bad MINILORA_BACKEND


def get_backend() -> str:
    return _active()


@contextlib.contextmanager
def use(name: str):
    """``with ml.backend.use("cupy"): ...`` selects a backend inside the block only."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def module_for(name: str):
    """The array module of a backend name: numpy, cupy, or the strict module (``strict_module()``)."""
    name = _check_name(name)
    if name == "numpy":
        return np
    return _load_cupy() if name == "cupy" else strict_module()


def xp():
    """The array module of the current backend."""
    name = _active()
    return np if name == "numpy" else module_for(name)


def _is_cupy_array(a) -> bool:
    return _cupy is not None and isinstance(a, _cupy.ndarray)


def _is_device_array(a) -> bool:
    """A CuPy array or a strict one: data that must be copied to reach the host."""
    return isinstance(a, StrictArray) or _is_cupy_array(a)


def backend_of(a) -> str:
    """'numpy', 'cupy' or 'strict' for an array (anything else counts as host data)."""
    if isinstance(a, StrictArray):
        return "strict"
    return "cupy" if _is_cupy_array(a) else "numpy"


def get_array_module(*arrays):
    """The array module shared by ``arrays`` (None entries and NumPy scalars are ignored).

    Raises BackendMismatchError when host and device arrays are mixed: an op
    cannot add a NumPy array to a CuPy array without an explicit transfer.
    """
    if _cupy is None and _strict is None:  # fast path: no device backend ever loaded, everything is NumPy
        return np
    kinds = {backend_of(a) for a in arrays if hasattr(a, "shape") and not isinstance(a, np.generic)}
    if len(kinds) > 1:
        shapes = ", ".join(f"{backend_of(a)}{tuple(a.shape)}" for a in arrays if hasattr(a, "shape"))
        raise BackendMismatchError(
            f"an operation received arrays on two backends ({shapes}); move them to one first, "
            "e.g. model.to(backend='cupy') or ml.tensor(x) under the same backend"
        )
    return module_for(kinds.pop()) if kinds else np


def to_numpy(a) -> np.ndarray:
    """A host NumPy array for a NumPy/CuPy/strict array or a Tensor (a copy from a device)."""
    if not isinstance(a, np.ndarray) and not _is_device_array(a):
        a = getattr(a, "data", a)  # a Tensor (a device array's .data is its memory, not its values)
    if isinstance(a, StrictArray):
        return a.get()
    if _is_cupy_array(a):
        return _cupy.asnumpy(a)
    return np.asarray(a)


def asarray(data, dtype=None, backend: str | None = None):
    """``data`` as an array of ``backend`` (default: the current one), copying across devices."""
    module = module_for(backend or _active())
    if module is np:
        return np.asarray(to_numpy(data) if _is_device_array(data) else data, dtype=dtype)
    if _is_device_array(data) and backend_of(data) != (backend or _active()):
        data = to_numpy(data)  # device to device goes through the host
    return module.asarray(data, dtype=dtype)


# ----------------------------------------------------------------------------- randomness
_seed = 0
_generators: dict[str, object] = {}


def manual_seed(seed: int) -> None:
    """Seed the random generators of every backend (NumPy now, CuPy when first used)."""
    global _seed
    _seed = int(seed)
    _generators.clear()
    if _cupy is not None:
        _cupy.random.seed(_seed)


def rng(backend: str | None = None):
    """The seeded generator of a backend (``numpy.random.Generator``, CuPy's, or the strict one: a
    stream of its own, as a GPU's, seeded by ``manual_seed``, whose draws differ from NumPy's)."""
    name = backend or _active()
    gen = _generators.get(name)
    if gen is None:
        if name == "numpy":
            gen = np.random.default_rng(_seed)
        elif name == "strict":
            gen = StrictProxy(np.random.default_rng(np.random.SeedSequence(_seed, spawn_key=(0x5C,))), "strict.rng")
        else:
            cupy = _load_cupy()
            gen = cupy.random.default_rng(_seed) if hasattr(cupy.random, "default_rng") else cupy.random.RandomState(_seed)
        _generators[name] = gen
    return gen


def random_uniform(shape, dtype, backend: str | None = None, low=0.0, high=1.0):
    """Uniform samples in [low, high) of ``dtype`` on a backend (the RNG gap lives here)."""
    name = backend or _active()
    gen = rng(name)
    if name == "numpy":
        return gen.uniform(low, high, size=shape).astype(dtype, copy=False)
    return (gen.random(shape, dtype=np.float64) * (high - low) + low).astype(dtype, copy=False)


def random_normal(shape, dtype, backend: str | None = None, std=1.0):
    """Gaussian samples N(0, std²) of ``dtype`` on a backend."""
    name = backend or _active()
    gen = rng(name)
    if name == "numpy":
        return (gen.standard_normal(size=shape) * std).astype(dtype, copy=False)
    return (gen.standard_normal(shape, dtype=np.float64) * std).astype(dtype, copy=False)


def dropout_mask(shape, p: float, dtype, backend: str | None = None):
    """Inverted-dropout mask: 0 with probability p, else 1/(1-p) (so E[mask] = 1); every dropout draws it here."""
    keep = random_uniform(shape, dtype, backend=backend) >= p
    return keep.astype(dtype) * (1.0 / (1.0 - p))


# ----------------------------------------------------------------------------- gaps
def scatter_add(target, indices, values) -> None:
    """``target[indices] += values`` with repeated indices accumulated (in place).

    NumPy spells it ``np.add.at``; CuPy ``cupyx.scatter_add`` (float16/32/64, int32, uint32 and
    uint64 only: the strict backend refuses the other dtypes as CuPy does).
    """
    if isinstance(target, StrictArray):
        _strict_scatter_add(target, indices, values)
    elif _is_cupy_array(target):
        import cupyx  # noqa: PLC0415

        cupyx.scatter_add(target, indices, values)
    else:
        np.add.at(target, indices, values)


# ----------------------------------------------------------------------------- the strict backend
_strict = None  # the strict array module once made


def strict_module():
    """The array module of the "strict" backend: NumPy's functions on strict arrays, CuPy's refusals."""
    global _strict
    if _strict is None:
        _strict = StrictProxy(np, "strict")
    return _strict


def _init_from_env() -> None:
    """Apply MINILORA_BACKEND. A bad value does not break ``import minilora`` (a traceback nobody can
    catch, e.g. in the CLI): it is raised, naming the variable, by the first call that needs the backend."""
    global _env_error
    name = os.environ.get("MINILORA_BACKEND", "").strip().lower()
    if name:
        try:
            set_backend(name)
        except (ValueError, BackendUnavailableError) as exc:  # say where the bad name came from
            _env_error = type(exc)(f"environment variable MINILORA_BACKEND={name!r}: {exc}")


_init_from_env()
