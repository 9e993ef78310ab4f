"""The Hugging Face commands of the CLI: ``export``, ``import-peft``, ``analyze`` and ``finetune --base``.

    minilora export --adapter e2e.safetensors --to-peft e2e-peft --base-to-hf base-hf
    minilora import-peft some-peft-adapter --base gpt2-dir --out adapter.safetensors
    minilora analyze e2e-peft --against other-adapter.safetensors --base base-hf
    minilora finetune --base gpt2-dir --text notes.txt --r 4 --targets q,v --steps 100 --batch-size 1

``analyze`` runs the paper's Sec. 7 analyses on any adapter, minilora's or PEFT's: per adapted
matrix the singular values of ΔW = s·B·A (for PiSSA and DoRA the real change of the weight,
W − W0, from the base weights: see ``analysis.weight_change``), the amplification factor ‖ΔW‖_F / ‖UᵀWVᵀ‖_F of
Table 7 (when the base weights are at hand) and, with ``--against``, the subspace similarity φ
of Sec. 7.2 between the two adapters' A matrices; a table on stdout, means by module kind and by
depth, a PNG and a JSON file. GPT-2 adapters (minilora's files, GPT-2 PEFT folders) are read into
minilora's q, k, v, o, fc, proj; a PEFT folder for any other architecture (Llama, Mistral, Qwen2,
Gemma, Phi, ...) is read by tensor name alone, its base one tensor at a time (``hf.analyze``).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from safetensors import safe_open

from .. import backend as bk
from .. import lora
from ..analysis import amplification_factor, low_rank_svd, subspace_similarity_grid, weight_change
from ..io import save_json
from ..lora.config import check_adapter_name
from ..lora.files import AdapterFileError, read_adapter
from ..models import load_base
from ..recipes import finetune_text
from .checkpoint import HFFormatError, load_gpt2, save_gpt2
from .analyze import REWRITES_BASE, analyze_adapter, complete_row, summarize
from .analyze_output import print_report, write_figure
from .peft import PEFT_BIAS_KEY, PEFT_LORA_KEY, PEFT_MAGNITUDE_KEY
from .peft import LAYOUT_KEY, OURS_OF, save_peft_adapter
from .peft_import import load_peft_adapter, read_peft_adapter, split_c_attn
from .peft import PREFIX as PEFT_PREFIX
from .peft import WEIGHTS as PEFT_WEIGHTS
from .tokenizer import load_tokenizer

__all__ = ["add_finetune_flags", "add_parsers", "adapter_updates", "check_output_folder", "cmd_analyze", "cmd_export",
           "cmd_finetune_text", "cmd_import_peft", "weight_change"]


# ----------------------------------------------------------------------------- base models
def _load_base(base, dtype="float32"):
    """``--base``: a Hugging Face GPT-2 folder or cached hub name; none: the shipped base model."""
    if base:
        return load_gpt2(base, dtype=dtype)
    return load_base(dtype=dtype)


# ----------------------------------------------------------------------------- export / import
def cmd_export(args) -> int:
    if not (args.to_peft or args.base_to_hf):
        raise ValueError("say what to write: --to-peft DIR (the adapter) and/or --base-to-hf DIR (the base model)")
    if args.to_peft and not args.adapter:
        raise ValueError("--to-peft needs --adapter FILE (a minilora adapter file)")
    for flag, folder in (("--to-peft", args.to_peft), ("--base-to-hf", args.base_to_hf)):
        check_output_folder(flag, folder)  # before anything is written
    model = _load_base(args.base)
    name = lora.load_adapter(args.adapter, model) if args.to_peft else None  # in the file's dtype (float32)
    if args.float64:
        model.to(dtype="float64")
    if args.base_to_hf:
        save_gpt2(args.base_to_hf, model)  # the base weights W0 (LoRA matrices are not part of it)
        print(f"wrote the base model as a Hugging Face GPT-2 folder: {args.base_to_hf} "
              f"({os.path.getsize(os.path.join(args.base_to_hf, 'model.safetensors')) / 1e6:.2f} MB)")
    if args.to_peft:
        origin = args.base_to_hf or args.base
        save_peft_adapter(args.to_peft, model, adapter_name=name,
                          base_model_name_or_path=os.path.abspath(origin) if origin and os.path.isdir(origin) else origin)
        with open(os.path.join(args.to_peft, "adapter_config.json")) as f:
            cfg = json.load(f)
        print(f"wrote adapter {name!r} as a PEFT LoRA adapter: {args.to_peft} (target_modules {cfg['target_modules']}, "
              f"r {cfg['r']}, lora_alpha {cfg['lora_alpha']}, rank_pattern {cfg['rank_pattern'] or '{}'})")
    return 0


def check_output_folder(flag: str, folder) -> None:
    """``--flag DIR`` must be a folder or a path a folder can be made at: checked before the first write."""
    if not folder:
        return
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{flag} {folder}: is a file, not a folder; give a folder to write into")
    parent = os.path.dirname(os.path.abspath(folder))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {folder}: cannot create it: {parent} is not a writable folder")
    if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {folder}: the folder is not writable")


def cmd_import_peft(args) -> int:
    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out}: is a folder; give the adapter file to write, e.g. "
                         f"{os.path.join(args.out, 'adapter.safetensors')}")
    check_output_folder("--out", os.path.dirname(os.path.abspath(args.out)))
    base = args.base
    if not base:
        cfg, _, _ = read_peft_adapter(args.folder)
        named = cfg.get("base_model_name_or_path")
        if named:
            try:
                _load_base(named)
                base = named
            except (ValueError, FileNotFoundError):
                base = None
    model = _load_base(base)
    name = load_peft_adapter(args.folder, model, adapter_name=args.name)
    lora.save_adapter(args.out, model, adapter_name=name)
    cfg = lora.get_adapter_config(model, name)
    print(f"imported {args.folder} into {'the shipped base model' if not base else base}: adapter {name!r}, "
          f"r {cfg.r}, alpha {cfg.alpha}, targets {list(cfg.target_modules)}")
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.1f} kB)")
    return 0


# ----------------------------------------------------------------------------- analyze
def adapter_updates(path) -> tuple[dict, dict]:
    """{matrix: (A, B, scaling)} of a minilora adapter file or a PEFT folder, in minilora's names.

    A PEFT ``c_attn`` is split into q, k and v (``split_c_attn``). Also returns a small info dict
    (kind, name, base_model_name_or_path, init ("pissa" or not), and for DoRA ``magnitudes``
    {matrix: m}): for those two, s·B·A is not the change of the weight (see ``analysis.weight_change``).
    A file is read by ``lora.files.read_adapter`` (every check that needs no model), a folder by
    ``read_peft_adapter``.
    """
    path = os.fspath(path)
    return _peft_updates(path) if os.path.isdir(path) else _minilora_updates(path)


def _peft_updates(path: str) -> tuple[dict, dict]:
    cfg, modules, _ = read_peft_adapter(path)
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(REWRITES_BASE):
        raise HFFormatError(f"{path}: init_lora_weights = {init!r} rewrites the base weights, so s·B·A is not the "
                            "adapter's change of the original W0; analyze cannot rebuild that base from the folder")
    out, magnitudes = {}, {}
    for hf, (a, b, s, m) in sorted(modules.items(), key=lambda kv: (int(kv[0].split(".")[1]), kv[0])):
        i, kind = hf.split(".", 2)[1:]
        if kind == "attn.c_attn":
            d = b.shape[0] // 3
            for p, (a_p, b_p) in split_c_attn(a, b, (cfg.get(LAYOUT_KEY) or {}).get(hf)).items():
                out[f"blocks.{i}.attn.{p}"] = (a_p, b_p, s)
                if m is not None:  # c_attn's magnitude is [m_q; m_k; m_v]
                    n = "qkv".index(p)
                    magnitudes[f"blocks.{i}.attn.{p}"] = m[n * d:(n + 1) * d]
        else:
            out[f"blocks.{i}.{OURS_OF[kind]}"] = (a, b, s)
            if m is not None:
                magnitudes[f"blocks.{i}.{OURS_OF[kind]}"] = m
    return out, {"kind": "PEFT", "base": cfg.get("base_model_name_or_path"), "init": "kaiming",
                 "magnitudes": magnitudes if cfg.get("use_dora") else None}


def _minilora_updates(path: str) -> tuple[dict, dict]:
    arrays, meta, config = read_adapter(path)
    name = meta["adapter_name"]
    out, magnitudes = {}, {}
    for key in arrays:
        if key.endswith(f".lora_A.{name}"):
            layer = key[: -len(f".lora_A.{name}")]
            partners = [f"{layer}.lora_B.{name}"] + ([f"{layer}.lora_magnitude.{name}"] if config.use_dora else [])
            missing = [p for p in partners if p not in arrays]
            if missing:
                raise AdapterFileError(f"{path}: {key} has no {missing[0]} beside it; the file is corrupt or crafted")
            out[layer] = (arrays[key], arrays[partners[0]], config.scaling)
            if config.use_dora:
                magnitudes[layer] = arrays[partners[1]]
    return out, {"kind": "minilora", "name": name, "base": None, "init": config.init,
                 "magnitudes": magnitudes if config.use_dora else None}


def _row(name, a, b, s, weights, other, info=None):
    info = info or {}
    magnitude = (info.get("magnitudes") or {}).get(name)
    pissa = info.get("init") == "pissa"
    W = weights.get(name)
    fits = W is not None and W.shape == (b.shape[0], a.shape[1])
    row = {"matrix": name, "shape": [int(b.shape[0]), int(a.shape[1])], "r": int(a.shape[0])}
    if pissa or magnitude is not None:  # s·B·A is not the change of W0: form the real ΔW
        kind = ("DoRA " if magnitude is not None else "") + ("PiSSA" if pissa else "")
        if not fits:
            raise ValueError(f"{name}: a {kind.strip()} adapter changes W0 by "
                             + ("m·V/‖V‖_row − W0" if magnitude is not None else "s·B·A − U_r S_r V_rᵀ(W0)")
                             + ", not s·B·A; analyze needs this model's base weights W0 for it (pass --base)")
        delta = weight_change(a, b, s, W, "pissa" if pissa else "kaiming", magnitude)
        k = min(a.shape[0] * (1 if magnitude is not None else 2), min(W.shape))  # PiSSA: rank ≤ 2r
        sv = np.linalg.svd(delta, compute_uv=False)[:k]
        row.update(update=f"{kind.strip()}: W − W0" + (" (top r singular values of a full-rank ΔW)"
                                                       if magnitude is not None else " (rank ≤ 2r)"),
                   norm_delta_W=float(np.linalg.norm(delta)), singular_values=[float(x) for x in sv])
        row["amplification"] = amplification_factor(delta, W, k)
    else:
        _, sv, _ = low_rank_svd(b, a, s)
        row.update(update="s·B·A", norm_delta_W=float(np.linalg.norm(sv)), singular_values=[float(x) for x in sv])
        if fits:
            delta = s * (np.asarray(b, np.float64) @ np.asarray(a, np.float64))
            row["amplification"] = amplification_factor(delta, W, min(a.shape[0], min(W.shape)))
    if other is not None and name in other:
        grid = subspace_similarity_grid(a, other[name][0])
        row["phi_grid"] = grid.tolist()
        row["phi_1_1"], row["phi_r_r"] = float(grid[0, 0]), float(grid[-1, -1])
    return row


def _is_gpt2_adapter(path) -> bool:
    """A minilora adapter file, or a PEFT folder whose every tensor belongs to a GPT-2 c_attn / c_proj / c_fc."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return True
    weights = os.path.join(path, PEFT_WEIGHTS)
    if not os.path.exists(weights):
        return False
    try:
        with safe_open(weights, framework="numpy") as f:
            keys = list(f.keys())
    except Exception:  # noqa: BLE001 (an unreadable file: the reader names the fault)
        return False

    def gpt2(key):
        name = key.removeprefix(PEFT_PREFIX).removeprefix("transformer.")
        return bool(PEFT_LORA_KEY.match(name) or PEFT_MAGNITUDE_KEY.match(name)
                    or PEFT_BIAS_KEY.match(name.replace(".base_layer.bias", ".bias")))

    return bool(keys) and all(gpt2(k) for k in keys)


def _gpt2_report(args) -> dict:
    """The report of a minilora adapter file or a GPT-2 PEFT folder, in minilora's matrix names (q, k, v apart)."""
    updates, info = adapter_updates(args.adapter)
    other = adapter_updates(args.against)[0] if args.against else None
    weights, where = {}, None
    candidates = [args.base] if args.base else ([info["base"]] if info["base"] else []) + ([None] if info["kind"] == "minilora" else [])
    for base in candidates:
        try:
            model = _load_base(base, dtype="float64")
        except (ValueError, FileNotFoundError) as exc:
            if args.base:  # asked for: a base that does not load is an error, not "no base weights"
                raise ValueError(f"--base {args.base}: {exc}") from None
            continue
        weights = {n[: -len(".weight")]: np.asarray(bk.to_numpy(p.data)) for n, p in model.named_parameters()
                   if n.endswith(".weight")}
        where = base or "the shipped base model"
        break
    if args.base:
        misfits = [(n, b.shape[0], a.shape[1], None if n not in weights else weights[n].shape)
                   for n, (a, b, _) in updates.items() if n not in weights or weights[n].shape != (b.shape[0], a.shape[1])]
        if misfits:
            n, d, k, shape = misfits[0]
            raise ValueError(f"--base {args.base}: the adapter's {n} is {d}x{k} but the base "
                             + (f"has no {n}" if shape is None else f"holds a {shape[0]}x{shape[1]} weight there")
                             + f" ({len(misfits)} matrices do not fit): the adapter is for another model")
    rows = [complete_row(_row(n, a, b, s, weights, other, info), s) for n, (a, b, s) in updates.items()]
    notes = [] if info.get("init") in (None, "kaiming") else [
        f"init {info['init']!r}" + (": ΔW is W − W0 of the original W0, rebuilt from the base weights"
                                    if info["init"] == "pissa" else "")]
    if other is not None and not any("phi_grid" in r for r in rows):
        notes.append(f"{args.against} adapts none of this adapter's matrices: no φ")
    return {"adapter": args.adapter, "against": args.against, "base": where, "kind": info["kind"], "notes": notes,
            "rows": rows, "summary": {"by_kind": summarize(rows, "kind"), "by_layer": summarize(rows, "layer")}}


def cmd_analyze(args) -> int:
    """Sec. 7 on an adapter: GPT-2 (minilora's file or PEFT's folder) through the model, any other PEFT folder
    through its tensor names alone (``hf.analyze``)."""
    if _is_gpt2_adapter(args.adapter) and (not args.against or _is_gpt2_adapter(args.against)):
        report = _gpt2_report(args)
    else:
        report = analyze_adapter(args.adapter, against=args.against, base=args.base)
    print_report(report)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "analyze.json")
    save_json(json_path, report)
    png = write_figure(report, os.path.join(args.out, "analyze.png"))
    print(f"wrote {json_path}" + (f" and {png}" if png else " (no PNG: matplotlib is not installed)"))
    return 0


# ----------------------------------------------------------------------------- finetune --base --text
def cmd_finetune_text(args) -> int:
    """LoRA on a text file with the folder's tokenizer: the causal LM loss on every token (eq. 2).

    The training is ``recipes.finetune_text``: the optimizer, schedule and steps of a task fine-tune.
    """
    name = _check_text_flags(args)
    model = load_gpt2(args.base, dtype="float32")
    ids = _read_text_ids(args, load_tokenizer(args.base), model.config)

    def announce(adapted):
        print(f"{args.base}: {adapted.config.n_layer} layers, d {adapted.config.d_model}, {len(ids):,} tokens of "
              f"{args.text}; {lora.trainable_summary(adapted)}")

    run = finetune_text(model, ids, block_size=args.block_size or min(128, model.config.block_size),
                        adapter_name=name, r=args.r, alpha=args.alpha, targets=tuple(args.targets), steps=args.steps,
                        batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=not args.no_progress,
                        on_start=announce)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{name}.safetensors")
    lora.save_adapter(path, run.model, adapter_name=name)
    print(f"{len(run.history.steps)} steps in {run.history.seconds:.1f} s; held-out LM loss {run.loss_before:.4f} -> "
          f"{run.loss_after:.4f}")
    print(f"wrote {path} ({os.path.getsize(path) / 1e3:.1f} kB)")
    return untrained_exit(run.model, [name], run.history)


def _check_text_flags(args) -> str:
    """The flags of ``finetune --base HF_DIR --text FILE``, checked before anything is loaded: the adapter's name."""
    if not (args.base and args.text):
        raise ValueError("finetune on a text file needs both --base HF_DIR (a GPT-2 folder with its tokenizer) "
                         "and --text FILE")
    ignored = [flag for flag, given in (("--method full", getattr(args, "method", "lora") != "lora"),
                                        ("--joint", getattr(args, "joint", False)),
                                        ("--task", getattr(args, "task", None))) if given]
    if ignored:
        raise ValueError(f"{', '.join(ignored)}: not used with --base HF_DIR --text FILE, which trains one LoRA adapter "
                         "on the text; drop them (or drop --base/--text to fine-tune the shipped base on a task)")
    if args.block_size is not None and args.block_size < 1:
        raise ValueError(f"--block-size {args.block_size}: give a number of tokens >= 1")
    name = "text" if args.name is None else args.name
    try:
        check_adapter_name(name)
    except ValueError as exc:
        raise ValueError(f"--name: {exc}") from None
    check_output_folder("--out", args.out)
    return name


def _read_text_ids(args, tokenizer, config) -> np.ndarray:
    """The token ids of ``--text``, checked against the windows (``--block-size``) and the model's vocabulary."""
    try:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"--text {args.text}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the file as "
                         "UTF-8") from None
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    T = args.block_size or min(128, config.block_size)
    if T > config.block_size:
        raise ValueError(f"--block-size {T} is longer than the model's n_positions = {config.block_size}")
    if len(ids) < 2 * (T + 1):
        raise ValueError(f"{args.text}: {len(ids)} tokens, too short for windows of {T} tokens (need {2 * (T + 1)}); "
                         "use a longer text or a smaller --block-size")
    if int(ids.max()) >= config.vocab_size:
        raise ValueError(f"the tokenizer of {args.base} gives id {int(ids.max())}, outside the model's vocabulary "
                         f"of {config.vocab_size}")
    return ids


def untrained_exit(model, names, history=None) -> int:
    """0, or 1 with a warning on stderr when an adapter came out of training as it went in (``lora.adapter_unchanged``)."""
    same = [n for n in names if lora.adapter_unchanged(model, n)]
    if not same:
        return 0
    lrs = list(getattr(history, "lrs", None) or [])
    why = (f"the learning rate was 0 at every one of its {len(lrs)} step(s) (the warm-up starts at 0): train more steps"
           if lrs and not any(lrs) else "no step changed it (zero gradients or learning rate)")
    print(f"warning: adapter(s) {same} are unchanged from their initialisation (every B still at its start), so the "
          f"file computes the base model's outputs: {why}", file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------- argparse
def add_finetune_flags(p) -> None:
    """The ``--base HF_DIR --text FILE`` mode of ``minilora finetune``."""
    p.add_argument("--base", metavar="HF_DIR", help="fine-tune a Hugging Face GPT-2 folder (or cached hub name) "
                   "instead of the shipped base; needs --text")
    p.add_argument("--text", metavar="FILE", help="with --base: a UTF-8 text file, tokenized by the folder's tokenizer")
    p.add_argument("--block-size", type=int, default=None, help="with --text: tokens per window (default min(128, n_positions))")
    p.add_argument("--name", default=None, help="with --text: the adapter's name (default 'text')")


def add_parsers(sub) -> None:
    """Register ``export``, ``import-peft`` and ``analyze`` on the CLI's subparsers."""
    p = sub.add_parser("export", help="a minilora adapter as a PEFT adapter folder, the base model as a Hugging Face GPT-2")
    p.add_argument("--adapter", metavar="FILE", help="a minilora adapter file (e.g. from `minilora finetune`)")
    p.add_argument("--to-peft", metavar="DIR", help="write the adapter as a PEFT LoRA folder")
    p.add_argument("--base-to-hf", metavar="DIR", help="write the base model as a Hugging Face GPT-2 folder")
    p.add_argument("--base", metavar="HF_DIR", help="the adapter's base: a GPT-2 folder (default: the shipped base)")
    p.add_argument("--float64", action="store_true", help="write float64 tensors (default float32)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-peft", help="a PEFT LoRA adapter for GPT-2 as a minilora adapter file")
    p.add_argument("folder", metavar="DIR", help="a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, metavar="FILE", help="the minilora adapter file to write")
    p.add_argument("--base", metavar="HF_DIR", help="the GPT-2 it adapts (default: the adapter's base_model_name_or_path "
                   "if it is at hand, else the shipped base)")
    p.add_argument("--name", default="default", help="the adapter's name (default 'default')")
    p.set_defaults(func=cmd_import_peft)

    p = sub.add_parser("analyze", help="Sec. 7 analyses of any adapter: ΔW spectra, amplification, subspace similarity φ")
    p.add_argument("adapter", help="a minilora adapter file, or a PEFT LoRA folder of any architecture on linear "
                   "layers (GPT-2, Llama, Mistral, Qwen2, Gemma, Phi, ...)")
    p.add_argument("--against", metavar="OTHER", help="a second adapter (file or folder) of the same base: φ between the two")
    p.add_argument("--base", metavar="HF_DIR", help="base weights W0 for the amplification factor: a Hugging Face model "
                   "folder (safetensors, sharded or not), read one tensor at a time for non-GPT-2 adapters (default: "
                   "the shipped base for minilora files, base_model_name_or_path for PEFT folders)")
    p.add_argument("--out", default="minilora-out/analyze", help="folder for analyze.png and analyze.json")
    p.set_defaults(func=cmd_analyze)
