"""Hugging Face GPT-2 directories in and out: ``config.json`` + safetensors, read and written with NumPy.

    model = load_gpt2("path/to/gpt2-dir")      # a GPT like any other (every parameter trainable)
    save_gpt2("out-dir", model)                # GPT2LMHeadModel.from_pretrained("out-dir") gives equal logits

The two layouts differ only in packaging, not in arithmetic:

    Hugging Face (Conv1D: weight (in, out), y = x W + b)      minilora (Linear: weight (out, in), y = x Wᵀ + b)
    h.{i}.attn.c_attn  (d, 3d) = [Wq | Wk | Wv]               blocks.{i}.attn.q / .k / .v   (d, d) each
    h.{i}.attn.c_proj  (d, d)                                 blocks.{i}.attn.o
    h.{i}.mlp.c_fc     (d, 4d)                                blocks.{i}.mlp.fc    (4d, d)
    h.{i}.mlp.c_proj   (4d, d)                                blocks.{i}.mlp.proj  (d, 4d)
    h.{i}.ln_1 / ln_2, ln_f, wte, wpe                         blocks.{i}.ln1 / ln2, ln_f, wte, wpe
    lm_head (tied to wte)                                     the head is tied to wte

Nothing here imports torch or transformers, and no file is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from safetensors import safe_open

from .. import backend as bk
from ..io import FileFormatError, save_json, save_safetensors
from ..quant import check_not_quantized
from ..models.gpt import GPT, GPTConfig

__all__ = ["HFFormatError", "load_gpt2", "read_safetensors", "resolve_dir", "save_gpt2", "to_hf_state", "from_hf_state"]

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# GELU with the tanh approximation under its two Hugging Face names (the same formula)
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")
_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # old checkpoints store the causal mask


class HFFormatError(FileFormatError):
    """A Hugging Face directory or file minilora cannot read exactly (it says which field or tensor)."""


# ----------------------------------------------------------------------------- finding files
def resolve_dir(path, cache_dir=None, what: str = "GPT-2 directory") -> str:
    """A local directory, or a hub name (``"gpt2"``) found in the local Hugging Face cache (never downloads)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise HFFormatError(f"{path} is a file; a Hugging Face {what} is a folder (config.json + *.safetensors)")
    if os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path:
        raise FileNotFoundError(f"{path}: no such folder")  # a path, not a hub name such as 'gpt2' or 'org/name'
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"{path}: no such folder. (A hub name such as 'gpt2' is looked up in the local Hugging Face cache "
            "when huggingface_hub is installed; it is not.)"
        ) from None
    try:
        return snapshot_download(path, local_files_only=True, cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 (LocalEntryNotFoundError, HFValidationError, ...)
        raise FileNotFoundError(
            f"{path}: no such folder, and not in the local Hugging Face cache ({type(exc).__name__}). minilora never "
            f"downloads; fetch it once with `huggingface-cli download {path}` (or transformers' from_pretrained)"
        ) from None


def no_pickles(folder: str, wanted: str) -> None:
    pickles = [p for p in _PICKLES if os.path.exists(os.path.join(folder, p))]
    if pickles:
        raise HFFormatError(
            f"{folder} holds only {pickles[0]} (a pickle, which minilora never unpickles: loading one can run "
            f"code) and no {wanted}. Convert it once with transformers: python -c \"from transformers import "
            f"AutoModelForCausalLM as M; M.from_pretrained('{folder}').save_pretrained('{folder}')\" "
            "(save_pretrained writes safetensors)"
        )
    raise HFFormatError(f"{folder}: no {wanted} (expected {WEIGHTS} or {INDEX} next to config.json)")


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "U8": np.uint8, "I8": np.int8, "BOOL": np.bool_}


def read_safetensors(path) -> dict:
    """{name: NumPy array} of a safetensors file; BF16 becomes float32 (exactly); any flaw names the file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise HFFormatError(f"{path}: no such file")
    out = {}
    try:
        with safe_open(path, framework="numpy") as f:
            names = list(f.keys())
            bf16 = [n for n in names if f.get_slice(n).get_dtype() == "BF16"]
            for name in names:
                if name not in bf16:
                    out[name] = f.get_tensor(name)
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own types: truncated file, bad header)
        raise HFFormatError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    if bf16:  # NumPy has no bfloat16: read the raw 16 bits and put them on top of a float32
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
            for name in bf16:
                start, end = header[name]["data_offsets"]
                fh.seek(8 + n + start)
                raw = np.frombuffer(fh.read(end - start), dtype="<u2").astype(np.uint32) << 16
                out[name] = raw.view(np.float32).reshape(header[name]["shape"])
    return out


def _read_weights(folder: str) -> dict:
    single, index = os.path.join(folder, WEIGHTS), os.path.join(folder, INDEX)
    if os.path.exists(single):
        return read_safetensors(single)
    if not os.path.exists(index):
        no_pickles(folder, "safetensors weights")
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HFFormatError(f"{index}: not a safetensors index with a 'weight_map' ({exc})") from None
    arrays = {}
    for shard in sorted(set(weight_map.values())):
        part = read_safetensors(os.path.join(folder, shard))
        arrays.update({k: v for k, v in part.items() if weight_map.get(k) == shard})
    missing = sorted(set(weight_map) - set(arrays))
    if missing:
        raise HFFormatError(f"{index}: the index lists {missing[:3]} but their shards do not hold them")
    return arrays


# ----------------------------------------------------------------------------- config
def read_json_object(folder: str, name: str, what: str) -> tuple[str, dict]:
    """(path, object) of the JSON file ``name`` in ``folder``; missing, unreadable or not an object raises.

    ``what`` names the folder in the error of a missing file ("a PEFT adapter folder").
    """
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        raise HFFormatError(f"{folder}: no {name} ({what} has one)")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as exc:
        raise HFFormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise HFFormatError(f"{path}: expected a JSON object")
    return path, obj


def gpt_config_from_hf(cfg: dict, source: str = "config.json", dropout: float = 0.0) -> GPTConfig:
    """GPTConfig for a GPT-2 ``config.json``; a field minilora cannot represent raises, naming it."""
    def bad(field, value, why):
        raise HFFormatError(f"{source}: {field} = {value!r} — {why}")

    if cfg.get("model_type", "gpt2") != "gpt2":
        bad("model_type", cfg.get("model_type"), "minilora reads GPT-2 checkpoints only (model_type 'gpt2')")
    for field in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        if not isinstance(cfg.get(field), int) or isinstance(cfg.get(field), bool) or cfg[field] < 1:
            bad(field, cfg.get(field), "a GPT-2 config needs a positive integer here")
    d = cfg["n_embd"]
    act = cfg.get("activation_function", "gelu_new")
    if act not in _GELU_TANH:
        bad("activation_function", act, "minilora's MLP uses GELU with the tanh approximation ('gelu_new') only")
    if cfg.get("n_inner") not in (None, 4 * d):
        bad("n_inner", cfg.get("n_inner"), f"minilora's MLP width is 4·n_embd = {4 * d}")
    checks = (("scale_attn_by_inverse_layer_idx", False, "minilora scales attention scores by 1/√head_dim only"),
              ("reorder_and_upcast_attn", False, "minilora does not reorder or upcast the attention product"),
              ("scale_attn_weights", True, "minilora always scales attention scores by 1/√head_dim"),
              ("add_cross_attention", False, "minilora's GPT has no cross-attention"),
              ("tie_word_embeddings", True, "minilora's LM head is tied to wte (an untied head cannot be loaded)"))
    for field, wanted, why in checks:
        if field in cfg and cfg[field] != wanted:
            bad(field, cfg[field], why)
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        bad("layer_norm_epsilon", eps, "needs a number > 0")
    if d % cfg["n_head"]:
        bad("n_head", cfg["n_head"], f"n_embd = {d} must be divisible by it")
    return GPTConfig(vocab_size=cfg["vocab_size"], block_size=cfg["n_positions"], n_layer=cfg["n_layer"],
                     n_head=cfg["n_head"], d_model=d, dropout=dropout, layer_norm_eps=float(eps))


def hf_config(model: GPT, base: dict | None = None) -> dict:
    """A GPT-2 ``config.json`` for ``model`` (fields of ``base``, e.g. token ids, kept where minilora has no say)."""
    c = model.config
    out = dict(base or {})
    for key in ("torch_dtype", "transformers_version", "n_ctx"):
        out.pop(key, None)
    out.update({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
        "n_positions": c.block_size, "n_embd": c.d_model, "n_layer": c.n_layer, "n_head": c.n_head,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": c.layer_norm_eps,
        # minilora drops out the embeddings and each residual branch, never the attention weights
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "add_cross_attention": False, "tie_word_embeddings": True, "use_cache": True,
        "dtype": str(np.dtype(model.wte.weight.dtype)),
    })
    out.setdefault("initializer_range", 0.02)
    for key in ("bos_token_id", "eos_token_id"):  # keep them only if they are tokens of this vocabulary
        if not (isinstance(out.get(key), int) and 0 <= out[key] < c.vocab_size):
            out[key] = None
    return out


# ----------------------------------------------------------------------------- tensors
def from_hf_state(arrays: dict, cfg: GPTConfig, source: str) -> dict:
    """Hugging Face GPT-2 tensors ({name: array}, with or without ``transformer.``) -> minilora's state dict."""
    plain = {}
    head = None
    for key, a in arrays.items():
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if name == "lm_head.weight":
            head = a
        elif not _BUFFER.match(name):
            plain[name] = a
    d, L = cfg.d_model, cfg.n_layer
    shapes = {"wte.weight": (cfg.vocab_size, d), "wpe.weight": (cfg.block_size, d),
              "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(L):
        shapes.update({f"h.{i}.ln_1.weight": (d,), f"h.{i}.ln_1.bias": (d,), f"h.{i}.ln_2.weight": (d,),
                       f"h.{i}.ln_2.bias": (d,), f"h.{i}.attn.c_attn.weight": (d, 3 * d),
                       f"h.{i}.attn.c_attn.bias": (3 * d,), f"h.{i}.attn.c_proj.weight": (d, d),
                       f"h.{i}.attn.c_proj.bias": (d,), f"h.{i}.mlp.c_fc.weight": (d, 4 * d),
                       f"h.{i}.mlp.c_fc.bias": (4 * d,), f"h.{i}.mlp.c_proj.weight": (4 * d, d),
                       f"h.{i}.mlp.c_proj.bias": (d,)})
    missing = [k for k in shapes if k not in plain]
    unexpected = [k for k in plain if k not in shapes]
    if missing or unexpected:
        raise HFFormatError(f"{source}: the tensors do not fit the GPT-2 of config.json (n_layer={L}, n_embd={d}): "
                            f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    for k, shape in shapes.items():
        if tuple(plain[k].shape) != shape:
            raise HFFormatError(f"{source}: {k} has shape {tuple(plain[k].shape)}, config.json implies {shape}")
        if not np.issubdtype(plain[k].dtype, np.floating):
            raise HFFormatError(f"{source}: {k} is {plain[k].dtype}, expected floating point")
        if not np.isfinite(plain[k]).all():
            raise HFFormatError(f"{source}: {k} holds NaN or inf values")
    if head is not None and not (head.shape == plain["wte.weight"].shape and np.array_equal(head, plain["wte.weight"])):
        raise HFFormatError(f"{source}: lm_head.weight differs from wte.weight (an untied head); minilora's head "
                            "is tied to the token embedding")
    state = {"wte.weight": plain["wte.weight"], "wpe.weight": plain["wpe.weight"],
             "ln_f.weight": plain["ln_f.weight"], "ln_f.bias": plain["ln_f.bias"]}
    for i in range(L):
        h, b = f"h.{i}", f"blocks.{i}"
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            state[f"{b}.{ours}.weight"] = plain[f"{h}.{theirs}.weight"]
            state[f"{b}.{ours}.bias"] = plain[f"{h}.{theirs}.bias"]
        w, bias = plain[f"{h}.attn.c_attn.weight"], plain[f"{h}.attn.c_attn.bias"]
        for n, part in enumerate("qkv"):  # columns [0:d] are q, [d:2d] k, [2d:3d] v; Conv1D (in, out) -> (out, in)
            state[f"{b}.attn.{part}.weight"] = w[:, n * d:(n + 1) * d].T
            state[f"{b}.attn.{part}.bias"] = bias[n * d:(n + 1) * d]
        for ours, theirs in (("attn.o", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            state[f"{b}.{ours}.weight"] = plain[f"{h}.{theirs}.weight"].T
            state[f"{b}.{ours}.bias"] = plain[f"{h}.{theirs}.bias"]
    return state


def to_hf_state(model: GPT, prefix: str = "transformer.") -> dict:
    """minilora's base weights -> Hugging Face GPT-2 tensors (contiguous host arrays, the model's dtype).

    LoRA matrices are not included; the weights are written as they are (a merged adapter is in them),
    except that an unmerged PiSSA layer gives its original W₀, not the residual its weight holds
    (the PEFT export writes PiSSA as a LoRA on that original W₀).
    """
    params = {n: np.asarray(bk.to_numpy(p.data)) for n, p in model.named_parameters()}
    for path, module in model.named_modules():
        if getattr(module, "pissa_init", None) and not module.merged:
            params[f"{path}.weight"] = np.asarray(bk.to_numpy(module.base_weight()))
    out = {"wte.weight": params["wte.weight"], "wpe.weight": params["wpe.weight"],
           "ln_f.weight": params["ln_f.weight"], "ln_f.bias": params["ln_f.bias"]}
    for i in range(model.config.n_layer):
        h, b = f"h.{i}", f"blocks.{i}"
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[f"{h}.{theirs}.weight"] = params[f"{b}.{ours}.weight"]
            out[f"{h}.{theirs}.bias"] = params[f"{b}.{ours}.bias"]
        out[f"{h}.attn.c_attn.weight"] = np.concatenate([params[f"{b}.attn.{p}.weight"].T for p in "qkv"], axis=1)
        out[f"{h}.attn.c_attn.bias"] = np.concatenate([params[f"{b}.attn.{p}.bias"] for p in "qkv"])
        for ours, theirs in (("attn.o", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            out[f"{h}.{theirs}.weight"] = params[f"{b}.{ours}.weight"].T
            out[f"{h}.{theirs}.bias"] = params[f"{b}.{ours}.bias"]
    return {prefix + k: np.ascontiguousarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- public
def load_gpt2(path, dtype="float32", dropout: float = 0.0, cache_dir=None) -> GPT:
    """A GPT from a Hugging Face GPT-2 folder (``config.json`` + ``model.safetensors`` or a sharded index).

    path: a folder, or a hub name (``"gpt2"``) already in the local Hugging Face cache (needs
    huggingface_hub; nothing is downloaded). dtype: the model's dtype ("float32", "float64"), or
    None for the file's own (bfloat16 / float16 files become float32). dropout: minilora's one
    dropout rate (embeddings and residual branches); GPT-2's ``*_pdrop`` are not carried over, as
    minilora has no attention dropout. Every parameter is trainable, as after ``GPT(config)``.
    """
    folder = resolve_dir(path, cache_dir)
    cfg_path, cfg_json = read_json_object(folder, "config.json", "a Hugging Face model folder")
    cfg = gpt_config_from_hf(cfg_json, cfg_path, dropout=dropout)
    state = from_hf_state(_read_weights(folder), cfg, folder)
    if dtype is None:
        found = np.result_type(*[a.dtype for a in state.values()])
        dtype = "float64" if found == np.float64 else "float32"
    model = GPT(cfg, init_weights=False)  # every weight is loaded next (strict load_state_dict)
    model.to(dtype=dtype)
    model.load_state_dict(state, source=folder)
    model.hf_config = cfg_json  # save_gpt2 keeps its token ids and other fields minilora does not use
    return model


def save_gpt2(path, model: GPT) -> str:
    """Write ``model`` as a Hugging Face GPT-2 folder: ``config.json`` + ``model.safetensors`` (atomic writes).

    ``GPT2LMHeadModel.from_pretrained(path)`` gives the same logits. Tensors and the config's
    ``dtype`` are the model's own (a float64 model stays float64). The base weights are written as
    they are — LoRA matrices are not (export those with ``save_peft_adapter``, or ``lora.merge``
    first to fold them in).
    """
    if not isinstance(model, GPT):
        raise TypeError(f"save_gpt2 writes a minilora GPT, got {type(model).__name__}")
    check_not_quantized(model, f"save_gpt2({os.fspath(path)!r})")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = to_hf_state(model)
    save_safetensors(os.path.join(path, WEIGHTS), tensors, {"format": "pt"})
    save_json(os.path.join(path, "config.json"), hf_config(model, getattr(model, "hf_config", None)))
    return path


def dora_magnitude(magnitudes: dict, module: str, rows: int, weights: str, config: str):
    """A PEFT DoRA module's magnitude m: one finite value per output row, else HFFormatError naming the file."""
    if module not in magnitudes:
        raise HFFormatError(f"{weights}: {config} says use_dora, but {module} has no lora_magnitude_vector")
    key, magnitude = magnitudes[module]
    if magnitude.shape != (rows,) or not np.isfinite(magnitude).all():
        raise HFFormatError(f"{weights}: {key} has shape {tuple(magnitude.shape)}; DoRA needs one finite magnitude "
                            f"per output row of {module}, ({rows},)")
    return magnitude
