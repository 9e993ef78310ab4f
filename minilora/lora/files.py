"""Adapter files: one task's A and B matrices in a small safetensors file (no pickle).

    lora.save_adapter("e2e.safetensors", model, adapter_name="e2e")   # kilobytes, not the model
    name = lora.load_adapter("e2e.safetensors", base_model)            # adds adapter "e2e" if absent

The paper's point (Sec. 4.2): a 350 GB GPT-3 checkpoint becomes a 35 MB adapter per task.
A file holds the adapter's tensors under the model's own names (``blocks.0.attn.q.lora_A.e2e``)
and, in its metadata (one JSON string under the key "minilora", as ``minilora.io`` writes),
the LoRAConfig, the adapter name, the minilora version, the dtype and a SHA-256 of the tensor
bytes (safetensors checks the header and the file length, not the data: the digest catches
flipped bytes). ``load_adapter`` checks everything against the model before it changes anything.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from .. import backend as bk
from ..io import FileFormatError, atomic_write
from ..nn import Module
from .config import LoRAConfig, check_adapter_name
from .model import (
    _bias_names,
    _check_unmerged,
    apply_lora,
    get_adapter_config,
    list_adapters,
    lora_state_dict,
    resolve_targets,
    set_adapter,
)

__all__ = ["FORMAT", "AdapterFileError", "adapter_nbytes", "load_adapter", "save_adapter"]

FORMAT = "minilora-lora-adapter"
FORMAT_VERSION = 1


class AdapterFileError(FileFormatError):
    """An adapter file is unreadable, corrupt, or does not fit the model it is loaded into."""


def _digest(arrays: dict) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def adapter_nbytes(model: Module, adapter_name: str = "default") -> int:
    """Bytes of one adapter's tensors (what ``save_adapter`` stores, less a small header)."""
    return int(sum(a.nbytes for a in lora_state_dict(model, adapter_name).values()))


def save_adapter(path, model: Module, adapter_name: str = "default") -> str:
    """Write adapter ``adapter_name`` of ``model`` to ``path`` (safetensors, atomic: temp file + rename)."""
    from safetensors.numpy import save_file

    from .. import __version__

    host = {n: np.ascontiguousarray(bk.to_numpy(a)) for n, a in lora_state_dict(model, adapter_name).items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter_name": adapter_name,
        "config": get_adapter_config(model, adapter_name).to_dict(),
        "minilora_version": __version__,
        "dtype": ",".join(sorted({str(a.dtype) for a in host.values()})),
        "sha256": _digest(host),
    }
    metadata = {"minilora": json.dumps(meta, sort_keys=True)}
    path = os.fspath(path)
    atomic_write(path, lambda tmp: save_file(host, tmp, metadata=metadata))
    return path


def _read(path: str):
    """(arrays, meta) of an adapter file, or AdapterFileError naming the file and the problem."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise AdapterFileError(f"{path}: no such file")
    try:
        with safe_open(path, framework="numpy") as f:
            raw = (f.metadata() or {}).get("minilora")
            arrays = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has keys(), no __iter__)
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own types: truncated file, bad header, ...)
        raise AdapterFileError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    if raw is None:
        raise AdapterFileError(f"{path}: no minilora metadata; is it an adapter written by lora.save_adapter?")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{path}: the metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        kind = meta.get("format") if isinstance(meta, dict) else None
        raise AdapterFileError(f"{path}: not a LoRA adapter file (format {kind!r}, expected {FORMAT!r})")
    for key in ("adapter_name", "config", "sha256"):
        if key not in meta:
            raise AdapterFileError(f"{path}: the metadata has no {key!r}")
    digest = _digest(arrays)
    if digest != meta["sha256"]:
        raise AdapterFileError(
            f"{path}: the tensor data is corrupt (SHA-256 {digest[:12]}... differs from {meta['sha256'][:12]}... "
            "stored when it was written)"
        )
    return arrays, meta


def _expected(model: Module, config: LoRAConfig, name: str) -> dict:
    """{parameter name: (shape, dtype)} that adapter ``name`` with ``config`` has (or would have) in ``model``."""
    if name in list_adapters(model):
        return {n: (tuple(a.shape), np.dtype(a.dtype)) for n, a in lora_state_dict(model, name).items()}
    targets = resolve_targets(model, config)
    out = {}
    for path, layer in targets:
        d, k = layer.weight.shape
        out[f"{path}.lora_A.{name}"] = ((config.r, k), np.dtype(layer.weight.dtype))
        out[f"{path}.lora_B.{name}"] = ((d, config.r), np.dtype(layer.weight.dtype))
        if config.use_dora:
            out[f"{path}.lora_magnitude.{name}"] = ((d,), np.dtype(layer.weight.dtype))
    params = dict(model.named_parameters())
    for n in _bias_names(model, config.bias, targets):
        out[n] = (tuple(params[n].shape), np.dtype(params[n].dtype))
    return out


def load_adapter(path, model: Module, adapter_name: str | None = None, activate: bool = True) -> str:
    """Load an adapter file into ``model``; returns the adapter's name in the model.

    adapter_name: the name to load it under (default: the name stored in the file). A model
    without that adapter gets it (``apply_lora`` with the file's config) first. Every name,
    shape and dtype is checked before anything changes: a corrupt, truncated or mismatched
    file raises AdapterFileError naming the file and the first mismatch, model untouched.
    With ``activate`` the loaded adapter becomes the active one.
    """
    path = os.fspath(path)
    arrays, meta = _read(path)
    try:
        config = LoRAConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise AdapterFileError(f"{path}: the stored LoRAConfig is invalid ({exc})") from None
    stored_name = meta["adapter_name"]
    try:
        check_adapter_name(stored_name)
    except ValueError as exc:
        raise AdapterFileError(f"{path}: the stored adapter name is invalid ({exc})") from None
    name = stored_name if adapter_name is None else check_adapter_name(adapter_name)
    _check_unmerged(model, f"load adapter {name!r}")
    exists = name in list_adapters(model)
    if exists:
        current = get_adapter_config(model, name)
        if current != config:
            diff = [k for k, v in config.to_dict().items() if current.to_dict()[k] != v]
            raise AdapterFileError(
                f"{path}: the model's adapter {name!r} has a different config ({', '.join(f'{k}: model {current.to_dict()[k]!r}, file {config.to_dict()[k]!r}' for k in diff)}); "
                f"load it under another adapter_name or lora.delete_adapter(model, {name!r}) first"
            )
    try:
        expected = _expected(model, config, name)
    except ValueError as exc:
        raise AdapterFileError(f"{path}: the adapter does not fit this model: {exc}") from None

    def model_key(file_key: str) -> str:
        for part in ("lora_A", "lora_B", "lora_magnitude"):
            suffix = f".{part}.{stored_name}"
            if file_key.endswith(suffix):
                return file_key[: -len(suffix)] + f".{part}.{name}"
        return file_key

    renamed = {model_key(k): (k, a) for k, a in arrays.items()}
    for key in sorted(set(expected) | set(renamed)):
        if key not in renamed:
            shape, dtype = expected[key]
            raise AdapterFileError(f"{path}: the model expects {key} {shape} {dtype} but the file has no such tensor")
        file_key, a = renamed[key]
        if key not in expected:
            raise AdapterFileError(f"{path}: the file has {file_key} {tuple(a.shape)}, which the model has no place for")
        shape, dtype = expected[key]
        if tuple(a.shape) != shape:
            raise AdapterFileError(
                f"{path}: {file_key} has shape {tuple(a.shape)} in the file but the model expects {shape} "
                "(an adapter for another model size or rank?)"
            )
        if a.dtype != dtype:
            raise AdapterFileError(
                f"{path}: {file_key} is {a.dtype} in the file but the model's is {dtype}; convert the model with "
                f"model.to(dtype='{a.dtype}') or save the adapter from a {dtype} model"
            )
        if not np.isfinite(a).all():
            raise AdapterFileError(f"{path}: {file_key} holds NaN or inf values")
    # ---- every check passed: now change the model
    if not exists:
        apply_lora(model, config, adapter_name=name, activate=False)
    params = dict(model.named_parameters())
    for key, (_, a) in renamed.items():
        p = params[key]
        p.data[...] = bk.asarray(a, dtype=p.dtype, backend=p.backend)
    if activate:
        set_adapter(model, name)
    return name
