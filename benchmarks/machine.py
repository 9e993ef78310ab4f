"""The machine a benchmark runs on: NumPy's BLAS threads (read and set through OpenBLAS's C API), versions."""

from __future__ import annotations

import ctypes
import os
import platform
import sys

import numpy as np

__all__ = ["BLAS_OVERRIDES", "blas_kernel", "blas_threads", "blas_warnings", "machine_info", "set_blas_threads"]

# Environment variables that make OpenBLAS pick a kernel or a cache size other than the one it detects:
# on a CPU newer than the named core type they slow sgemm down (this is what the warning says).
BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


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


def blas_kernel() -> dict:
    """Which BLAS NumPy runs and which of its kernels: {'library', 'version', 'kernel', 'source', ...}.

    The kernel (OpenBLAS's core type, e.g. 'Haswell', 'SkylakeX', 'Zen') is what decides the sgemm
    speed. Read from threadpoolctl when it is installed, else from OpenBLAS's own C API
    (``openblas_get_corename``), else from the build information of ``numpy.show_config``
    (which names the library but not the kernel chosen at run time).
    """
    try:
        import threadpoolctl
    except ImportError:
        threadpoolctl = None
    if threadpoolctl is not None:
        for pool in threadpoolctl.threadpool_info():
            if pool.get("user_api") == "blas":
                return {"library": pool.get("internal_api"), "version": pool.get("version"),
                        "kernel": pool.get("architecture"), "threads": pool.get("num_threads"),
                        "source": "threadpoolctl"}
    lib = _openblas()
    if lib is not None:
        info = {"library": "openblas", "source": "OpenBLAS C API"}
        for key, what in (("kernel", "get_corename"), ("config", "get_config")):
            fn = _openblas_fn(lib, what)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                info[key] = fn().decode(errors="replace").strip()
        if "config" in info:
            info["version"] = info["config"].split()[1] if len(info["config"].split()) > 1 else None
        return info
    info = {"library": None, "version": None, "kernel": None, "source": "numpy.show_config"}
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info.update(library=blas.get("name"), version=blas.get("version"))
    except Exception:  # older NumPy without mode="dicts": the library stays unknown
        pass
    return info


def blas_warnings() -> list[str]:
    """One line per BLAS override in the environment (OPENBLAS_CORETYPE, OPENBLAS_L2_SIZE) that is set."""
    lines = []
    for var in BLAS_OVERRIDES:
        if os.environ.get(var):
            lines.append(f"warning: {var}={os.environ[var]} is set: OpenBLAS then uses that instead of what it "
                         "detects, which can slow sgemm down on a newer CPU (both set: about half speed on the 2-core "
                         "development machine); run with "
                         f"`env -u {var} ...` to measure what a user's machine gives")
    return lines


def machine_info() -> dict:
    """Python, NumPy, platform, cores, BLAS threads and kernel (and torch's threads, when it is loaded)."""
    blas = blas_threads()
    blas["kernel"] = blas_kernel()
    blas["overrides"] = {var: os.environ[var] for var in BLAS_OVERRIDES if os.environ.get(var)}
    info = {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "blas": blas, "cpu": _cpu_model()}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def _cpu_model() -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
