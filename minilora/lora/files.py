"""Adapter files: one task's A and B matrices in a small safetensors file (no pickle).

    lora.save_adapter("e2e.safetensors", model, adapter_name="e2e")   # kilobytes, not the model
    name = lora.load_adapter("e2e.safetensors", base_model)            # adds adapter "e2e" if absent

The paper's point (Sec. 4.2): a 350 GB GPT-3 checkpoint becomes a 35 MB adapter per task.
A file holds the adapter's tensors under the model's own names (``blocks.0.attn.q.lora_A.e2e``)
and, in its metadata (one JSON string under the key "minilora", as ``minilora.io`` writes),
the LoRAConfig, the adapter name, the minilora version, the dtype, a fingerprint of the base
model it was trained on (``base_tensor_fingerprints``: a short SHA-256 of each base tensor,
the adapted W₀ included, with a few entries of each adapted W₀) and a SHA-256 over the tensor bytes *and* the rest of the metadata (safetensors checks
the header and the file length, not the data: the digest catches a flipped byte anywhere, the
config included). ``load_adapter`` checks everything against the model before it changes
anything: names, shapes, dtypes, finite values, a config in the ranges below, a finite
ΔW = s·B A, and the same base model.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from .. import backend as bk
from .._version import __version__
from ..io import FileFormatError, check_digest, digest, read_safetensors, save_safetensors, tensor_fingerprint
from ..nn import Linear, Module
from .bias import bias_targets
from .config import MAX_DROPOUT, MAX_SCALING, LoRAConfig, check_adapter_name
from .layer import LoRALinear, variant_for
from .model import (
    apply_lora,
    bias_delta_names,
    check_unmerged,
    get_adapter_config,
    list_adapters,
    lora_parameter_names,
    lora_state_dict,
    resolve_targets,
    set_adapter,
)

__all__ = ["FORMAT", "AdapterFileError", "adapter_nbytes", "base_fingerprint", "base_tensor_fingerprints", "load_adapter",
           "read_adapter", "save_adapter"]

FORMAT = "minilora-lora-adapter"
FORMAT_VERSION = 3  # 3: the base fingerprint covers every base tensor (the Linear weights too), one hash each
READS_VERSIONS = (1, 2, 3)  # 1: SHA-256 over the tensors only, no base fingerprint; 2: no Linear weights in it


class AdapterFileError(FileFormatError):
    """An adapter file is unreadable, corrupt, or does not fit the model it is loaded into."""


def base_tensor_fingerprints(model: Module, exclude=()) -> dict:
    """{name: ``io.tensor_fingerprint``} of every base tensor: each parameter but the LoRA ones and ``exclude``.

    The Linear weights are included as the adapters see them (``LoRALinear.base_weight``): the
    original W₀ of a PiSSA layer (whose weight holds the residual) and the pre-merge copy of a
    merged one, so PiSSA and merging keep the fingerprint while another W₀ changes it. An NF4
    weight is no parameter and has no entry.
    """
    skip = set(lora_parameter_names(model)) | set(bias_delta_names(model)) | set(exclude)
    layers = {f"{path}.weight": m for path, m in model.named_modules() if isinstance(m, LoRALinear)}
    out = {}
    for name, p in model.named_parameters():
        if name in skip:
            continue
        weight = layers[name].base_weight() if name in layers else p.data
        if weight is not None:
            out[name] = tensor_fingerprint(weight)
    return out


def base_fingerprint(model: Module, exclude=()) -> str:
    """SHA-256 of the base model: over ``base_tensor_fingerprints`` (every base tensor, the Linear weights too).

    Two bases with the same shapes but other values (another pre-training run, one block's
    weights swapped in, a merged adapter) get different fingerprints.
    """
    return hashlib.sha256(json.dumps(base_tensor_fingerprints(model, exclude), sort_keys=True).encode()).hexdigest()


def _base_fingerprint_v2(model: Module, exclude=()) -> str:
    """What adapter files of format_version 2 record: the embeddings, LayerNorms and biases only."""
    skip = set(lora_parameter_names(model)) | set(bias_delta_names(model)) | set(exclude)
    skip |= {f"{path}.weight" for path, m in model.named_modules() if isinstance(m, (Linear, LoRALinear))}
    return digest({n: bk.to_numpy(p.data) for n, p in model.named_parameters() if n not in skip})


SAMPLES_PER_WEIGHT = 8  # entries of each adapted W₀ kept in the file, to recognise a model it is merged into


def _base_samples(model: Module, config: LoRAConfig) -> dict:
    """{adapted weight name: [[flat index, W₀ value], ...]} at evenly spaced entries."""
    out = {}
    for path, layer in resolve_targets(model, config):
        weight = layer.base_weight() if isinstance(layer, LoRALinear) else layer.weight.data
        if weight is None:
            continue
        flat = np.asarray(bk.to_numpy(weight), dtype=np.float64).reshape(-1)
        idx = np.unique(np.linspace(0, flat.size - 1, SAMPLES_PER_WEIGHT).astype(np.int64))
        out[f"{path}.weight"] = [[int(i), float(flat[i])] for i in idx]
    return out


def adapter_nbytes(model: Module, adapter_name: str = "default") -> int:
    """Bytes of one adapter's tensors (what ``save_adapter`` stores, less a small header)."""
    return int(sum(a.nbytes for a in lora_state_dict(model, adapter_name).values()))


def save_adapter(path, model: Module, adapter_name: str = "default") -> str:
    """Write adapter ``adapter_name`` of ``model`` to ``path`` (safetensors, atomic: temp file + rename).

    The file records the base it was trained on (``base_tensor_fingerprints``, and a few entries of
    each adapted W₀), so ``load_adapter`` refuses another base, or a model this adapter is merged into.
    """

    host = {n: np.ascontiguousarray(bk.to_numpy(a)) for n, a in lora_state_dict(model, adapter_name).items()}
    config = get_adapter_config(model, adapter_name)
    if not config.dropout <= MAX_DROPOUT:  # what load_adapter would refuse is never written
        raise AdapterFileError(f"{os.fspath(path)}: adapter {adapter_name!r} has dropout {config.dropout}, outside "
                               f"[0, {MAX_DROPOUT}], which adapter files do not hold")
    tensors = base_tensor_fingerprints(model, exclude=host)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter_name": adapter_name,
        "config": config.to_dict(),
        "minilora_version": __version__,
        "dtype": ",".join(sorted({str(a.dtype) for a in host.values()})),
        "base_sha256": hashlib.sha256(json.dumps(tensors, sort_keys=True).encode()).hexdigest(),
        "base_tensors": tensors,
        "base_samples": _base_samples(model, config),
    }
    meta["sha256"] = digest(host, meta)
    path = os.fspath(path)
    save_safetensors(path, host, {"minilora": json.dumps(meta, sort_keys=True)})
    return path


def _read(path: str):
    """(arrays, meta) of an adapter file, or AdapterFileError naming the file and the problem."""
    arrays, metadata = read_safetensors(path, AdapterFileError)
    raw = (metadata or {}).get("minilora")
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
    version = meta.get("format_version")
    if isinstance(version, bool) or version not in READS_VERSIONS:
        raise AdapterFileError(
            f"{path}: adapter format_version {version!r}; this minilora reads versions {list(READS_VERSIONS)} "
            "(a file from a newer minilora? upgrade it; otherwise the file is corrupt)"
        )
    check_digest(path, arrays, meta, error=AdapterFileError, tensors_only=version == 1)
    return arrays, meta


def _check_ranges(path: str, config: LoRAConfig) -> None:
    if not config.scaling <= MAX_SCALING:
        raise AdapterFileError(
            f"{path}: the stored config gives a scaling s = {config.scaling:.3g} (alpha {config.alpha:.3g}, r {config.r}), "
            f"outside (0, {MAX_SCALING:g}]: no trained adapter has it, so the file is corrupt or crafted"
        )
    if not config.dropout <= MAX_DROPOUT:
        raise AdapterFileError(
            f"{path}: the stored config has dropout {config.dropout}, outside [0, {MAX_DROPOUT}]: the file is corrupt or crafted"
        )


def _check_delta(path: str, renamed: dict, targets, name: str, scaling: float) -> None:
    """ΔW = s·B A of every layer must be finite in the weight's dtype (a finite B and A can still overflow)."""
    for layer_path, layer in targets:
        A = renamed[f"{layer_path}.lora_A.{name}"][1].astype(np.float64)
        B = renamed[f"{layer_path}.lora_B.{name}"][1].astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            delta = (B @ A) * scaling
            largest = float(np.abs(delta).max()) if delta.size else 0.0
        if not largest <= float(np.finfo(layer.weight.dtype).max):
            raise AdapterFileError(
                f"{path}: the adapter's update ΔW = s·B A of {layer_path} is not finite in {layer.weight.dtype} "
                f"(largest |ΔW| {largest:.3g}); the file is corrupt or crafted"
            )


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
        for part, shape in variant_for(config).part_shapes(layer, config).items():  # DoRA: the magnitude
            out[f"{path}.{part}.{name}"] = (shape, np.dtype(layer.weight.dtype))
    for path, module in bias_targets(model, config.bias, targets):
        out[f"{path}.lora_bias.{name}"] = (tuple(module.bias.shape), np.dtype(module.bias.dtype))
    return out


def _merged_into(model: Module, samples: dict, renamed: dict, config: LoRAConfig, stored_name: str, names) -> bool:
    """True when every weight of ``names`` is W₀ + s·B·A of this file at the recorded entries of W₀."""
    if not names or not isinstance(samples, dict):
        return False
    params = dict(model.named_parameters())
    layers = dict(model.named_modules())
    moved = False
    for name in names:
        path = name[: -len(".weight")]
        entries = samples.get(name)
        a_key, b_key = f"{path}.lora_A.{stored_name}", f"{path}.lora_B.{stored_name}"
        pair = [(k, a) for k, a in renamed.values() if k in (a_key, b_key)]
        if not isinstance(entries, list) or len(pair) != 2 or name not in params or not variant_for(config).merges_as_sum:
            return False
        A, B = (dict(pair)[a_key].astype(np.float64), dict(pair)[b_key].astype(np.float64))
        layer = layers.get(path)
        weight = layer.base_weight() if isinstance(layer, LoRALinear) else params[name].data
        W = np.asarray(bk.to_numpy(weight), dtype=np.float64)
        k = W.shape[1]
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int)
                    and 0 <= entry[0] < W.size and isinstance(entry[1], (int, float))):
                return False
            i, j = divmod(entry[0], k)
            delta = config.scaling * float(B[i] @ A[:, j])
            here, base = float(W[i, j]), float(entry[1])
            tol = 1e-5 * (abs(base) + abs(delta)) + 1e-7
            if abs(here - delta - base) > tol:
                return False
            moved |= abs(here - base) > tol
    return moved


def _check_base(path: str, model: Module, meta: dict, version: int, renamed: dict, config: LoRAConfig,
                exclude) -> None:
    """Refuse a file recorded for another base (or for a model it is merged into already)."""
    fix = ("Load it into the base it was trained on, or pass check_base=False if this base is meant "
           "(e.g. one you trained further)")
    if version < 3:
        recorded = meta.get("base_sha256")
        here = _base_fingerprint_v2(model, exclude=exclude)
        if recorded is not None and here != recorded:
            raise AdapterFileError(
                f"{path}: the adapter was trained on another base model: the model's base weights have SHA-256 "
                f"{here[:12]}..., the file records {str(recorded)[:12]}... (same shapes, other values). {fix}")
        return
    recorded = meta.get("base_tensors")
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise AdapterFileError(f"{path}: the metadata's 'base_tensors' is not a {{name: fingerprint}} object; "
                               "the file is corrupt or crafted")
    here = base_tensor_fingerprints(model, exclude=exclude)
    differ = [n for n in here if recorded.get(n) != here[n]]
    if not differ:
        return
    if _merged_into(model, meta.get("base_samples"), renamed, config, meta["adapter_name"], differ):
        raise AdapterFileError(
            f"{path}: this adapter is merged into the model's weights already ({', '.join(differ[:3])}"
            f"{' ...' if len(differ) > 3 else ''} equal the base it was trained on plus its s·B·A), so loading it "
            "would add ΔW twice. Use the merged model as it is, or load the adapter into the unmerged base")
    raise AdapterFileError(
        f"{path}: the adapter was trained on another base model: {len(differ)} of the model's {len(here)} base tensors "
        f"differ from the ones it records ({', '.join(differ[:3])}{' ...' if len(differ) > 3 else ''}; same shapes, "
        f"other values). {fix}")


def read_adapter(path) -> tuple[dict, dict, LoRAConfig]:
    """(arrays, metadata, config) of an adapter file, after every check that needs no model.

    The format, its version, the SHA-256 over the tensors and the metadata, a valid LoRAConfig in
    the ranges adapter files hold, and a valid stored adapter name: each fault raises
    AdapterFileError naming the file. ``load_adapter`` reads through it, and so does whatever
    reads an adapter's A and B without a model (``minilora analyze``).
    """
    path = os.fspath(path)
    arrays, meta = _read(path)
    try:
        config = LoRAConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise AdapterFileError(f"{path}: the stored LoRAConfig is invalid ({exc})") from None
    _check_ranges(path, config)
    try:
        check_adapter_name(meta["adapter_name"])
    except ValueError as exc:
        raise AdapterFileError(f"{path}: the stored adapter name is invalid ({exc})") from None
    return arrays, meta, config


def load_adapter(path, model: Module, adapter_name: str | None = None, activate: bool = True,
                 check_base: bool = True) -> str:
    """Load an adapter file into ``model``; returns the adapter's name in the model.

    adapter_name: the name to load it under (default: the name stored in the file). A model
    without that adapter gets it (``apply_lora`` with the file's config) first. Every name,
    shape and dtype is checked before anything changes: a corrupt, truncated or mismatched
    file raises AdapterFileError naming the file and the first mismatch, model untouched.
    With ``activate`` the loaded adapter becomes the active one.

    check_base: refuse a file whose recorded base fingerprints (``base_tensor_fingerprints``: every
    base tensor, the Linear weights too) differ from the model's: same shapes, other weights, so
    B A would be added to a W₀ it was never trained against. A model this adapter is merged into
    already (after ``merge_and_unload``) is refused with a message that says so. Pass False when
    another base is intended (e.g. a base you trained further).
    """
    path = os.fspath(path)
    arrays, meta, config = read_adapter(path)
    stored_name = meta["adapter_name"]
    name = stored_name if adapter_name is None else check_adapter_name(adapter_name)
    check_unmerged(model, f"load adapter {name!r}")
    exists = _check_same_config(path, model, name, config)
    try:
        expected = _expected(model, config, name)
    except ValueError as exc:
        raise AdapterFileError(f"{path}: the adapter does not fit this model: {exc}") from None
    renamed = _renamed(arrays, stored_name, name)
    _check_tensors(path, expected, renamed)
    _check_delta(path, renamed, resolve_targets(model, config), name, config.scaling)
    if check_base:
        _check_base(path, model, meta, version=meta["format_version"], renamed=renamed, config=config,
                    exclude=[k for k in expected if ".lora_" not in k])
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


def _check_same_config(path: str, model: Module, name: str, config: LoRAConfig) -> bool:
    """Whether ``model`` has adapter ``name`` already; if it has, its config must be the file's."""
    if name not in list_adapters(model):
        return False
    current = get_adapter_config(model, name)
    if current != config:
        diff = [k for k, v in config.to_dict().items() if current.to_dict()[k] != v]
        raise AdapterFileError(
            f"{path}: the model's adapter {name!r} has a different config ({', '.join(f'{k}: model {current.to_dict()[k]!r}, file {config.to_dict()[k]!r}' for k in diff)}); "
            f"load it under another adapter_name or lora.delete_adapter(model, {name!r}) first"
        )
    return True


def _renamed(arrays: dict, stored_name: str, name: str) -> dict:
    """{the model's parameter name: (the file's tensor name, array)}: the file's adapter name becomes ``name``."""

    def model_key(file_key: str) -> str:
        for part in ("lora_A", "lora_B", "lora_magnitude", "lora_bias"):
            suffix = f".{part}.{stored_name}"
            if file_key.endswith(suffix):
                return file_key[: -len(suffix)] + f".{part}.{name}"
        return file_key

    return {model_key(k): (k, a) for k, a in arrays.items()}


def _check_tensors(path: str, expected: dict, renamed: dict) -> None:
    """The file holds exactly the tensors the model expects, each of its shape and dtype, and finite."""
    for key in sorted(set(expected) | set(renamed)):
        if key not in renamed:
            shape, dtype = expected[key]
            raise AdapterFileError(f"{path}: the model expects {key} {shape} {dtype} but the file has no such tensor")
        file_key, a = renamed[key]
        if key not in expected:
            bias = (" (an adapter's trained biases are deltas <module>.lora_bias.<adapter>, never the base's own "
                    "bias: a file that holds the bias itself is of another format; re-train or convert it)"
                    ) if key.endswith(".bias") else ""
            raise AdapterFileError(f"{path}: the file has {file_key} {tuple(a.shape)}, which the model has no place for{bias}")
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
