"""Where a minilora training step spends its time: ``python -m benchmarks.profile --config gpt2 --mode full``.

    python -m benchmarks.profile --config gpt2 --mode full --json profile.jsonl
    python -m benchmarks.profile --config tiny --mode lora --steps 20

Runs ``--steps`` training steps (after one untimed warm-up) under ``cProfile`` and sums each Python
function's own time (``tottime``: the time inside it, including the NumPy and BLAS calls it makes
directly, excluding the Python functions it calls). The functions are grouped by the part of the
model they belong to (``PARTS``: a function's file and name), so the table reads "Linear forward and
backward (BLAS)", "GELU", "attention", ... with the share of the step each takes. Each function's
row is in the JSON lines too. The model and batch are the bench's: ``gpt2`` is GPT-2-124M's shape
(random weights, batch 4 × 128, ``benchmarks.gpt2``), ``tiny`` and ``medium`` are ``config.CONFIGS``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time

import numpy as np

from minilora import lora
from minilora.methods import randomize_zero_init

from .config import CONFIGS, LORA_ALPHA, LORA_B_STD, LORA_R, LORA_TARGETS
from .machine import machine_info, set_blas_threads
from .runners import adamw_step

__all__ = ["OP_LABELS", "PARTS", "merge_small", "part_of", "profile_step"]

# minilora.functional's Function classes, by the name the table gives them
OP_LABELS = {"Linear": "Linear forward and backward (BLAS; the tied LM head included)",
             "ScaledDotProductAttention": "attention", "CrossEntropy": "cross-entropy",
             "Embedding": "embedding (its backward: the scatter-add into wte)"}

# (part, file suffix, function names or None for every function of the file), the first match wins
PARTS = (
    ("LoRA layer (W0 x + s·B A x and its backward)", "lora/function.py", None),
    ("AdamW", "minilora/optim.py", None),
    ("autograd (graph, backward sweep, gradient sums)", "minilora/tensor.py", None),
    ("embedding (its backward: the scatter-add into wte)", "minilora/backend.py", ("scatter_add",)),
    ("elementwise ops", "minilora/ops/elementwise.py", None),
    ("matmul and shape ops", "minilora/ops/", None),
    ("model code (blocks, reshapes)", "minilora/models/", None),
    ("modules", "minilora/nn/", None),
)


def part_of(filename: str, line: int, name: str, fine: dict) -> str:
    """The part of the step a profiled function belongs to (``fine`` maps functional.py's lines to ops)."""
    if filename.endswith("minilora/functional.py"):
        return fine.get(line, "other functional ops")
    for part, suffix, names in PARTS:
        if suffix in filename and (names is None or name in names):
            return part
    if filename.startswith("~"):
        return "NumPy calls made from the benchmark's own loop"
    return "other Python"


def _functional_ops() -> dict:
    """{line number: 'op forward/backward'} for every method of minilora.functional's Function classes."""
    import inspect

    from minilora import functional as F
    from minilora.function import Function

    out = {}
    for cls_name, cls in vars(F).items():
        if inspect.isclass(cls) and issubclass(cls, Function) and cls.__module__ == F.__name__:
            label = OP_LABELS.get(cls_name, cls_name)
            for meth in ("forward", "backward"):
                fn = cls.__dict__.get(meth)
                if fn is not None:
                    out[inspect.getsourcelines(fn)[1]] = label
    for name, fn in vars(F).items():  # module-level helpers (GELU's block loop, ...)
        if inspect.isfunction(fn) and fn.__module__ == F.__name__:
            low = name.lower()
            label = ("GELU" if "gelu" in low else "LayerNorm" if "norm" in low else
                     "attention" if "attention" in low or "mask" in low else "cross-entropy" if "softmax" in low
                     else None)
            if label:
                out[inspect.getsourcelines(fn)[1]] = label
    return out


def _parts(func, table, fine, depth: int = 0) -> list:
    """[(part, weight)] of a profiled function; weights sum to 1.

    A function outside minilora (a C function such as a ufunc's ``reduce``, or NumPy's Python
    wrappers) is charged to the parts of its callers, in the shares cProfile recorded per caller.
    """
    filename, line, name = func
    inside = "minilora/" in filename and "site-packages" not in filename
    callers = table.get(func, (0, 0, 0, 0, {}))[4]
    if inside or not callers or depth > 4:
        return [(part_of(filename, line, name, fine), 1.0)]
    total = sum(entry[2] for entry in callers.values()) or 1.0
    out = []
    for caller, entry in callers.items():
        out += [(part, w * entry[2] / total) for part, w in _parts(caller, table, fine, depth + 1)]
    return out


def _model(config: str, mode: str, seed: int):
    """(model, idx, targets) of the bench's config."""
    rng = np.random.default_rng(seed)
    if config == "gpt2":
        from .gpt2 import GPT2Setup, random_gpt, with_lora

        setup = GPT2Setup()
        model = random_gpt(setup.model, seed)
        if mode == "lora":
            with_lora(model, seed + 1)
        batch, T, V = setup.batch, setup.seq_len, setup.model.vocab_size
    else:
        from minilora import backend as bk
        from minilora.models import GPT

        bc = CONFIGS[config]
        bk.manual_seed(seed)
        model = GPT(bc.model)
        if mode == "lora":
            lora.apply_lora(model, lora.LoRAConfig(r=LORA_R, alpha=LORA_ALPHA, target_modules=LORA_TARGETS))
            randomize_zero_init(model, std=LORA_B_STD)
            lora.mark_only_lora_as_trainable(model)
        batch, T, V = bc.batch, bc.model.block_size, bc.model.vocab_size
    return model, rng.integers(0, V, (batch, T)), rng.integers(0, V, (batch, T))


def profile_step(config: str = "gpt2", mode: str = "full", steps: int = 2, seed: int = 0) -> list:
    """One row per (part, function): own seconds per step and share of the profiled time."""
    model, idx, targets = _model(config, mode, seed)
    model.train()
    _, step = adamw_step(model, idx, targets)
    step()  # warm-up: AdamW's buffers, the allocator's heap
    wall = time.perf_counter()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    wall = (time.perf_counter() - wall) / steps
    stats = pstats.Stats(prof)
    fine = _functional_ops()
    total = sum(v[2] for v in stats.stats.values())
    rows, machine = [], machine_info()
    for (filename, line, name), (_, ncalls, tottime, _, callers) in stats.stats.items():
        if tottime <= 0:
            continue
        function = f"{filename.split('minilora/')[-1]}:{line}({name})"
        shares = [(part, tottime * w) for part, w in _parts((filename, line, name), stats.stats, fine)]
        for part, seconds in shares:
            rows.append({"config": config, "mode": mode, "steps": steps, "part": part, "function": function,
                         "calls_per_step": ncalls / steps, "seconds_per_step": seconds / steps, "share": seconds / total,
                         "profiled_step_seconds": total / steps, "wall_step_seconds": wall, "machine": machine})
    return merge_small(rows)


def merge_small(rows, below: float = 0.001) -> list:
    """Rows sorted by time; the functions under ``below`` of the step merged into one row per part."""
    keep, small = [], {}
    for r in rows:
        if r["share"] >= below:
            keep.append(r)
        else:
            m = small.setdefault(r["part"], dict(r, function=f"(functions under {100 * below:g} % each)",
                                                 calls_per_step=0.0, seconds_per_step=0.0, share=0.0))
            for key in ("calls_per_step", "seconds_per_step", "share"):
                m[key] += r[key]
    out = keep + list(small.values())
    out.sort(key=lambda r: -r["seconds_per_step"])
    return out


def format_parts(rows, top: int = 12) -> str:
    parts = {}
    for r in rows:
        parts[r["part"]] = parts.get(r["part"], 0.0) + r["seconds_per_step"]
    total = rows[0]["profiled_step_seconds"] if rows else 0.0
    lines = [f"{rows[0]['config']} {rows[0]['mode']} step: {total * 1e3:.0f} ms profiled "
             f"({rows[0]['wall_step_seconds'] * 1e3:.0f} ms wall under the profiler)", ""]
    for part, sec in sorted(parts.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {100 * sec / total:5.1f} %  {sec * 1e3:8.1f} ms  {part}")
    lines += ["", "top functions (own time):"]
    for r in rows[:top]:
        lines.append(f"  {100 * r['share']:5.1f} %  {r['seconds_per_step'] * 1e3:8.1f} ms  {r['function']}  [{r['part']}]")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=("gpt2", *CONFIGS), default="gpt2")
    p.add_argument("--mode", choices=("full", "lora"), default="full")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="NumPy's BLAS threads (default: as loaded)")
    p.add_argument("--json", metavar="PATH", help="append one JSON object per profiled function")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads is not None:
        set_blas_threads(args.threads)
    rows = profile_step(args.config, args.mode, args.steps, args.seed)
    print(format_parts(rows))
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
