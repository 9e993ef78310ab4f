"""The paper's experiments in miniature: ``minilora experiment NAME --out DIR [--fast]``.

    from minilora.experiments import run_experiment, render_report
    run_experiment("rank", out_dir="out/", fast=True)    # out/results.json, out/rank.md, out/rank.png
    render_report("docs/results.json", "docs")           # docs/results.md and docs/figures/*.png

    name           the paper                what it shows
    tuning         (method)                 FT's and LoRA's learning rates, chosen on the val split
    baselines      Tables 2–4               every method × every task, and the base with no fine-tuning
    lowdata        Table 16 (App. F.3)      FT, LoRA, Adapter^H, PreEmbed on n = 16 … 2,000 examples
    targets        Table 5                  one parameter budget on Wq, Wk, Wv, Wo, pairs, all four
    rank           Table 6                  r ∈ {1, 2, 4, 8, 64} for Wq, Wq+Wv, all four
    subspace       Figs. 3 and 4            φ between A of r = 8 and r = 64, and of two seeds
    amplification  Table 7                  ‖ΔW‖_F / ‖UᵀWVᵀ‖_F: ΔW amplifies directions W under-uses
    latency        Table 1                  forward latency of adapters vs merged / unmerged LoRA
    variants       after the paper          DoRA, PiSSA, LoRA+, rsLoRA (an r sweep), LoRA on an NF4 base
    all            everything: results.json, results.md (one page) and every PNG

An experiment first ``collect``s its numbers (the fine-tuning runs, each trained once per call
and shared between experiments) into one JSON-able dict; ``results.json`` holds them all, with
every run, the settings, the seeds, the package version and the SHA-256 of the base weights.
``render`` turns those numbers (never a model) into Markdown and PNGs, so ``minilora experiment
report`` remakes ``docs/results.md`` and its figures from the committed ``docs/results.json``.
``fast=True`` shrinks every run to a few steps and examples (the tests); its numbers mean nothing.

The package: ``settings`` (how big: full or fast), ``runs`` (the fine-tuning runs, through the
one pipeline ``minilora.recipes.finetune``), ``stats`` (spread over seeds, verdicts), ``report``
(Markdown tables, figures), ``summary`` (the findings table), and one module per experiment.
"""

from __future__ import annotations

import json
import os
import platform

from .. import __version__
from ..io import atomic_write
from ..methods import HYPERPARAMS, TASK_HYPERPARAMS
from . import amplification, baselines, latency, lowdata, rank, subspace, targets, tuning, variants
from .page import render_page
from .report import Page, section, write_markdown
from .runs import Context
from .settings import FAST_SETTINGS, FULL_SETTINGS, Settings, plain

__all__ = ["EXPERIMENTS", "FAST_SETTINGS", "FULL_SETTINGS", "Context", "Settings", "render_report", "run_experiment"]

MODULES = {"tuning": tuning, "baselines": baselines, "lowdata": lowdata, "targets": targets, "rank": rank,
           "subspace": subspace, "amplification": amplification, "latency": latency, "variants": variants}
EXPERIMENTS = tuple(MODULES)


def run_experiment(name: str, out_dir="minilora-out/experiments", fast: bool = False, progress: bool = True,
                   base=None, workers: int | None = None) -> dict:
    """Run experiment ``name`` (or "all"); write ``results.json``, its Markdown and PNGs into ``out_dir``.

    Returns {experiment: {"markdown": text, "figures": [PNG names], "results": its numbers}} and
    "results" (what results.json holds). ``base``: the pre-trained model to start from (default:
    the shipped one). ``workers``: processes that train runs side by side (default: env
    ``MINILORA_WORKERS``, else 2 on a multi-core machine, 1 with ``fast``).
    """
    if name != "all" and name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {list(EXPERIMENTS) + ['all']}")
    load_before = _load_average()
    ctx = Context(out_dir, fast=fast, progress=progress, base=base, workers=workers)
    names = EXPERIMENTS if name == "all" else (name,)
    # train every run of every experiment first: one pool, the longest runs first, no idle worker between experiments
    ctx.prefetch([config for n in names for config in MODULES[n].plan(ctx)], "fine-tuning runs")
    data = {n: MODULES[n].collect(ctx) for n in names}
    results = {
        "command": f"minilora experiment {name}{' --fast' if fast else ''}",
        "version": __version__, "base_sha256": ctx.base_sha256, "base_note": ctx.base_note, "fast": fast,
        "settings": ctx.settings.to_json(), "seeds": list(ctx.settings.seeds),
        "hyperparams": {"methods": {m: plain(hp) for m, hp in HYPERPARAMS.items()},
                        "task_departures": [{"method": m, "task": t, **plain(hp)}
                                            for (m, t), hp in TASK_HYPERPARAMS.items()]},
        "experiments": data, "runs": [run.to_json() for run in ctx.runs()],
        "seconds": ctx.elapsed(), "workers": ctx.workers,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_start": load_before, "load_average_end": _load_average()},
    }
    write_results(os.path.join(ctx.out_dir, "results.json"), results)
    results = read_results(os.path.join(ctx.out_dir, "results.json"))  # render what the file holds, as `report` does
    rendered = render_results(results, ctx.out_dir, figure_dir="", per_experiment=True)
    return {**{n: {**rendered[n], "results": data[n]} for n in names}, "results": results}


def write_results(path, results: dict) -> None:
    text = json.dumps(results, indent=1, allow_nan=True)  # insertion order: the order the page renders in

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    atomic_write(path, write)


def read_results(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def render_results(results: dict, out_dir, figure_dir: str = "figures", per_experiment: bool = False) -> dict:
    """Render ``results`` into ``out_dir``: ``results.md`` (every section) and the figures.

    ``per_experiment`` also writes one ``<experiment>.md`` per section. Returns
    {experiment: {"markdown", "figures"}}.
    """
    s = results["settings"]
    page = Page(out_dir=os.fspath(out_dir), figure_dir=figure_dir, fast=results["fast"], n_seeds=len(results["seeds"]),
                settings_text=Settings(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in s.items()}).describe(),
                base_note=results["base_note"])
    sections = {}
    for n, data in results["experiments"].items():
        body, figures = MODULES[n].render(data, page)
        sections[n] = {"markdown": section(page, MODULES[n].TITLE, body, figures), "figures": figures}
        if per_experiment:
            write_markdown(page, n, sections[n]["markdown"])
    write_markdown(page, "results", render_page(results, {n: v["markdown"] for n, v in sections.items()}))
    return sections


def render_report(results_path="docs/results.json", out_dir="docs") -> str:
    """``minilora experiment report``: docs/results.md and docs/figures/*.png from results.json; returns the page."""
    results = read_results(results_path)
    render_results(results, out_dir, figure_dir="figures")
    with open(os.path.join(out_dir, "results.md"), encoding="utf-8") as f:
        return f.read()


def _load_average():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


