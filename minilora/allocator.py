"""Keep freed memory for reuse: fewer page faults for NumPy's large temporaries (Linux, glibc).

Every elementwise op of a training step returns a new array, and most of the tiny GPT's
arrays are 0.5-2 MB. NumPy takes their memory from ``malloc``. glibc serves a block larger
than its *mmap threshold* (128 kB at start, raised automatically up to 32 MB as large blocks
are freed) with a fresh ``mmap`` and hands it back to the kernel on ``free``; memory at the
top of the heap is also given back once more than the *trim threshold* is free. Memory that
comes fresh from the kernel is zero-filled page by page on first touch (a page fault per
4 kB page). So the same few megabytes are unmapped and faulted in again, op after op.

``keep_freed_memory()`` raises both thresholds, so freed blocks stay in the heap and the next
array of the same size reuses them without a fault. It changes the process's allocator (every
library in the process is affected: NumPy, PyTorch's CPU tensors, Python objects) and the
process keeps up to ``trim_threshold`` bytes of free memory instead of returning it. The
``minilora`` command line calls it; in your own scripts call it yourself, or not at all. It
is a no-op where glibc's ``mallopt`` does not exist (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Raise glibc's mmap and trim thresholds (bytes); True if the allocator took the setting.

    Set the environment variable ``MINILORA_KEEP_FREED_MEMORY=0`` to skip it.
    """
    if os.environ.get("MINILORA_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
