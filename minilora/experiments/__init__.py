"""The paper's experiments in miniature: ``minilora experiment NAME --out DIR [--fast]``.

    from minilora.experiments import run_experiment
    run_experiment("rank", out_dir="out/", fast=True)     # writes out/rank.md and out/rank.png

    name           the paper                what it shows
    baselines      Tables 2–4               every method × every task: trainable parameters, metric
    targets        Table 5                  one parameter budget on Wq, Wk, Wv, Wo, pairs, all four
    rank           Table 6                  r ∈ {1, 2, 4, 8, 64} for Wq, Wq+Wv, all four
    subspace       Figs. 3 and 4            φ between A of r = 8 and r = 64, and of two seeds
    amplification  Table 7                  ‖ΔW‖_F / ‖UᵀWVᵀ‖_F: ΔW amplifies directions W under-uses
    latency        Table 1                  forward latency of adapters vs merged / unmerged LoRA
    variants       after the paper          DoRA, PiSSA, LoRA+, rsLoRA (an r sweep), LoRA on an NF4 base
    all            everything, one Markdown file (``all.md``) and every PNG

Each experiment writes ``<name>.md`` (a Markdown table, the settings, links to its figures) and
its PNGs into ``out_dir``. ``fast=True`` shrinks every run to a few steps and examples so that
each experiment takes seconds (the tests); the numbers are then meaningless. Runs that several
experiments share (e.g. LoRA r = 4 on Wq, Wv) are trained once per call.

The package: ``settings`` (how big: full or fast), ``runs`` (the fine-tuning runs, through the
one pipeline ``minilora.recipes.finetune``), ``report`` (Markdown tables, figures), and one
module per experiment.
"""

from __future__ import annotations

import os

from . import amplification, baselines, latency, rank, subspace, targets, variants
from .runs import Context
from .settings import FAST_SETTINGS, FULL_SETTINGS, Settings

__all__ = ["EXPERIMENTS", "FAST_SETTINGS", "FULL_SETTINGS", "Context", "Settings", "run_experiment"]

MODULES = {"baselines": baselines, "targets": targets, "rank": rank, "subspace": subspace,
           "amplification": amplification, "latency": latency, "variants": variants}
EXPERIMENTS = tuple(MODULES)


def run_experiment(name: str, out_dir="minilora-out/experiments", fast: bool = False, progress: bool = True,
                   base=None, workers: int | None = None) -> dict:
    """Run experiment ``name`` (or "all"), write its tables and PNGs into ``out_dir``; return its results.

    The result maps each experiment's name to {"markdown": text, "figures": [PNG names],
    "results": {cell: value}}; "all" also writes ``all.md`` and returns "seconds".
    ``base``: the pre-trained model to start from (default: the shipped one). ``workers``: processes
    that train runs side by side (default: env ``MINILORA_WORKERS``, else 2 on a multi-core
    machine, 1 with ``fast``).
    """
    if name != "all" and name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {list(EXPERIMENTS) + ['all']}")
    ctx = Context(out_dir, fast=fast, progress=progress, base=base, workers=workers)
    names = EXPERIMENTS if name == "all" else (name,)
    modules = {n: MODULES[n] for n in names}
    if len(names) > 1:  # train every run of every experiment first: one pool, no idle worker between experiments
        ctx.prefetch([config for n in names for config in modules[n].plan(ctx)], "fine-tuning runs")
    results = {}
    for n in names:
        results[n] = modules[n].run(ctx)
    if name == "all":
        seconds = ctx.elapsed()
        results["seconds"] = seconds
        header = (f"# minilora: the paper's experiments in miniature\n\n"
                  f"`minilora experiment all{' --fast' if fast else ''}` took {seconds / 60:.1f} min.\n\n")
        with open(os.path.join(ctx.out_dir, "all.md"), "w", encoding="utf-8") as f:
            f.write(header + "\n".join(results[n]["markdown"] for n in names))
    return results
