"""Files: atomic safetensors writes and checked reads (no pickle anywhere).

Writes. Every file minilora writes goes to a temporary file beside the target first
(``.<name>.tmp-<pid>-<random>``) and is then renamed over it (``os.replace`` is atomic on
POSIX and Windows), so a write killed half-way leaves the previous file intact; the temporary
files such a kill leaves are removed by the next write of the same target. New files get the
mode a plain ``open()`` would give (0o666 less the umask, so usually 0644); a file that is
replaced keeps its mode. A symlink is written *through*: the link stays and the file it points
to is replaced. A target that is a directory, a FIFO or a device is refused.

Reads. The path is opened without blocking and checked to be a regular file before a byte is
read (a FIFO never hangs a load); a missing, unreadable, directory or non-regular path gets a
message that says which. ``save_arrays`` stores a SHA-256 over the tensors *and* the metadata;
``load_arrays`` checks it, so one flipped bit anywhere in a tensor or in the metadata is found.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import stat

import numpy as np

from . import backend as bk

__all__ = [
    "FileFormatError", "atomic_write", "digest", "load_arrays", "load_json", "read_safetensors", "save_arrays",
    "save_json", "save_safetensors", "tensor_fingerprint",
]


class FileFormatError(ValueError):
    """A file is missing, truncated, corrupt, or does not fit what it is loaded into."""


# ----------------------------------------------------------------------------- writing
_TMP = ".tmp-"
_in_progress: set = set()  # temp files this process is writing right now (never "stale")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would end the process: assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process (or no way to tell): leave its file alone
    return True


def _remove_stale_temps(folder: str, base: str) -> None:
    """Delete temp files of ``base`` left by killed writers (their process is gone)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    own = f".{base}{_TMP}"
    for name in names:
        full = os.path.join(folder, name)
        stale = False
        if name.startswith(own):
            pid = name[len(own):].split("-", 1)[0]
            stale = full not in _in_progress and (not pid.isdigit() or not _pid_alive(int(pid))
                                                 or int(pid) == os.getpid())
        elif name.startswith(_TMP) and name.endswith(base) and len(name) > len(_TMP) + len(base):
            stale = True  # the other temporary naming, mkstemp's ".tmp-XXXXXXXX<name>"
        if stale:
            with contextlib.suppress(OSError):
                os.remove(full)


def _resolve_target(path: str) -> str:
    """The regular file a write of ``path`` replaces: symlinks are followed (written through)."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return real
    except PermissionError:
        raise PermissionError(f"{path}: cannot write: permission denied (a folder on the way may not be entered)") from None
    except OSError as exc:
        raise FileFormatError(f"{path}: cannot write there ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise FileFormatError(f"{path}: is a directory; give a file name inside it, e.g. {os.path.join(path, 'file.safetensors')}")
    if not stat.S_ISREG(st.st_mode):
        raise FileFormatError(f"{path}: is a {_kind(st.st_mode)}, not a regular file; minilora writes only regular files")
    return real


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)`` and move the finished file onto ``path`` in one step.

    ``tmp_path`` already exists (empty, with the final mode); ``write`` may overwrite it.
    """
    path = os.fspath(path)
    target = _resolve_target(path)
    folder, base = os.path.split(target)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise type(exc)(f"{path}: cannot create the folder {folder} ({exc.strerror})") from None
    _remove_stale_temps(folder, base)
    tmp = os.path.join(folder, f".{base}{_TMP}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    except PermissionError:
        raise PermissionError(f"{path}: cannot write: permission denied in the folder {folder}") from None
    except OSError as exc:
        raise type(exc)(f"{path}: cannot write in {folder} ({exc.strerror})") from None
    _in_progress.add(tmp)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0o666 less the umask, as a plain open() gives
        with contextlib.suppress(FileNotFoundError):
            mode = stat.S_IMODE(os.stat(target).st_mode)  # replacing a file keeps its mode
        os.close(fd)
        write(tmp)
        os.chmod(tmp, mode)  # after write(): a writer may have recreated the file (safetensors does, as 0600)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    finally:
        _in_progress.discard(tmp)
    with contextlib.suppress(OSError, AttributeError):  # make the rename itself durable (POSIX)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write {name: host array} as a safetensors file through ``atomic_write``.

    The file is serialised to bytes first and those bytes written into minilora's own temp file:
    a writer that makes temp files of its own would leave them behind when the process is killed.
    """
    from safetensors.numpy import save

    payload = save(tensors, metadata=metadata)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(payload)

    atomic_write(path, write)


# ----------------------------------------------------------------------------- integrity
FINGERPRINT_SAMPLE = 1 << 20  # elements hashed per tensor at most: every element up to 4 MB of float32


def tensor_fingerprint(array) -> str:
    """A short SHA-256 (16 hex digits) of one tensor: dtype, shape and its elements.

    Tensors of up to ``FINGERPRINT_SAMPLE`` elements are hashed whole; larger ones through an
    evenly strided sample of about that many elements (cheap for GPT-2-size weights, and a base
    trained further or swapped in changes almost every element).
    """
    a = np.asarray(bk.to_numpy(array))
    flat = a.reshape(-1)
    step = max(1, flat.size // FINGERPRINT_SAMPLE)
    h = hashlib.sha256(f"{a.dtype.str}|{a.shape}|{step}|".encode())
    h.update(np.ascontiguousarray(flat[::step]).tobytes())
    return h.hexdigest()[:16]


def digest(arrays: dict, meta: dict | None = None) -> str:
    """SHA-256 over the metadata (canonical JSON, without its own "sha256") and every tensor.

    Tensors are hashed as (name, dtype, shape, bytes) in name order; ``meta=None`` hashes the
    tensors only (what adapter files of format_version 1 stored).
    """
    h = hashlib.sha256()
    if meta is not None:
        body = {k: v for k, v in meta.items() if k != "sha256"}
        h.update(b"meta|" + json.dumps(body, sort_keys=True).encode() + b"|")
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- reading
def read_safetensors(path, error=FileFormatError) -> tuple[dict, dict | None]:
    """({name: numpy array}, the header's ``__metadata__`` or None), or ``error`` naming the problem.

    The path is opened non-blocking and must be a regular file; then safetensors checks the
    whole header (offsets, sizes, dtypes) and copies the tensors out of a memory map, so a
    large file is never held twice in memory.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except PermissionError:
        raise error(f"{path}: permission denied: this user may not read it (check its mode and owner, e.g. `ls -l`)") from None
    except OSError as exc:
        raise error(f"{path}: cannot open it ({exc.strerror})") from None

    def bad(detail):
        return error(f"{path}: not a readable safetensors file ({detail})")

    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise error(f"{path}: is a directory, not a file")
        raise error(f"{path}: is a {_kind(st.st_mode)}, not a regular file")
    with os.fdopen(fd, "rb") as f:  # held open while safetensors reads the same file
        try:
            prefix = f.read(8)
        except OSError as exc:
            raise error(f"{path}: cannot read it ({exc.strerror})") from None
        if len(prefix) < 8:
            raise bad(f"{st.st_size} bytes: shorter than the 8-byte header length")
        n = int.from_bytes(prefix, "little")
        if n > st.st_size - 8:
            raise bad(f"the header length {n} exceeds the {st.st_size}-byte file: truncated?")
        try:
            with safe_open(path, framework="numpy") as g:
                metadata = g.metadata()
                arrays = {name: g.get_tensor(name) for name in g.keys()}  # noqa: SIM118 (keys(), no __iter__)
        except Exception as exc:  # noqa: BLE001 (safetensors raises its own types for bad headers)
            raise bad(f"{type(exc).__name__}: {exc}") from None
    return arrays, metadata


def save_arrays(path, arrays: dict, meta: dict | None = None) -> None:
    """Write {name: array} as safetensors (host copies; contiguous) with JSON-able ``meta``.

    The metadata is stored as one JSON string under the key "minilora", with a "sha256" over
    the tensors and the rest of the metadata added (``digest``).
    """
    host = {name: np.ascontiguousarray(bk.to_numpy(a)) for name, a in arrays.items()}
    meta = json.loads(json.dumps(meta or {}))  # what a reader will see (tuples become lists)
    meta["sha256"] = digest(host, meta)
    save_safetensors(path, host, {"minilora": json.dumps(meta, sort_keys=True)})


def load_arrays(path, require_digest: bool = False, error=FileFormatError) -> tuple[dict, dict]:
    """Read a file written by ``save_arrays``: ({name: numpy array}, meta), the SHA-256 checked (and removed).

    A file without a "sha256" (one another program wrote) loads unchecked unless
    ``require_digest``.
    """
    path = os.fspath(path)
    arrays, metadata = read_safetensors(path, error)
    raw = (metadata or {}).get("minilora", "{}")
    try:
        meta = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise error(f"{path}: the minilora metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise error(f"{path}: the minilora metadata is a {type(meta).__name__}, not a JSON object")
    check_digest(path, arrays, meta, required=require_digest, error=error)
    meta.pop("sha256", None)  # checked: the caller gets back the meta that was saved
    return arrays, meta


def check_digest(path, arrays: dict, meta: dict, required: bool = True, error=FileFormatError,
                 tensors_only: bool = False) -> None:
    """Raise ``error`` unless ``meta["sha256"]`` is the digest of ``arrays`` (and of ``meta``)."""
    stored = meta.get("sha256")
    if stored is None and not required:
        return
    if not isinstance(stored, str) or len(stored) != 64:
        raise error(f"{path}: the metadata's 'sha256' is {stored!r}, not a 64-digit SHA-256; the file is corrupt "
                    "or was not written by minilora")
    actual = digest(arrays, None if tensors_only else meta)
    if actual != stored:
        raise error(
            f"{path}: the tensor data is corrupt or the metadata was changed (SHA-256 {actual[:12]}... differs from "
            f"{stored[:12]}... stored when it was written)"
        )


def save_json(path, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text + "\n")

    atomic_write(path, write)


def load_json(path):
    with open(path) as f:
        return json.load(f)
