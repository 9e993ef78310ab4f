"""Files: atomic safetensors writes and checked reads (no pickle anywhere).

Every file minilora writes goes to a temporary file in the same folder first and is
then renamed over the target (``os.replace`` is atomic on POSIX and Windows), so a
write killed half-way leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from . import backend as bk

__all__ = ["atomic_write", "save_arrays", "load_arrays", "FileFormatError", "save_json", "load_json"]


class FileFormatError(ValueError):
    """A file is missing, truncated, corrupt, or does not fit what it is loaded into."""


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)`` and move the finished file onto ``path`` in one step."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_arrays(path, arrays: dict, meta: dict | None = None) -> None:
    """Write {name: array} as safetensors (host copies; contiguous) with JSON-able ``meta``.

    The metadata is stored as one JSON string under the key "minilora".
    """
    from safetensors.numpy import save_file

    host = {name: np.ascontiguousarray(bk.to_numpy(a)) for name, a in arrays.items()}
    metadata = {"minilora": json.dumps(meta or {}, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(host, tmp, metadata=metadata))


def load_arrays(path) -> tuple[dict, dict]:
    """Read a file written by ``save_arrays``: ({name: numpy array}, meta)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileFormatError(f"{path}: no such file")
    try:
        with safe_open(path, framework="numpy") as f:
            raw_meta = (f.metadata() or {}).get("minilora", "{}")
            arrays = {name: f.get_tensor(name) for name in f.keys()}
        meta = json.loads(raw_meta)
    except FileFormatError:
        raise
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
        raise FileFormatError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    return arrays, meta


def save_json(path, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text + "\n")

    atomic_write(path, write)


def load_json(path):
    with open(path) as f:
        return json.load(f)
