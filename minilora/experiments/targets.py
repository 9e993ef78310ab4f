"""Table 5 in miniature: one parameter budget spent on different weight matrices of self-attention.

The budget is that of r = 8 on one matrix type: 2 · L · d · 8 parameters, spent as r = 8 on
Wq, Wk, Wv or Wo alone, r = 4 on two types, or r = 2 on all four (the paper: 18M on GPT-3).
It runs on the analysis task (``sql``, whose query language the base has never seen), where
LoRA is far from the metric's ceiling, so the cells can differ; each is mean ± std over seeds.
"""

from __future__ import annotations

import numpy as np

from ..data import TASK_METRICS
from .report import markdown_table, new_figure, write_figure
from .runs import Context
from .settings import LORA_ALPHA
from .stats import format_spread, spread

TITLE = "Which weight matrices to adapt (Table 5): a fixed budget of trainable parameters"

BUDGET_RANK = 8  # the rank one matrix type gets; two types get BUDGET_RANK // 2, all four BUDGET_RANK // 4
CONFIGS = (("q",), ("k",), ("v",), ("o",), ("q", "k"), ("q", "v"), ("q", "k", "v", "o"))


def label(targets) -> str:
    return "+".join(f"W{t}" for t in targets)


def rank_for(targets) -> int:
    return BUDGET_RANK // len(targets)


def _hp(targets) -> dict:
    return {"r": rank_for(targets), "alpha": LORA_ALPHA, "targets": tuple(targets)}


def plan(ctx: Context) -> list:
    return [(task, "lora", seed, _hp(targets))
            for targets in CONFIGS for task in ctx.settings.analysis_tasks for seed in ctx.settings.seeds]


def collect(ctx: Context) -> dict:
    s = ctx.settings
    cells, trainable = {}, {}
    for targets in CONFIGS:
        cells[label(targets)] = {}
        for task in s.analysis_tasks:
            runs = [ctx.run(task, "lora", seed, **_hp(targets)) for seed in s.seeds]
            cells[label(targets)][task] = {"metric": spread([r.metric for r in runs]),
                                           "nll": spread([r.eval_loss for r in runs])}
            trainable[label(targets)] = runs[0].trainable_params
    return {"tasks": list(s.analysis_tasks), "configs": [list(c) for c in CONFIGS],
            "ranks": {label(c): rank_for(c) for c in CONFIGS}, "trainable": trainable, "cells": cells}


def render(data: dict, page) -> tuple[str, list]:
    tasks, cells = data["tasks"], data["cells"]
    header = ["Weight type", "Rank r", "# Trainable"]
    header += [h for t in tasks for h in (f"{t} {TASK_METRICS[t]} ↑", f"{t} NLL ↓")]
    rows = []
    for targets in data["configs"]:
        name = label(targets)
        rows.append([name, data["ranks"][name], f"{data['trainable'][name]:,}"]
                    + [v for t in tasks for v in (format_spread(cells[name][t]["metric"]),
                                                  format_spread(cells[name][t]["nll"], 4))])
    body = markdown_table(header, rows)
    best = {t: min(cells, key=lambda c: cells[c][t]["nll"]["mean"]) for t in tasks}
    body += ("\n\nEvery row trains the same number of parameters (2·L̂·d·r with L̂·r = "
             f"{4 * BUDGET_RANK} for the 4 blocks), α = {LORA_ALPHA:g}, mean ± std over {page.n_seeds} seeds. "
             "NLL: test-target negative log-likelihood (nats/token). Lowest mean NLL per task: "
             + ", ".join(f"{t}: {b}" for t, b in best.items()) + ".")
    return body, [_plot(page, data)]


def _plot(page, data) -> str:
    tasks, cells, configs = data["tasks"], data["cells"], data["configs"]
    fig = new_figure(11, 3.5)
    x = np.arange(len(configs))
    width = 0.8 / len(tasks)
    for j, (what, ylabel) in enumerate((("metric", "test metric ↑"), ("nll", "test NLL ↓"))):
        ax = fig.add_subplot(1, 2, j + 1)
        for i, task in enumerate(tasks):
            ax.bar(x + (i - (len(tasks) - 1) / 2) * width, [cells[label(c)][task][what]["mean"] for c in configs],
                   width, yerr=[cells[label(c)][task][what]["std"] for c in configs], capsize=2,
                   label=f"{task} ({TASK_METRICS[task]})" if what == "metric" else task)
        ax.set_xticks(x)
        ax.set_xticklabels([f"{label(c) if len(c) < 4 else 'all four'}\nr={rank_for(c)}" for c in configs],
                           fontsize=7)
        if what == "metric":
            ax.set_ylim(0, 1.05)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(f"Same budget, different weight matrices (mean ± std over {page.n_seeds} seeds)", fontsize=10)
    return write_figure(page, fig, "targets.png")
