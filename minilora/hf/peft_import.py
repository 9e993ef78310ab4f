"""PEFT LoRA adapters for GPT-2, in: ``read_peft_adapter`` (the files, checked) and ``load_peft_adapter``.

The format and its c_attn packing are described in ``minilora.hf.peft``, which writes it; here
each c_attn LoRA is split back into minilora's q, k and v adapters.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter

import numpy as np
from safetensors import safe_open

from .. import backend as bk
from .. import lora
from ..lora.config import MAX_DROPOUT, check_adapter_name, check_scaling
from ..models.gpt import GPT
from .checkpoint import HFFormatError, dora_magnitude, read_json_object, read_safetensors, resolve_dir
from .peft import (
    CONFIG,
    KEEPS_BASE,
    LAYOUT_KEY,
    OURS_OF,
    PEFT_BIAS_KEY,
    PEFT_LORA_KEY,
    PEFT_MAGNITUDE_KEY,
    PREFIX,
    WEIGHTS,
    host_array,
    peft_alpha,
    row_norms,
)

__all__ = ["load_peft_adapter", "matching_pattern", "peft_weights_file", "pissa_as_lora", "read_peft_adapter",
           "split_c_attn"]

# PEFT LoRA options that change what the adapter computes and that minilora cannot represent
_UNSUPPORTED = (("lora_bias", "a bias on lora_B"),
                ("modules_to_save", "fully trained extra modules (modules_to_save)"),
                ("trainable_token_indices", "trainable tokens"), ("layer_replication", "layer replication"),
                ("use_qalora", "QA-LoRA"), ("target_parameters", "LoRA on parameters (target_parameters)"),
                ("alora_invocation_tokens", "activated LoRA (aLoRA)"), ("use_bdlora", "BD-LoRA"),
                ("kasa_config", "KaSA (a learnable diagonal between A and B)"),
                ("monteclora_config", "MonteCLoRA (Monte Carlo sampling on the adapters)"),
                ("arrow_config", "Arrow routing between adapters"))


def matching_pattern(patterns: dict, module: str):
    """PEFT's rule: the first pattern P with re.match(rf"(.*\\.)?({P})$", module) names the module's own value."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module):
            return pattern
    return None


def _pattern_value(patterns: dict, key: str, default):
    """The value ``rank_pattern`` / ``alpha_pattern`` gives ``key`` (``matching_pattern``), else ``default``."""
    pattern = matching_pattern(patterns, key)
    return default if pattern is None else patterns[pattern]


def peft_weights_file(folder: str) -> str:
    """The folder's adapter_model.safetensors; a folder with only adapter_model.bin (a pickle) is refused, saying so."""
    weights = os.path.join(folder, WEIGHTS)
    if os.path.exists(weights):
        return weights
    if os.path.exists(os.path.join(folder, "adapter_model.bin")):
        raise HFFormatError(f"{os.path.join(folder, 'adapter_model.bin')}: a pickle, which minilora never unpickles "
                            f"(loading one can run code), and no {WEIGHTS}. Convert it once with PEFT: "
                            "PeftModel.from_pretrained(base, folder).save_pretrained(folder) writes safetensors")
    raise HFFormatError(f"{folder}: no {WEIGHTS} next to {CONFIG}")


def _targeted(cfg: dict, module: str) -> bool:
    """PEFT's rule for which modules an adapter adapts: ``target_modules`` (a regex matched in full, or names
    matched as the last components) and ``layers_to_transform`` (block numbers)."""
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        hit = re.fullmatch(targets, module) is not None
    elif isinstance(targets, list):
        hit = any(isinstance(t, str) and (module == t or module.endswith("." + t)) for t in targets)
    else:
        return False
    layers = cfg.get("layers_to_transform")
    if hit and layers is not None:
        block = int(module.split(".")[2])
        hit = block == layers if isinstance(layers, int) else isinstance(layers, list) and block in layers
    return hit


def pissa_as_lora(modules: dict, weights: dict) -> dict:
    """PEFT PiSSA modules as plain LoRA on the original W0: A′ = [A ; A0], B′ = [B | −B0] (rank 2R, same scaling).

    PEFT's PiSSA starts from the top-R SVD of W0 (``weights``: {HF module: W0 (out, in)}): s·B0·A0 = U_R S_R V_Rᵀ,
    and trains on W_res = W0 − s·B0·A0, so W_res + s·B·A = W0 + s·(B·A − B0·A0). The SVD runs in float64 here,
    in float32 in PEFT: the two B0·A0 agree to float32 rounding (the signs of singular vectors cancel in the product).
    """
    out = {}
    for hf, (a, b, s, mag) in modules.items():
        W = np.asarray(weights[hf], dtype=np.float64)
        R = a.shape[0]
        U, S, Vt = np.linalg.svd(W, full_matrices=False)
        root = np.sqrt(S[:R] / s)
        A0, B0 = root[:, None] * Vt[:R], U[:, :R] * root[None, :]
        out[hf] = (np.concatenate([a.astype(np.float64), A0], axis=0),
                   np.concatenate([b.astype(np.float64), -B0], axis=1), s, mag)
    return out


def _hf_weights(model: GPT, modules: dict) -> dict:
    """{HF module "h.N.attn.c_attn": the model's W0 (out, in)} for the modules whose shapes fit the model."""
    params = dict(model.named_parameters())
    out = {}
    for hf, (a, b, _, _) in modules.items():
        i, kind = hf.split(".", 2)[1:]
        if int(i) >= model.config.n_layer:
            continue
        if kind == "attn.c_attn":
            W = np.concatenate([host_array(params[f"blocks.{i}.attn.{p}.weight"].data) for p in "qkv"], axis=0)
        else:
            W = host_array(params[f"blocks.{i}.{OURS_OF[kind]}.weight"].data)
        if W.shape == (b.shape[0], a.shape[1]):
            out[hf] = W
    return out


def read_peft_adapter(path) -> tuple[dict, dict, dict]:
    """Read and check a PEFT LoRA folder for GPT-2: (config, modules, biases).

    modules: {HF module path "h.N.attn.c_attn": (lora_A (R, in), lora_B (out, R), scaling, DoRA magnitude (out,) or None)}.
    biases: {HF name "h.N.attn.c_attn": array} of biases stored with the adapter (bias != "none").
    config also holds, under ``LAYOUT_KEY``, the q/k/v columns of each c_attn that ``save_peft_adapter``
    wrote into the weights' safetensors metadata ({"h.N.attn.c_attn": {"q": [0, r], ...}}), if any.
    Whatever minilora cannot represent raises HFFormatError naming it, and so does a folder whose config
    contradicts its tensors (a tensor for a module that ``target_modules`` does not target, a key without
    PEFT's prefix), an ``init_lora_weights`` that rewrites W0 other than "pissa" (whose modules
    ``load_peft_adapter`` converts: ``pissa_as_lora``), and a scaling outside the limits of ``LoRAConfig``.
    """
    folder = resolve_dir(path, what="PEFT adapter folder")
    cfg_path, cfg = read_json_object(folder, CONFIG, "a PEFT adapter folder")
    r, alpha = _check_peft_config(cfg_path, cfg)
    weights = peft_weights_file(folder)
    arrays = read_safetensors(weights)
    cfg[LAYOUT_KEY] = _c_attn_layout(weights)
    found, biases, magnitudes = _sort_peft_tensors(weights, arrays, cfg)
    modules = {hf: _checked_module(weights, cfg_path, cfg, hf, parts, r, alpha, magnitudes) for hf, parts in found.items()}
    extra = sorted(set(magnitudes) - set(modules))
    if extra:
        raise HFFormatError(f"{weights}: a lora_magnitude_vector for {extra[0]}, which has no lora_A / lora_B")
    return cfg, modules, biases


def _check_peft_config(cfg_path: str, cfg: dict) -> tuple[int, float]:
    """adapter_config.json describes a LoRA that minilora represents exactly: (r, lora_alpha), else HFFormatError."""
    if cfg.get("peft_type") != "LORA":
        raise HFFormatError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} — minilora reads LoRA adapters only")
    for field, what in _UNSUPPORTED:
        if cfg.get(field):
            raise HFFormatError(f"{cfg_path}: {field} = {cfg[field]!r} — {what} is not supported by minilora")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1 or not isinstance(alpha, (int, float)) \
            or isinstance(alpha, bool) or not math.isfinite(alpha) or not alpha > 0:
        raise HFFormatError(f"{cfg_path}: r = {r!r} and lora_alpha = {alpha!r} must be an integer >= 1 and a finite "
                            "number > 0")
    init = cfg.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in KEEPS_BASE or init == "pissa"):
        raise HFFormatError(
            f"{cfg_path}: init_lora_weights = {init!r}: this initialisation rewrites the base weights W0 (or is not "
            "known to minilora), so A and B do not act on the original W0. Convert the adapter in PEFT into a plain "
            "LoRA on the original base first: model.save_pretrained(out, path_initial_model_for_weight_conversion="
            "<the adapter saved before training>), which writes a rank-2r LoRA with init_lora_weights = true")
    dropout = cfg.get("lora_dropout", 0.0) or 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= MAX_DROPOUT:
        raise HFFormatError(f"{cfg_path}: lora_dropout = {dropout!r}, outside [0, {MAX_DROPOUT}]")
    if cfg.get("bias", "none") not in lora.BIAS_MODES:
        raise HFFormatError(f"{cfg_path}: bias = {cfg.get('bias')!r}, expected one of {lora.BIAS_MODES}")
    return r, alpha


def _c_attn_layout(weights: str) -> dict:
    """The q/k/v columns of each c_attn that ``save_peft_adapter`` wrote into the safetensors metadata, or {}."""
    with safe_open(weights, framework="numpy") as f:  # readable: read_safetensors opened it
        raw = (f.metadata() or {}).get(LAYOUT_KEY)
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}  # only a hint: split_c_attn then reads the layout from B


def _sort_peft_tensors(weights: str, arrays: dict, cfg: dict) -> tuple[dict, dict, dict]:
    """The file's tensors by role: {HF module: {"A"/"B": (key, array)}}, {HF bias: array}, {HF module: (key, m)}."""
    found, biases, magnitudes = {}, {}, {}
    for key, a in arrays.items():
        if not key.startswith(PREFIX + "transformer."):
            raise HFFormatError(f"{weights}: the tensor {key} lacks the prefix {PREFIX + 'transformer.'!r} that PEFT "
                                "writes for a GPT-2 adapter; PEFT would not load it into the model (is the folder "
                                "for another model, or edited by hand?)")
        name = key[len(PREFIX + "transformer."):]
        m = PEFT_LORA_KEY.match(name)
        mag = PEFT_MAGNITUDE_KEY.match(name)
        if m:
            found.setdefault(f"h.{m.group(1)}.{m.group(2)}", {})[m.group(3)] = (key, a)
        elif mag and cfg.get("use_dora"):
            magnitudes[f"h.{mag.group(1)}.{mag.group(2)}"] = (key, a)
        elif PEFT_BIAS_KEY.match(name.replace(".base_layer.bias", ".bias")) and cfg.get("bias", "none") != "none":
            biases[name[:-len(".bias")].removesuffix(".base_layer")] = a
        else:
            raise HFFormatError(f"{weights}: {key} — not a LoRA matrix of a GPT-2 attn.c_attn, attn.c_proj, mlp.c_fc "
                                "or mlp.c_proj (another target, such as embeddings or lm_head, is not supported)")
    if not found:
        raise HFFormatError(f"{weights}: no LoRA matrices in the file")
    return found, biases, magnitudes


def _checked_module(weights: str, cfg_path: str, cfg: dict, hf: str, parts: dict, r: int, alpha: float,
                    magnitudes: dict) -> tuple:
    """One module's (lora_A, lora_B, scaling, DoRA magnitude or None), checked against the config."""
    if set(parts) != {"A", "B"}:
        raise HFFormatError(f"{weights}: {hf} has lora_{''.join(parts)} but not both lora_A and lora_B")
    (key_a, a), (key_b, b) = parts["A"], parts["B"]
    for key, x in ((key_a, a), (key_b, b)):
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
            raise HFFormatError(f"{weights}: {key} has shape {x.shape} and dtype {x.dtype}; expected a float matrix")
        if not np.isfinite(x).all():
            raise HFFormatError(f"{weights}: {key} holds NaN or inf values")
    R = a.shape[0]
    if b.shape[1] != R:
        raise HFFormatError(f"{weights}: {key_a} {a.shape} and {key_b} {b.shape} disagree on the rank")
    full = "transformer." + hf
    expected_r = _pattern_value(cfg.get("rank_pattern") or {}, full, r)
    if R != expected_r:
        raise HFFormatError(f"{weights}: {key_a} has rank {R} but {CONFIG} gives {hf} rank {expected_r}")
    module_alpha = _pattern_value(cfg.get("alpha_pattern") or {}, full, alpha)
    if not _targeted(cfg, full):
        raise HFFormatError(f"{weights}: {key_a} adapts {full}, which {CONFIG} does not target (target_modules "
                            f"{cfg.get('target_modules')!r}, layers_to_transform {cfg.get('layers_to_transform')!r}); "
                            "PEFT would drop it. The config and the tensors contradict each other")
    rslora = bool(cfg.get("use_rslora", False))
    try:
        scaling = check_scaling(float(module_alpha), R, rslora, where=f"{cfg_path}: {hf}")
    except (TypeError, ValueError) as exc:
        raise HFFormatError(str(exc)) from None
    magnitude = dora_magnitude(magnitudes, hf, b.shape[0], weights, CONFIG) if cfg.get("use_dora") else None
    return a, b, scaling, magnitude


def _split(model: GPT, modules: dict, biases: dict, source: str, layout=None):
    """PEFT modules -> {our layer path: (A, B, scaling)} and {our bias name: array}, checked against ``model``."""
    c = model.config
    d = c.d_model
    shapes = {"attn.c_attn": (3 * d, d), "attn.c_proj": (d, d), "mlp.c_fc": (4 * d, d), "mlp.c_proj": (d, 4 * d)}
    our_biases = _our_biases(model, biases, source)
    params = dict(model.named_parameters())

    def bias_travels(name: str) -> bool:  # the adapter carries a bias for this layer that the model lacks
        return name in our_biases and not np.array_equal(our_biases[name], bk.to_numpy(params[name].data))

    ours = {}
    for hf, (a, b, s, mag) in sorted(modules.items()):
        i, kind = hf.split(".", 2)[1:]
        if int(i) >= c.n_layer:
            raise HFFormatError(f"{source}: {hf} — the model has {c.n_layer} blocks (h.0 .. h.{c.n_layer - 1})")
        out_f, in_f = shapes[kind]
        if a.shape[1] != in_f or b.shape[0] != out_f:
            raise HFFormatError(f"{source}: {hf} has lora_A {a.shape} and lora_B {b.shape}, but this model's {kind} "
                                f"maps {in_f} -> {out_f} (lora_A (R, {in_f}), lora_B ({out_f}, R)); an adapter for "
                                "another model size?")
        if kind != "attn.c_attn":
            ours[f"blocks.{i}.{OURS_OF[kind]}"] = (a, b, s, mag)
            continue
        parts = split_c_attn(a, b, (layout or {}).get(hf))
        for n, p in enumerate("qkv"):
            m_p = None if mag is None else mag[n * d:(n + 1) * d]
            path = f"blocks.{i}.attn.{p}"
            if p in parts:
                ours[path] = (*parts[p], s, m_p)
            elif bias_travels(f"{path}.bias") or (m_p is not None and not np.allclose(
                    m_p / row_norms(params[f"{path}.weight"].data, np.float64), 1.0, rtol=0, atol=1e-12)):
                # a zero update, but its trained bias or magnitude belongs to the adapter
                ours[path] = (a[:1], np.zeros((d, 1), dtype=b.dtype), s, m_p)
    return ours, our_biases


def split_c_attn(lora_A, lora_B, parts=None) -> dict:
    """A c_attn LoRA (A (R, d), B (3d, R)) as {"q": (A_q, B_q), "k": ..., "v": ...}: ΔW_q = B_q A_q, etc.

    ``parts`` ({"q": [start, stop], ...}, the columns ``save_peft_adapter`` gave each part, kept in
    the file's metadata) is used when B is zero outside those blocks (so an untrained q, v adapter
    comes back as q, v); otherwise, or without it, the layout is read from B: each of q, k, v gets
    the rows of the shared A that its row block of B reads (the columns of that block that are not
    all zero); a block that is all zero while another is not is left out. When every block is zero
    (an untrained adapter: PEFT starts B at 0), each gets the whole A.
    """
    d = lora_B.shape[0] // 3
    blocks = {p: lora_B[n * d:(n + 1) * d] for n, p in enumerate("qkv")}
    spans = _layout(parts, lora_B.shape[1])
    if spans:
        declared = np.zeros(lora_B.shape, dtype=bool)
        for p, (lo, hi) in spans.items():
            n = "qkv".index(p)
            declared[n * d:(n + 1) * d, lo:hi] = True
        if not np.any(lora_B[~declared]):  # B agrees with the recorded layout (PEFT did not train it further)
            return {p: (lora_A[lo:hi], blocks[p][:, lo:hi]) for p, (lo, hi) in spans.items()}
    used = {p: np.flatnonzero(np.any(blk != 0, axis=0)) for p, blk in blocks.items()}
    if not any(len(u) for u in used.values()):
        return {p: (lora_A, blk) for p, blk in blocks.items()}
    return {p: (lora_A[used[p]], blk[:, used[p]]) for p, blk in blocks.items() if len(used[p])}


def _layout(parts, R: int) -> dict:
    """``parts`` as {part: (lo, hi)} if it is a valid layout of R columns (disjoint spans of q, k, v), else {}."""
    if not isinstance(parts, dict) or not parts:
        return {}
    spans, used = {}, np.zeros(R, dtype=bool)
    for p, span in parts.items():
        if p not in ("q", "k", "v") or not isinstance(span, list) or len(span) != 2 \
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in span):
            return {}
        lo, hi = span
        if not 0 <= lo < hi <= R or used[lo:hi].any():
            return {}
        used[lo:hi] = True
        spans[p] = (lo, hi)
    return spans


def _our_biases(model: GPT, biases: dict, source: str) -> dict:
    """PEFT's stored biases {"h.N.attn.c_attn": array} -> {our bias name: array}, checked against ``model``."""
    d = model.config.d_model
    our_biases = {}
    for hf, v in biases.items():
        parts = hf.split(".")
        if hf == "ln_f":
            names = {"ln_f.bias": v}
        elif parts[2:] == ["attn", "c_attn"]:
            names = {f"blocks.{parts[1]}.attn.{p}.bias": v[n * d:(n + 1) * d] for n, p in enumerate("qkv")}
        else:
            kind = ".".join(parts[2:])
            names = {f"blocks.{parts[1]}.{({'ln_1': 'ln1', 'ln_2': 'ln2'}.get(kind) or OURS_OF.get(kind, kind))}.bias": v}
        our_biases.update(names)
    params = dict(model.named_parameters())
    for n, v in our_biases.items():
        if n not in params or tuple(params[n].shape) != tuple(v.shape) or not np.isfinite(v).all():
            raise HFFormatError(f"{source}: the bias for {n} ({tuple(np.shape(v))}) does not fit this model")
    return our_biases


def load_peft_adapter(path, model: GPT, adapter_name: str = "default") -> str:
    """Load a PEFT LoRA adapter for GPT-2 into ``model`` as adapter ``adapter_name``, made active.

    ``c_attn`` of any rank: its shared A goes to q, k and v with their row blocks of B (a block
    of B that is all zero while others are not leaves that layer unadapted, and only the rows of
    A that a block reads are kept, so an adapter written by ``save_peft_adapter`` comes back as it
    was; the q/k/v columns it records in the file's metadata are used when B agrees with them, so an
    untrained q, v adapter comes back as q, v, not q, k, v). ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``, ``use_rslora``, ``rank_pattern`` and
    ``alpha_pattern`` are read. minilora gives one adapter one LoRAConfig, so a module of smaller
    rank is padded with zero rows of A and zero columns of B (they contribute exactly 0 and their
    gradients are exactly 0), and a module of another scaling has the ratio folded into its B.
    DoRA (``use_dora``) is read with its magnitudes (c_attn's split by rows; a q/k/v part whose B
    block is zero but whose magnitude is not W0's row norm stays adapted), as a LoRAConfig with
    ``use_dora=True, dora_detach_norm=True`` (PEFT's backward). The result gives PEFT's logits.
    PEFT's trained biases (``bias`` "lora_only" / "all") become the adapter's own Δb = b_PEFT − b
    (``<module>.lora_bias.<adapter>``); the model's base biases are not changed.
    A PiSSA adapter (``init_lora_weights="pissa"``: A and B trained on PEFT's residual of W0) becomes
    the plain rank-2R LoRA on the model's W0 that PEFT's own conversion gives (``pissa_as_lora``).
    Tensors are converted to the model's dtype. Everything is checked before the model changes;
    what minilora cannot represent (other PEFT types, lora_bias, modules_to_save, ...) raises naming it.
    """
    _check_loadable(model, adapter_name)
    cfg, modules, biases = read_peft_adapter(path)
    source = os.fspath(path)
    if cfg.get("init_lora_weights") == "pissa":  # A and B act on PEFT's residual: make them a LoRA on W0
        weights = _hf_weights(model, modules)
        modules = {**modules, **pissa_as_lora({hf: m for hf, m in modules.items() if hf in weights}, weights)}
    ours, our_biases = _split(model, modules, biases, source, cfg.get(LAYOUT_KEY))
    config, scaling = _imported_config(model, cfg, ours, source)
    dtype = np.dtype(model.wte.weight.dtype)
    padded = _padded(ours, config.r, scaling, dtype, source)
    bias_deltas = _bias_deltas(model, our_biases, config, ours, adapter_name, source)
    # ---- every check passed: now change the model
    lora.apply_lora(model, config, adapter_name=adapter_name, activate=False)
    layers = dict(lora.lora_layers(model))
    for p, (A, B, mag) in padded.items():
        layer = layers[p]
        layer.lora_A[adapter_name].data[...] = bk.asarray(A, dtype=dtype, backend=layer.weight.backend)
        layer.lora_B[adapter_name].data[...] = bk.asarray(B, dtype=dtype, backend=layer.weight.backend)
        if mag is not None:
            layer.lora_magnitude[adapter_name].data[...] = bk.asarray(mag, dtype=dtype, backend=layer.weight.backend)
    params = dict(model.named_parameters())
    for n, delta in bias_deltas.items():  # the base biases stay as they are
        params[n].data[...] = bk.asarray(delta, dtype=params[n].dtype, backend=params[n].backend)
    lora.set_adapter(model, adapter_name)
    return adapter_name


def _check_loadable(model: GPT, adapter_name: str) -> None:
    """``model`` can take a new adapter ``adapter_name``: a minilora GPT, a free valid name, nothing merged."""
    if not isinstance(model, GPT):
        raise TypeError(f"load_peft_adapter loads into a minilora GPT, got {type(model).__name__}")
    check_adapter_name(adapter_name)
    if adapter_name in lora.list_adapters(model):
        raise ValueError(f"the model already has an adapter {adapter_name!r}; pick another adapter_name or "
                         f"lora.delete_adapter(model, {adapter_name!r}) first")
    merged = [p for p, layer in lora.lora_layers(model) if layer.merged]
    if merged:
        raise ValueError(f"cannot load adapter {adapter_name!r} while adapters are merged (e.g. {merged[0]}); "
                         "call lora.unmerge(model) first")


def _imported_config(model: GPT, cfg: dict, ours: dict, source: str) -> tuple:
    """(the LoRAConfig of the imported adapter, its scaling): the largest rank, the most common scaling."""
    rslora = bool(cfg.get("use_rslora", False))
    r = max(a.shape[0] for a, _, _, _ in ours.values())
    (scaling, _), = Counter(s for _, _, s, _ in ours.values()).most_common(1)
    dora = bool(cfg.get("use_dora"))
    kinds = sorted({p.split(".", 2)[2] for p in ours})
    every_block = all(f"blocks.{i}.{k}" in ours for i in range(model.config.n_layer) for k in kinds)
    config = lora.LoRAConfig(r=r, alpha=peft_alpha(scaling, r, rslora), use_rslora=rslora,
                             target_modules=tuple(kinds) if every_block else tuple(sorted(ours)),
                             dropout=float(cfg.get("lora_dropout", 0.0) or 0.0), bias=cfg.get("bias", "none"),
                             # PEFT treats DoRA's row norms as constants in the backward (DoRA paper, Sec. 4.3)
                             **({"use_dora": True, "dora_detach_norm": True} if dora else {}))
    try:
        lora.resolve_targets(model, config)
    except ValueError as exc:
        raise HFFormatError(f"{source}: the adapter does not fit this model: {exc}") from None
    return config, scaling


def _padded(ours: dict, r: int, scaling: float, dtype, source: str) -> dict:
    """{our layer: (A (r, in), B (out, r), magnitude)} in ``dtype``: a smaller rank padded with zeros, another
    scaling folded into B; a matrix that overflows ``dtype`` raises."""
    padded = {}
    for p, (a, b, s, mag) in ours.items():
        A = np.zeros((r, a.shape[1]), dtype=np.float64)
        B = np.zeros((b.shape[0], r), dtype=np.float64)
        A[:a.shape[0]] = a
        B[:, :b.shape[1]] = b if s == scaling else b.astype(np.float64) * (s / scaling)
        A, B = A.astype(dtype), B.astype(dtype)
        if not (np.isfinite(A).all() and np.isfinite(B).all()):
            raise HFFormatError(f"{source}: the LoRA matrices of {p} overflow in {dtype}")
        padded[p] = (A, B, None if mag is None else mag.astype(dtype))
    return padded


def _bias_deltas(model: GPT, our_biases: dict, config, ours: dict, adapter_name: str, source: str) -> dict:
    """{<module>.lora_bias.<adapter>: Δb = b_PEFT − b}: PEFT trained b itself, minilora keeps b frozen."""
    params = dict(model.named_parameters())
    bias_deltas = {}
    for n, v in our_biases.items():
        base = params[n]
        delta = (np.asarray(v, dtype=np.float64) - np.asarray(bk.to_numpy(base.data), dtype=np.float64)).astype(base.dtype)
        if not delta.any():
            continue
        module = n[:-len(".bias")]
        if not (config.bias == "all" or module in ours):
            raise HFFormatError(f"{source}: a trained bias for {n}, which adapter {adapter_name!r} does not adapt "
                                f"(bias = {config.bias!r})")
        if not np.isfinite(delta).all():
            raise HFFormatError(f"{source}: the trained bias of {n} minus the model's overflows in {base.dtype}")
        bias_deltas[f"{module}.lora_bias.{adapter_name}"] = delta
    return bias_deltas
