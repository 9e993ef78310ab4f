"""The paper's Sec. 7 analyses of any PEFT LoRA adapter on linear layers, whatever the architecture.

    report = analyze_adapter("llama-adapter", against="llama-adapter-seed1", base="llama-hf")
    print_report(report); write_figure(report, "out/analyze.png")   # from minilora.hf.analyze_output

Llama, Mistral, Qwen2, Gemma, Phi or GPT-2: a PEFT LoRA folder is ``adapter_config.json`` plus
``adapter_model.safetensors`` holding, per adapted module ``M``, ``M.lora_A.weight`` (r, in) and
``M.lora_B.weight`` (out, r), so ΔW = s·B·A in the (out, in) orientation of a Linear weight, with
s = lora_alpha / r (lora_alpha / √r under rsLoRA; ``rank_pattern`` and ``alpha_pattern`` give a
module its own r and alpha). Nothing else about the model is needed, so nothing here knows one:

- per matrix: the shape, r, s, ‖ΔW‖_F and the singular values of ΔW from the r × r core
  (``analysis.low_rank_svd``; the d × k product is never formed), and the share of ‖ΔW‖² in the
  top-k directions (``analysis.energy_share``, ``effective_rank``);
- ``against``: φ(A₁, A₂, i, j) of Sec. 7.2 for the modules both adapters adapt (Figs. 3 and 4);
- ``base``: W₀ read by tensor name from the base model's safetensors (one file or a sharded
  index), one tensor at a time, for the amplification ‖ΔW‖_F / ‖UᵀW₀Vᵀ‖_F of Table 7. A Linear
  stores W₀ as (out, in); with ``fan_in_fan_out`` (GPT-2's Conv1D) the file holds (in, out).

DoRA adds the magnitude m per output row; an init that rewrote W₀ (PiSSA, OLoRA, CorDA, LoftQ)
is named in the report, since s·B·A is then measured against that rewritten base. Whatever
cannot be read exactly raises ``HFFormatError`` naming the file and the field or tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
from safetensors import safe_open

from ..analysis import (effective_rank, energy_share, low_rank_amplification, low_rank_svd,
                        subspace_similarity_grid)
from ..lora.dora import dora_weight
from .checkpoint import INDEX, HFFormatError, no_pickles, dora_magnitude, read_json_object, read_safetensors, resolve_dir
from .checkpoint import WEIGHTS as BASE_WEIGHTS
from .peft import CONFIG, PREFIX
from .peft_import import matching_pattern, peft_weights_file

__all__ = ["AdaptedMatrix", "BaseWeights", "LoRAFolder", "REWRITES_BASE", "analyze_adapter", "analyze_matrix",
           "complete_row", "read_lora_adapter", "summarize"]

REWRITES_BASE = ("pissa", "olora", "corda", "loftq")  # PEFT inits that replace W0 by a residual
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[A-Za-z0-9_\-]+)?\.weight$")
_MAGNITUDE = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.[A-Za-z0-9_\-]+)?(?:\.weight)?$")
_EMBEDDING = re.compile(r"^(?P<module>.+)\.lora_embedding_[AB](?:\.[A-Za-z0-9_\-]+)?$")
_BF16_CHUNK = 1 << 20  # bfloat16 values converted at a time
_LAYER = re.compile(r"\.(\d+)\.")  # the first numbered component: layers.N, h.N, blocks.N
# PEFT options whose update is not s·B·A of one (r, in) A and one (out, r) B
_NOT_PLAIN = (("use_qalora", "QA-LoRA (A reads pooled inputs)"),
              ("target_parameters", "LoRA on parameters (target_parameters)"),
              ("kasa_config", "KaSA (a learnable diagonal between A and B)"), ("use_bdlora", "BD-LoRA"),
              ("monteclora_config", "MonteCLoRA (Monte Carlo sampling on the adapters)"))
# attention before the MLP within a layer; other names follow, alphabetically
_KIND_ORDER = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "o_proj", "dense", "out_proj",
               "c_proj", "gate_proj", "up_proj", "gate_up_proj", "fc1", "c_fc", "down_proj", "fc2")


# ----------------------------------------------------------------------------- the adapter
@dataclass(frozen=True)
class AdaptedMatrix:
    """One adapted linear layer: ΔW = scaling · lora_B @ lora_A, of shape (out, in)."""

    module: str  # "model.layers.3.self_attn.q_proj", the name inside the model PEFT wrapped
    layer: int | None  # 3: the first numbered component of the name (None for lm_head and the like)
    kind: str  # "self_attn.q_proj": the name after the layer number
    lora_A: np.ndarray  # (r, in)
    lora_B: np.ndarray  # (out, r)
    scaling: float
    magnitude: np.ndarray | None = None  # DoRA: m (out,)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.lora_B.shape[0]), int(self.lora_A.shape[1])


@dataclass
class LoRAFolder:
    """A PEFT LoRA folder as read: its config, and its matrices by module name."""

    folder: str
    config: dict
    matrices: dict  # {module: AdaptedMatrix}, attention before the MLP, layer by layer
    skipped: list = field(default_factory=list)  # tensors that are not LoRA matrices (biases, modules_to_save)

    @property
    def init(self):
        return self.config.get("init_lora_weights", True)

    @property
    def rewrites_base(self) -> bool:
        return isinstance(self.init, str) and self.init.lower().startswith(REWRITES_BASE)


def _where(module: str) -> tuple[int | None, str]:
    m = _LAYER.search(f".{module}.")
    if not m:
        return None, module
    return int(m.group(1)), f".{module}."[m.end():].strip(".") or module


def module_order(module: str):
    layer, kind = _where(module)
    last = kind.rsplit(".", 1)[-1]
    return (layer if layer is not None else math.inf, last not in _KIND_ORDER,
            _KIND_ORDER.index(last) if last in _KIND_ORDER else 0, kind)


def read_lora_adapter(path) -> LoRAFolder:
    """Read and check a PEFT LoRA folder on linear layers, any architecture: json + safetensors only.

    Refusals (``HFFormatError``) name the file and the field: a ``peft_type`` other than LORA, an
    option whose update is not s·B·A (QA-LoRA, target_parameters, ...), a folder with only
    ``adapter_model.bin``, a lora_A without its lora_B (or the reverse), a LoRA on an embedding or
    a convolution, a rank that ``r`` / ``rank_pattern`` contradicts, a DoRA magnitude missing or of
    the wrong length. Biases and ``modules_to_save`` copies are listed in ``skipped``.
    """
    folder = resolve_dir(path, what="PEFT adapter folder")
    cfg_path, cfg = read_json_object(folder, CONFIG, "a PEFT adapter folder")
    r, alpha, patterns = _check_lora_config(cfg_path, cfg)
    dora = bool(cfg.get("use_dora", False))
    weights = peft_weights_file(folder)
    arrays = read_safetensors(weights)  # an adapter is small: A and B of every module
    pairs, magnitudes, skipped = _sort_tensors(weights, arrays, cfg)
    matrices = {module: _adapted_matrix(weights, cfg_path, cfg, module, pairs[module], r, alpha, patterns, magnitudes)
                for module in sorted(pairs, key=module_order)}
    orphans = sorted(set(magnitudes) - set(matrices)) if dora else sorted(magnitudes)
    if orphans:
        raise HFFormatError(f"{weights}: {magnitudes[orphans[0]][0]} "
                            + ("has no lora_A / lora_B" if dora else f"is a DoRA magnitude, but {cfg_path} has no use_dora"))
    return LoRAFolder(folder, cfg, matrices, sorted(skipped))


def _check_lora_config(cfg_path: str, cfg: dict) -> tuple[int, float, dict]:
    """A LoRA whose update is s·B·A: (r, lora_alpha, {"rank_pattern": ..., "alpha_pattern": ...}), else HFFormatError."""
    if cfg.get("peft_type") != "LORA":
        raise HFFormatError(f"{cfg_path}: peft_type = {cfg.get('peft_type')!r}; analyze reads LoRA adapters "
                            "(peft_type 'LORA', ΔW = s·B·A) only")
    for name, what in _NOT_PLAIN:
        if cfg.get(name):
            raise HFFormatError(f"{cfg_path}: {name} = {cfg[name]!r} — {what}: its update is not s·B·A of one "
                                "(r, in) lora_A and one (out, r) lora_B, which is what analyze reads")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise HFFormatError(f"{cfg_path}: r = {r!r}; expected an integer >= 1")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise HFFormatError(f"{cfg_path}: lora_alpha = {alpha!r}; expected a number > 0")
    patterns = {}
    for name in ("rank_pattern", "alpha_pattern"):
        value = cfg.get(name) or {}
        if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                                  for v in value.values()):
            raise HFFormatError(f"{cfg_path}: {name} = {value!r}; expected {{module pattern: positive number}}")
        patterns[name] = value
    return r, alpha, patterns


def _sort_tensors(weights: str, arrays: dict, cfg: dict) -> tuple[dict, dict, list]:
    """The file's tensors by role: {module: {"A"/"B": (key, array)}}, {module: (key, m)}, skipped keys."""
    pairs, magnitudes, skipped = {}, {}, []
    extras = [str(m) for m in (cfg.get("modules_to_save") or [])]
    for key, array in arrays.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        lora_key, magnitude_key = _LORA.match(name), _MAGNITUDE.match(name)
        if _EMBEDDING.match(name):
            raise HFFormatError(f"{weights}: {key} — a LoRA on an embedding, not on a linear layer; analyze reads "
                                "LoRA on linear layers (remove the embedding from target_modules)")
        if lora_key:
            pairs.setdefault(lora_key["module"], {})[lora_key["part"]] = (key, array)
        elif magnitude_key:
            magnitudes[magnitude_key["module"]] = (key, array)
        elif name.endswith(".bias") or any(f".{m}." in f".{name}" for m in extras):
            skipped.append(key)  # a trained bias (bias, lora_bias) or a fully trained copy (modules_to_save)
        else:
            raise HFFormatError(f"{weights}: {key} — neither a lora_A / lora_B weight, a DoRA lora_magnitude_vector, "
                                "a bias nor a modules_to_save tensor")
    if not pairs:
        raise HFFormatError(f"{weights}: no LoRA matrices (no <module>.lora_A.weight / .lora_B.weight tensors)")
    return pairs, magnitudes, skipped


def _adapted_matrix(weights: str, cfg_path: str, cfg: dict, module: str, parts: dict, r: int, alpha: float,
                    patterns: dict, magnitudes: dict) -> AdaptedMatrix:
    """One module's A, B, scaling (its own r and alpha from the patterns) and DoRA magnitude, checked."""
    if set(parts) != {"A", "B"}:
        (have, (key, _)), = parts.items()
        raise HFFormatError(f"{weights}: {key} has no lora_{'B' if have == 'A' else 'A'} partner; a LoRA module "
                            "needs both lora_A (r, in) and lora_B (out, r)")
    (key_a, a), (key_b, b) = parts["A"], parts["B"]
    for key, x in ((key_a, a), (key_b, b)):
        if x.ndim != 2:
            raise HFFormatError(f"{weights}: {key} has shape {tuple(x.shape)}; analyze reads LoRA on linear layers "
                                "(2-D lora_A (r, in) and lora_B (out, r)), not on convolutions")
        if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
            raise HFFormatError(f"{weights}: {key} ({x.dtype}) is not a finite float matrix")
    R = a.shape[0]
    if b.shape[1] != R:
        raise HFFormatError(f"{weights}: {key_a} {tuple(a.shape)} and {key_b} {tuple(b.shape)} disagree on the "
                            "rank (lora_A is (r, in), lora_B (out, r))")
    rank_key = matching_pattern(patterns["rank_pattern"], module)
    expected = patterns["rank_pattern"][rank_key] if rank_key is not None else r
    if R != expected:
        which = f"rank_pattern[{rank_key!r}] = {expected}" if rank_key is not None else f"r = {r}"
        raise HFFormatError(f"{weights}: {key_a} has rank {R}, but {cfg_path} gives {module} {which}")
    alpha_key = matching_pattern(patterns["alpha_pattern"], module)
    module_alpha = float(patterns["alpha_pattern"][alpha_key] if alpha_key is not None else alpha)
    rslora = bool(cfg.get("use_rslora", False))
    magnitude = dora_magnitude(magnitudes, module, b.shape[0], weights, cfg_path) if cfg.get("use_dora", False) else None
    layer, kind = _where(module)
    return AdaptedMatrix(module, layer, kind, a, b, module_alpha / (math.sqrt(R) if rslora else R), magnitude)


# ----------------------------------------------------------------------------- the base weights
def _read_tensor(path: str, name: str) -> np.ndarray:
    """One tensor of a safetensors file (BF16 becomes float32, exactly); the others are not read."""
    try:
        with safe_open(path, framework="numpy") as f:
            if f.get_slice(name).get_dtype() != "BF16":
                return f.get_tensor(name)
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own types: truncated file, bad header)
        raise HFFormatError(f"{path}: {name} is not readable ({type(exc).__name__}: {exc})") from None
    with open(path, "rb") as fh:  # NumPy has no bfloat16: the raw 16 bits become the top half of a float32
        n = int.from_bytes(fh.read(8), "little")
        info = json.loads(fh.read(n))[name]
        start, end = info["data_offsets"]
        fh.seek(8 + n + start)
        count = (end - start) // 2
        out = np.zeros(count, dtype="<u4")
        for lo in range(0, count, _BF16_CHUNK):  # in chunks: the float32 result is the only full-size array
            hi = min(lo + _BF16_CHUNK, count)
            out[lo:hi] = np.fromfile(fh, dtype="<u2", count=hi - lo)
            out[lo:hi] <<= 16
    return out.view("<f4").astype(np.float32, copy=False).reshape(info["shape"])


class BaseWeights:
    """A Hugging Face model folder's weights, read by name one tensor at a time (never the whole model).

    ``model.safetensors`` or ``model.safetensors.index.json`` with its shards; only the headers are
    read up front, so a 7-billion-parameter base costs the memory of the one matrix being analysed.
    """

    def __init__(self, path):
        self.folder = resolve_dir(path, what="base model folder")
        single, index = os.path.join(self.folder, BASE_WEIGHTS), os.path.join(self.folder, INDEX)
        self.files, self.shapes = {}, {}
        if os.path.exists(single):
            self.source, shards = single, None
        elif os.path.exists(index):
            self.source = index
            try:
                with open(index, encoding="utf-8") as f:
                    shards = json.load(f)["weight_map"]
                if not isinstance(shards, dict):
                    raise TypeError("weight_map is not an object")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise HFFormatError(f"{index}: not a safetensors index with a 'weight_map' ({exc})") from None
        else:
            no_pickles(self.folder, "safetensors weights")
        for file in ([single] if shards is None else sorted({os.path.join(self.folder, s) for s in shards.values()})):
            try:
                with safe_open(file, framework="numpy") as f:
                    for name in f.keys():
                        if shards is None or os.path.join(self.folder, shards.get(name, "")) == file:
                            self.files[name], self.shapes[name] = file, tuple(f.get_slice(name).get_shape())
            except Exception as exc:  # noqa: BLE001
                raise HFFormatError(f"{file}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
        if shards is not None:
            missing = sorted(set(shards) - set(self.files))
            if missing:
                raise HFFormatError(f"{index}: the weight_map lists {missing[0]}, but {shards[missing[0]]} does not hold it")

    def name_of(self, module: str) -> str | None:
        """The tensor of ``module``'s weight: "M.weight", or with leading parts of M dropped (a bare model's names)."""
        parts = module.split(".")
        for n in range(len(parts)):
            name = ".".join(parts[n:]) + ".weight"
            if name in self.files:
                return name
        return None

    def check(self, matrix: AdaptedMatrix, fan_in_fan_out: bool = False) -> str:
        """The tensor name of W₀ for ``matrix``, after checking its shape; a missing or misfit tensor raises."""
        out_f, in_f = matrix.shape
        name = self.name_of(matrix.module)
        if name is None:
            raise HFFormatError(f"{self.source}: no tensor {matrix.module}.weight (the base weight W0 of the adapter's "
                                f"{matrix.module}); is {self.folder} the model the adapter was trained on?")
        expected = (in_f, out_f) if fan_in_fan_out else (out_f, in_f)
        if self.shapes[name] != expected:
            layout = "(in, out), as fan_in_fan_out says" if fan_in_fan_out else "(out, in), as a Linear stores it"
            raise HFFormatError(f"{self.files[name]}: {name} has shape {self.shapes[name]}, but the adapter's "
                                f"{matrix.module} maps {in_f} -> {out_f}, so W0 is {expected} {layout}; "
                                "an adapter for another model?")
        return name

    def read(self, matrix: AdaptedMatrix, fan_in_fan_out: bool = False) -> np.ndarray:
        """W₀ (out, in) of ``matrix`` in the file's dtype (a transposed view under ``fan_in_fan_out``)."""
        name = self.check(matrix, fan_in_fan_out)
        w = _read_tensor(self.files[name], name)
        if not np.issubdtype(w.dtype, np.floating):
            raise HFFormatError(f"{self.files[name]}: {name} is {w.dtype}, not a float matrix (a quantized base? "
                                "analyze needs the float weights)")
        return w.T if fan_in_fan_out else w


# ----------------------------------------------------------------------------- one matrix
def _magnitude_stats(m) -> dict:
    m = np.asarray(m, dtype=np.float64)
    return {"norm": float(np.linalg.norm(m)), "min": float(m.min()), "mean": float(m.mean()), "max": float(m.max())}


def _row_blocks(W0, block_elements: int = 1 << 16):
    """(rows, W0[rows] in float64) for blocks of about ``block_elements`` entries, in ONE reused buffer.

    W0 is never copied whole, and only one block exists at a time: a consumer must not keep a block.
    """
    block_rows = max(1, block_elements // max(1, W0.shape[1]))
    buffer = np.empty((min(block_rows, W0.shape[0]), W0.shape[1]))
    for start in range(0, W0.shape[0], block_rows):
        rows = slice(start, min(start + block_rows, W0.shape[0]))
        block = buffer[:rows.stop - rows.start]
        block[...] = W0[rows]
        yield rows, block


def _dora_change(matrix: AdaptedMatrix, W0) -> tuple[float, np.ndarray]:
    """‖W′ − W₀‖_F for DoRA's W′ = m ⊙ V / ‖V‖_row, V = W₀ + s·B·A, and m / ‖V‖_row; in row blocks."""
    a, b = np.asarray(matrix.lora_A, np.float64), np.asarray(matrix.lora_B, np.float64)
    m = np.asarray(matrix.magnitude, np.float64)
    total, ratios = 0.0, []
    for rows, w in _row_blocks(W0):
        V = w + matrix.scaling * (b[rows] @ a)  # (block, in)
        total += float(np.sum((dora_weight(V, m[rows]) - w) ** 2))
        ratios.append(m[rows] / np.sqrt(np.sum(V * V, axis=1)))
    return math.sqrt(total), np.concatenate(ratios)


def complete_row(row: dict, scaling: float, layer=None, kind=None) -> dict:
    """Add what every row reports beside its spectrum: layer, kind, scaling, energy shares, k for 90 %."""
    if layer is None and kind is None:
        layer, kind = _where(row["matrix"])
    sv = row["singular_values"]
    row.update(layer=layer, kind=kind, scaling=float(scaling),
               energy_share=[float(x) for x in energy_share(sv, row["norm_delta_W"])],
               rank_90=effective_rank(sv, 0.9, row["norm_delta_W"]))
    return row


def analyze_matrix(matrix: AdaptedMatrix, W0=None, other_A=None) -> dict:
    """One row of the report: shape, r, scaling, ‖ΔW‖_F, σ(ΔW), energy shares; amplification with W₀; φ with A₂.

    ``W0`` (out, in), any float dtype or a transposed view, is read in row blocks. For DoRA the
    spectrum is that of the direction's update s·B·A; the magnitude m is reported beside it, and
    with W₀ the whole change ‖m ⊙ V/‖V‖_row − W₀‖_F and the row factors m / ‖V‖_row.
    """
    _, sv, _ = low_rank_svd(matrix.lora_B, matrix.lora_A, matrix.scaling)
    row = {"matrix": matrix.module, "shape": list(matrix.shape), "r": int(matrix.lora_A.shape[0]),
           "update": "s·B·A", "norm_delta_W": float(np.linalg.norm(sv)), "singular_values": [float(x) for x in sv]}
    complete_row(row, matrix.scaling, matrix.layer, matrix.kind)
    if matrix.magnitude is not None:
        row["update"] = "DoRA: direction s·B·A (magnitude m apart)"
        row["magnitude"] = _magnitude_stats(matrix.magnitude)
    if W0 is not None:
        row["norm_W"] = math.sqrt(sum(float(np.vdot(w, w)) for _, w in _row_blocks(W0)))
        row["amplification"] = low_rank_amplification(matrix.lora_B, matrix.lora_A, matrix.scaling, W0)
        if matrix.magnitude is not None:
            change, ratio = _dora_change(matrix, W0)
            row["norm_weight_change"] = change  # ‖W′ − W₀‖_F: the magnitude's part and the direction's
            row["magnitude"]["ratio_to_row_norm"] = _magnitude_stats(ratio)
    if other_A is not None:
        grid = subspace_similarity_grid(matrix.lora_A, other_A)
        row["phi_grid"] = grid.tolist()
        row["phi_1_1"], row["phi_r_r"] = float(grid[0, 0]), float(grid[-1, -1])
    return row


# ----------------------------------------------------------------------------- the whole adapter
def _describe_init(adapter: LoRAFolder) -> str | None:
    init = adapter.init
    if adapter.rewrites_base:
        return (f"init_lora_weights = {init!r} rewrote the base: W0 became W0 minus the part that A and B started "
                "from, so s·B·A is the change against that rewritten base (pass it as --base), not against the "
                "original W0")
    if init not in (True, None):
        return f"init_lora_weights = {init!r}"
    return None


def analyze_adapter(adapter, against=None, base=None) -> dict:
    """The Sec. 7 report of a PEFT LoRA folder (any architecture): config, notes, rows and summaries.

    ``base`` (a model folder) gives W₀ for the amplification; without it the folder named by the
    adapter's ``base_model_name_or_path`` is used when it is at hand. ``against`` (a second PEFT
    folder) gives φ for the modules the two share. Every base tensor is checked (name and shape,
    from the headers) before any is read.
    """
    folder = read_lora_adapter(adapter)
    cfg, notes = folder.config, []
    other = read_lora_adapter(against) if against else None
    weights, where = None, None
    if base:
        weights = BaseWeights(base)
    elif cfg.get("base_model_name_or_path"):
        try:
            weights = BaseWeights(cfg["base_model_name_or_path"])
        except (FileNotFoundError, HFFormatError) as exc:
            notes.append(f"no base weights: base_model_name_or_path {cfg['base_model_name_or_path']!r} is not at hand "
                         f"({str(exc).split(';')[0]}); pass --base for the amplification")
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    if weights is not None:
        for matrix in folder.matrices.values():
            weights.check(matrix, fan_in_fan_out)
        where = weights.folder
    described = _describe_init(folder)
    if described:
        notes.append(described)
    if folder.skipped:
        notes.append(f"not analysed (not LoRA matrices): {', '.join(folder.skipped[:4])}"
                     + (f" and {len(folder.skipped) - 4} more" if len(folder.skipped) > 4 else ""))
    if other is not None:
        shared = [m for m in folder.matrices if m in other.matrices]
        if not shared:
            notes.append(f"{against} adapts none of this adapter's modules: no φ")
        elif len(shared) < len(folder.matrices):
            notes.append(f"φ for the {len(shared)} of {len(folder.matrices)} modules that {against} adapts too")
        for m in shared:
            k1, k2 = folder.matrices[m].lora_A.shape[1], other.matrices[m].lora_A.shape[1]
            if k1 != k2:
                raise HFFormatError(f"{against}: {m} reads {k2} inputs, but in {adapter} it reads {k1}; φ compares "
                                    "adapters of the same base model")
    rows = []
    for module, matrix in folder.matrices.items():
        W0 = weights.read(matrix, fan_in_fan_out) if weights is not None else None
        other_A = other.matrices[module].lora_A if other is not None and module in other.matrices else None
        rows.append(analyze_matrix(matrix, W0, other_A))
        del W0  # one base matrix at a time
    config = {k: cfg.get(k) for k in ("r", "lora_alpha", "use_rslora", "use_dora", "init_lora_weights",
                                      "fan_in_fan_out", "rank_pattern", "alpha_pattern", "base_model_name_or_path")}
    return {"adapter": os.fspath(adapter), "against": os.fspath(against) if against else None, "base": where,
            "kind": "PEFT", "config": config, "notes": notes, "rows": rows,
            "summary": {"by_kind": summarize(rows, "kind"), "by_layer": summarize(rows, "layer")}}


def _mean(values):
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def summarize(rows, by: str) -> list[dict]:
    """Rows grouped by ``"kind"`` or ``"layer"``: how many matrices, and the mean of each figure."""
    groups = {}
    for row in rows:
        groups.setdefault(row[by], []).append(row)
    keys = sorted(groups, key=lambda k: (k is None, k if by == "layer" else module_order(f"x.0.{k}")))
    out = []
    for key in keys:
        g = groups[key]
        out.append({by: key, "matrices": len(g), "norm_delta_W": _mean([r["norm_delta_W"] for r in g]),
                    "top1_share": _mean([r["energy_share"][0] if r["energy_share"] else None for r in g]),
                    "rank_90": _mean([r["rank_90"] for r in g]),
                    "amplification": _mean([r.get("amplification") for r in g]),
                    "phi_1_1": _mean([r.get("phi_1_1") for r in g])})
    return out
