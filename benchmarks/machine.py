"""The machine a benchmark runs on: NumPy's BLAS threads (read and set through OpenBLAS's C API), versions."""

from __future__ import annotations

import ctypes
import os
import platform
import sys

import numpy as np

__all__ = ["blas_threads", "machine_info", "set_blas_threads"]


def blas_threads() -> dict:
    """What NumPy's BLAS uses: {'library', 'threads', 'OPENBLAS_NUM_THREADS', ...}.

    NumPy's OpenBLAS fixes its thread count when it loads (from OPENBLAS_NUM_THREADS, else the
    number of cores); it is read here through OpenBLAS's own C API, found among the loaded
    libraries (Linux), with ``None`` where that is not possible.
    """
    info = {"library": None, "threads": None}
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    lib = _openblas()
    if lib is not None:
        info["library"] = "openblas"
        getter = _openblas_fn(lib, "get_num_threads")
        if getter is not None:
            getter.restype = ctypes.c_int
            info["threads"] = int(getter())
    return info


_OPENBLAS = []


def _openblas():
    if not _OPENBLAS:
        lib = None
        try:
            with open("/proc/self/maps") as f:
                paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
            for path in paths:
                try:
                    candidate = ctypes.CDLL(path)
                except OSError:
                    continue
                if _openblas_fn(candidate, "get_num_threads") is not None:
                    lib = candidate
                    break
        except OSError:  # not Linux
            pass
        _OPENBLAS.append(lib)
    return _OPENBLAS[0]


def _openblas_fn(lib, what):
    for prefix in ("scipy_openblas_", "openblas_"):
        for suffix in ("64_", ""):
            fn = getattr(lib, f"{prefix}{what}{suffix}", None)
            if fn is not None:
                return fn
    return None


def set_blas_threads(n: int) -> bool:
    """Set NumPy's OpenBLAS thread count (True), or say it cannot be done here (False)."""
    lib = _openblas()
    setter = _openblas_fn(lib, "set_num_threads") if lib is not None else None
    if setter is None:
        return False
    setter.argtypes = [ctypes.c_int]
    setter(int(n))
    return True


def machine_info() -> dict:
    """Python, NumPy, platform, cores, BLAS threads (and torch's, when it is loaded)."""
    info = {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "blas": blas_threads()}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info
