"""PEFT LoRA adapters for GPT-2, in and out: ``adapter_config.json`` + ``adapter_model.safetensors``.

    save_peft_adapter("adapter-dir", model, adapter_name="e2e")   # PeftModel.from_pretrained(hf_gpt2, "adapter-dir")
    load_peft_adapter("adapter-dir", model, adapter_name="peft")  # (hf.peft_import) a PEFT adapter, made active

The one real difference: Hugging Face's GPT-2 computes q, k and v with ONE fused layer,
``c_attn`` (d → 3d). LoRA on minilora's q and v (rank r each, scaling s) is exactly one LoRA
on ``c_attn`` of rank 2r whose A stacks A_q over A_v and whose B is block-structured:

    c_attn rows  0:d  (q):  [ B_q   0  ]        B A = [ B_q A_q ]
    c_attn rows  d:2d (k):  [  0    0  ]              [    0    ]
    c_attn rows 2d:3d (v):  [  0   B_v ]              [ B_v A_v ]

with PEFT's scaling lora_alpha / (2r) (or / √(2r) under rsLoRA) set equal to s. ``o`` maps
to ``attn.c_proj``, ``fc`` to ``mlp.c_fc``, ``proj`` to ``mlp.c_proj`` (same rank r). PEFT
stores A as (R, in) and B as (out, R), the orientation minilora uses, so only the packing differs.
DoRA's magnitudes are per output row, so c_attn's (3d,) vector is [m_q; m_k; m_v].
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter

import numpy as np

from .. import backend as bk
from .. import lora
from ..io import save_json, save_safetensors
from ..lora.bias import bias_hosts
from ..models.gpt import GPT
from .checkpoint import to_hf_state

_IMPORT_HALF = {"load_peft_adapter", "matching_pattern", "peft_weights_file", "pissa_as_lora", "read_peft_adapter",
                "split_c_attn"}
__all__ = ["save_peft_adapter", "hf_to_ours", "host_array", "peft_alpha", "row_norms", *sorted(_IMPORT_HALF)]

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# safetensors metadata minilora adds (PEFT ignores it): which columns of each c_attn LoRA are q, k, v
LAYOUT_KEY = "minilora_c_attn_parts"
HF_OF = {"attn.o": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}  # and q, k, v -> attn.c_attn
OURS_OF = {v: k for k, v in HF_OF.items()}
_OUR_PATH = re.compile(r"^blocks\.(\d+)\.(attn\.[qkvo]|mlp\.fc|mlp\.proj)$")
PEFT_LORA_KEY = re.compile(r"^h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.lora_([AB])(?:\.[A-Za-z0-9_\-]+)?\.weight$")
PEFT_MAGNITUDE_KEY = re.compile(r"^h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.lora_magnitude_vector"
                            r"(?:\.[A-Za-z0-9_\-]+)?(?:\.weight)?$")
PEFT_BIAS_KEY = re.compile(r"^(h\.\d+\.(?:ln_1|ln_2|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)|ln_f)\.bias$")
# PEFT inits that leave W0 as it is (A and B in the file are the whole adapter); "pissa" is converted on load
KEEPS_BASE = ("gaussian", "eva", "orthogonal")


def host_array(a) -> np.ndarray:
    """A host NumPy array of ``a`` (a copy only where it lives on a GPU)."""
    return np.asarray(bk.to_numpy(a))


def peft_alpha(scaling: float, r: int, rslora: bool) -> float:
    """PEFT's lora_alpha that gives ``scaling`` at rank r: α/r, or α/√r under rsLoRA."""
    return scaling * (math.sqrt(r) if rslora else r)


# ----------------------------------------------------------------------------- export
def save_peft_adapter(path, model: GPT, adapter_name: str = "default", base_model_name_or_path: str | None = None) -> str:
    """Write adapter ``adapter_name`` of ``model`` as a PEFT LoRA adapter folder for Hugging Face's GPT-2.

    ``PeftModel.from_pretrained(GPT2LMHeadModel, path)`` then gives minilora's logits. q/k/v
    adapters of one block become one ``c_attn`` LoRA of rank (number of adapted q/k/v) × r: A
    stacked, B block-structured, ``lora_alpha`` chosen so PEFT's scaling equals minilora's α/r
    (α/√r under rsLoRA); ``o``, ``fc``, ``proj`` become ``attn.c_proj``, ``mlp.c_fc``,
    ``mlp.c_proj``. Modules of another rank or scaling get ``rank_pattern`` / ``alpha_pattern``
    entries. Biases trained with the adapter (``LoRAConfig.bias``) are written as PEFT writes them:
    PEFT trains b itself, so each is base b + the adapter's own Δb (``<module>.lora_bias.<adapter>``).
    A DoRA adapter (``use_dora``, in every layer it adapts) adds ``lora_magnitude_vector`` per
    module: c_attn's is [m_q; m_k; m_v], with W0's own row norms for a part that is not adapted
    (then m / ‖W0‖ = 1 there). PEFT treats DoRA's norm as a constant in the backward
    (``dora_detach_norm=True`` here); the forward and the merge are the same either way.

    A PiSSA adapter (``init="pissa"``, trained on the residual W_res = W₀ − s·B₀·A₀) is written as
    PEFT writes one converted with ``path_initial_model_for_weight_conversion``: a plain LoRA of
    rank 2r on the original W₀, A′ = [A ; A₀], B′ = [B | −B₀], the same scaling (so
    ``PeftModel.from_pretrained`` on the original base gives minilora's logits; ``save_gpt2``
    writes that original W₀).

    The export is exact for inference and for merging (``merge_and_unload``). Training it further
    inside PEFT trains the whole c_attn block — its zero blocks and the k rows too — a superset
    of minilora's structure on q and v.
    """
    layers, configs, dora = _exported_layers(model, adapter_name)
    modules = _hf_modules(layers, configs, adapter_name, dora)
    tensors, ranks, layout = _peft_tensors(model, modules, dora, rslora=configs[0].use_rslora)
    bias = configs[0].bias
    if bias != "none":
        for key, a in _trained_biases(model, adapter_name).items():
            module = key[len(PREFIX):-len(".bias")]
            if bias == "all" or module in modules:
                # PEFT keeps an adapted layer's own bias on its wrapped ``base_layer``
                tensors[f"{PREFIX}{module}.base_layer.bias" if module in modules else key] = a
    config = _peft_config(model, modules, ranks, configs[0], dora, base_model_name_or_path)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    metadata = {"format": "pt", **({LAYOUT_KEY: json.dumps(layout, sort_keys=True)} if layout else {})}
    save_safetensors(os.path.join(path, WEIGHTS), tensors, metadata)
    save_json(os.path.join(path, CONFIG), config)
    return path


def _exported_layers(model: GPT, adapter_name: str) -> tuple[list, list, bool]:
    """The (path, layer) pairs adapter ``adapter_name`` adapts, their LoRAConfigs and whether it is DoRA, checked."""
    if not isinstance(model, GPT):
        raise TypeError(f"save_peft_adapter exports adapters of a minilora GPT, got {type(model).__name__}")
    layers = [(p, layer) for p, layer in lora.lora_layers(model) if adapter_name in layer.lora_A]
    if not layers:
        raise ValueError(f"the model has no adapter {adapter_name!r}; its adapters are {lora.list_adapters(model)}")
    configs = [layer.lora_config[adapter_name] for _, layer in layers]
    dora = {bool(getattr(cfg, "use_dora", False)) for cfg in configs}
    if len(dora) > 1:
        raise ValueError(f"adapter {adapter_name!r} is DoRA in some layers and plain LoRA in others; a PEFT adapter is "
                         "one or the other (use_dora applies to all its modules)")
    dora = dora.pop()
    for (p, layer), cfg in zip(layers, configs):
        if dora and adapter_name in layer.merged_adapters:
            raise ValueError(f"{p}: DoRA adapter {adapter_name!r} is merged into the weight; lora.unmerge(model) first")
        if not _OUR_PATH.match(p):
            raise ValueError(f"{p}: adapter {adapter_name!r} adapts a layer with no GPT-2 counterpart "
                             "(expected blocks.N.attn.q/k/v/o or blocks.N.mlp.fc/proj)")
    return layers, configs, dora


def _hf_modules(layers: list, configs: list, adapter_name: str, dora: bool) -> dict:
    """{HF module path: [(our part, A, B, scaling, DoRA magnitude or None)]}; PiSSA as a rank-2r LoRA on W0."""
    modules = {}
    for (p, layer), cfg in zip(layers, configs):
        i, part = _OUR_PATH.match(p).groups()
        hf = f"transformer.h.{i}." + ("attn.c_attn" if part in ("attn.q", "attn.k", "attn.v") else HF_OF[part])
        a = host_array(layer.lora_A[adapter_name].data)
        b = host_array(layer.lora_B[adapter_name].data)
        m = host_array(layer.lora_magnitude[adapter_name].data) if dora else None
        if cfg.init == "pissa":  # W_res + s·B·A = W0 + s·[B | −B0]·[A ; A0]: a plain rank-2r LoRA on the original W0
            if adapter_name not in layer.pissa_init:
                raise ValueError(f"{p}: PiSSA adapter {adapter_name!r} has no record of A0, B0, so it cannot be "
                                 "converted to a LoRA on the original W0")
            a0, b0, _ = layer.pissa_init[adapter_name]
            a = np.concatenate([a, host_array(a0)], axis=0)
            b = np.concatenate([b, -host_array(b0)], axis=1)
        modules.setdefault(hf, []).append((part, a, b, cfg.scaling, m))
    return modules


def _peft_tensors(model: GPT, modules: dict, dora: bool, rslora: bool) -> tuple[dict, dict, dict]:
    """PEFT's tensors of ``modules``, {HF module: (rank, lora_alpha)} and the q/k/v columns of each c_attn."""
    tensors, ranks, layout = {}, {}, {}
    for hf, members in modules.items():
        if hf.endswith("c_attn"):
            lora_A, lora_B, scaling, magnitude = _c_attn_lora(model, hf, members, dora, layout)
        else:
            (_, lora_A, lora_B, scaling, magnitude), = members
        if dora:
            tensors[f"{PREFIX}{hf}.lora_magnitude_vector"] = np.ascontiguousarray(magnitude)
        tensors[f"{PREFIX}{hf}.lora_A.weight"] = np.ascontiguousarray(lora_A)
        tensors[f"{PREFIX}{hf}.lora_B.weight"] = np.ascontiguousarray(lora_B)
        ranks[hf] = (lora_A.shape[0], peft_alpha(scaling, lora_A.shape[0], rslora))
    return tensors, ranks, layout


def _c_attn_lora(model: GPT, hf: str, members: list, dora: bool, layout: dict) -> tuple:
    """One c_attn LoRA (A stacked, B block-structured, the first part's scaling, [m_q; m_k; m_v]) from its q/k/v parts.

    The columns each part gets are recorded in ``layout`` ({"h.N.attn.c_attn": {"q": [lo, hi], ...}}).
    """
    d = model.config.d_model
    members.sort(key=lambda m: "qkv".index(m[0][-1]))
    scaling = members[0][3]
    lora_A = np.concatenate([m[1] for m in members], axis=0)  # (R, d): A_q over A_v ...
    lora_B = np.zeros((3 * d, lora_A.shape[0]), dtype=lora_A.dtype)  # block-structured (3d, R)
    col = 0
    for part, a, b, s, _ in members:
        row = "qkv".index(part[-1]) * d
        # another scaling in the same block is folded into its B (exact up to one rounding)
        lora_B[row:row + d, col:col + a.shape[0]] = b if s == scaling else b * (s / scaling)
        layout.setdefault(hf[len("transformer."):], {})[part[-1]] = [col, col + a.shape[0]]
        col += a.shape[0]
    magnitude = None
    if dora:  # a row's magnitude; q, k, v not adapted keep W0's row norms (m / ‖W0‖ = 1)
        own = {m[0][-1]: m[4] for m in members}
        params = dict(model.named_parameters())
        parts = [own[p] if p in own else row_norms(params[hf_to_ours(hf, p) + ".weight"].data, lora_A.dtype)
                 for p in "qkv"]
        magnitude = np.concatenate(parts)
    return lora_A, lora_B, scaling, magnitude


def _peft_config(model: GPT, modules: dict, ranks: dict, first, dora: bool, base_model_name_or_path) -> dict:
    """adapter_config.json: the most common (rank, alpha) as r and lora_alpha, the others as patterns."""
    counts = Counter(ranks.values())  # the most common (rank, alpha) is the default; ties: the smaller rank
    r, alpha = max(counts, key=lambda ra: (counts[ra], -ra[0]))
    rank_pattern = {re.escape(hf): R for hf, (R, _) in ranks.items() if R != r}
    alpha_pattern = {re.escape(hf): a for hf, (_, a) in ranks.items() if a != alpha}
    kinds = sorted({hf.split(".", 3)[3] for hf in modules})
    every_block = all(f"transformer.h.{i}.{k}" in modules for i in range(model.config.n_layer) for k in kinds)
    targets = kinds if every_block else sorted(modules)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": int(r), "lora_alpha": float(alpha),
        "lora_dropout": float(first.dropout), "target_modules": targets, "fan_in_fan_out": True,
        "bias": first.bias, "use_rslora": bool(first.use_rslora), "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "init_lora_weights": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "use_dora": dora,
    }


def _hf_bias_slot(name: str, d: int) -> tuple:
    """Our bias name -> (its HF GPT-2 bias "h.N.attn.c_attn.bias", the slice of it): q, k, v share c_attn's."""
    if name == "ln_f.bias":
        return "ln_f.bias", slice(None)
    _, i, part = name[:-len(".bias")].split(".", 2)  # "blocks", "3", "attn.q"
    if part in ("attn.q", "attn.k", "attn.v"):
        n = "qkv".index(part[-1])
        return f"h.{i}.attn.c_attn.bias", slice(n * d, (n + 1) * d)
    return f"h.{i}.{({'ln1': 'ln_1', 'ln2': 'ln_2'}.get(part) or HF_OF[part])}.bias", slice(None)


def _trained_biases(model: GPT, adapter_name: str) -> dict:
    """Every HF bias as the adapter trained it: base b + the adapter's own Δb (``lora.bias``), PEFT's keys.

    PEFT trains the bias itself, so its file holds b + Δb; minilora's base b stays frozen.
    """
    state = to_hf_state(model, prefix=PREFIX + "transformer.")
    out = {k: np.array(a, copy=True) for k, a in state.items() if k.endswith(".bias")}  # never a view of the model
    for path, _, deltas in bias_hosts(model):
        if adapter_name in deltas:
            key, rows = _hf_bias_slot(f"{path}.bias", model.config.d_model)
            out[PREFIX + "transformer." + key][rows] += host_array(deltas[adapter_name].data)
    return out


def hf_to_ours(hf: str, part: str) -> str:
    """"transformer.h.3.attn.c_attn", "k" -> "blocks.3.attn.k"."""
    return f"blocks.{hf.split('.')[2]}.attn.{part}"


def row_norms(weight, dtype) -> np.ndarray:
    """‖W‖ of each row (over the inputs), in float64, as DoRA's magnitude starts."""
    w = np.asarray(bk.to_numpy(weight), dtype=np.float64)
    return np.sqrt(np.sum(w * w, axis=1)).astype(dtype)


def __getattr__(name):
    """The import half lives in ``peft_import`` (which reads this module's format): its names answer here too."""
    if name in _IMPORT_HALF:
        from . import peft_import  # noqa: PLC0415  (at call time: peft_import imports this module)

        return getattr(peft_import, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
