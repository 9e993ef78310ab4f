"""Table 6 in miniature: the metric for r ∈ {1, 2, 4, 8, 64} on Wq, Wq+Wv and all four matrices.

On the analysis task (``sql``), mean ± std over seeds, with the NLL beside the metric.
"""

from __future__ import annotations

import numpy as np

from ..data import TASK_METRICS
from .report import markdown_table, new_figure, write_figure
from .runs import Context
from .settings import LORA_ALPHA
from .stats import format_spread, spread
from .targets import label

TITLE = "The rank r (Table 6)"

RANKS = (1, 2, 4, 8, 64)
FAST_RANKS = (1, 8)
TARGET_SETS = (("q",), ("q", "v"), ("q", "k", "v", "o"))


def ranks(ctx: Context) -> tuple:
    return FAST_RANKS if ctx.fast else RANKS


def _hp(targets, r) -> dict:
    return {"r": r, "alpha": LORA_ALPHA, "targets": tuple(targets)}


def plan(ctx: Context) -> list:
    return [(task, "lora", seed, _hp(targets, r)) for task in ctx.settings.analysis_tasks
            for targets in TARGET_SETS for r in ranks(ctx) for seed in ctx.settings.seeds]


def collect(ctx: Context) -> dict:
    s = ctx.settings
    cells, trainable = {}, {}
    for task in s.analysis_tasks:
        for targets in TARGET_SETS:
            for r in ranks(ctx):
                runs = [ctx.run(task, "lora", seed, **_hp(targets, r)) for seed in s.seeds]
                cells.setdefault(task, {}).setdefault(label(targets), {})[str(r)] = {
                    "metric": spread([x.metric for x in runs]), "nll": spread([x.eval_loss for x in runs])}
                trainable.setdefault(label(targets), {})[str(r)] = runs[0].trainable_params
    return {"tasks": list(s.analysis_tasks), "ranks": list(ranks(ctx)), "targets": [label(t) for t in TARGET_SETS],
            "cells": cells, "trainable": trainable}


def render(data: dict, page) -> tuple[str, list]:
    tasks, rs, cells = data["tasks"], data["ranks"], data["cells"]
    header = ["Task", "Weight type"] + [f"r = {r}" for r in rs]
    rows = []
    for task in tasks:
        for what, name in (("metric", f"{TASK_METRICS[task]} ↑"), ("nll", "NLL ↓")):
            for targets in data["targets"]:
                rows.append([f"{task} {name}", targets]
                            + [format_spread(cells[task][targets][str(r)][what], 4 if what == "nll" else 3) for r in rs])
    body = markdown_table(header, rows, align=["l", "l"] + ["r"] * len(rs))
    body += (f"\n\nα = {LORA_ALPHA:g} for every r (scaling α/r), as in the paper; mean ± std over {page.n_seeds} "
             "seeds. NLL: test-target negative log-likelihood (nats/token). Trainable parameters: 2·L̂·d·r, e.g. "
             + ", ".join(f"{t} r={rs[-1]}: {data['trainable'][t][str(rs[-1])]:,}" for t in data["targets"]) + ".")
    return body, [_plot(page, data)]


def _plot(page, data) -> str:
    tasks, rs, cells = data["tasks"], data["ranks"], data["cells"]
    fig = new_figure(4 * 2 * len(tasks), 3.3)
    n = 0
    for task in tasks:
        for what, ylabel in (("metric", f"{TASK_METRICS[task]} ↑"), ("nll", "test NLL ↓")):
            n += 1
            ax = fig.add_subplot(1, 2 * len(tasks), n)
            for targets in data["targets"]:
                points = [cells[task][targets][str(r)][what] for r in rs]
                ax.errorbar(np.arange(len(rs)), [p["mean"] for p in points], yerr=[p["std"] for p in points],
                            marker="o", capsize=2, label=targets)
            ax.set_xticks(np.arange(len(rs)))
            ax.set_xticklabels([str(r) for r in rs])
            ax.set_xlabel("rank r")
            if what == "metric":
                ax.set_ylim(0, 1.05)
            ax.set_title(f"{task}: {ylabel}", fontsize=9)
            ax.legend(fontsize=7)
    return write_figure(page, fig, "rank.png")
