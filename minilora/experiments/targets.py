"""Table 5 in miniature: one parameter budget spent on different weight matrices of self-attention.

The budget is that of r = 8 on one matrix type: 2 · L · d · 8 parameters, spent as r = 8 on
Wq, Wk, Wv or Wo alone, r = 4 on two types, or r = 2 on all four (the paper: 18M on GPT-3).
"""

from __future__ import annotations

import numpy as np

from ..data import TASK_METRICS
from .report import markdown_table, new_figure, nll, write_figure, write_markdown
from .runs import Context
from .settings import LORA_ALPHA

TITLE = "Which weight matrices to adapt (Table 5): a fixed budget of trainable parameters"

BUDGET_RANK = 8  # the rank one matrix type gets; two types get BUDGET_RANK // 2, all four BUDGET_RANK // 4
CONFIGS = (("q",), ("k",), ("v",), ("o",), ("q", "k"), ("q", "v"), ("q", "k", "v", "o"))


def label(targets) -> str:
    return "+".join(f"W{t}" for t in targets)


def rank_for(targets) -> int:
    return BUDGET_RANK // len(targets)


def plan(ctx: Context) -> list:
    return [(task, "lora", 0, {"r": rank_for(targets), "alpha": LORA_ALPHA, "targets": targets})
            for targets in CONFIGS for task in ctx.settings.analysis_tasks]


def run(ctx: Context) -> dict:
    tasks = ctx.settings.analysis_tasks
    ctx.prefetch(plan(ctx), "targets")
    results = {(hp["targets"], task): ctx.run(task, method, seed, **hp) for task, method, seed, hp in plan(ctx)}
    header = ["Weight type", "Rank r", "# Trainable"]
    header += [h for t in tasks for h in (f"{t} {TASK_METRICS[t]} ↑", f"{t} NLL ↓")]
    rows = []
    for targets in CONFIGS:
        first = results[(targets, tasks[0])]
        rows.append([label(targets), rank_for(targets), f"{first.trainable_params:,}"]
                    + [v for t in tasks for v in (results[(targets, t)].metric, nll(results[(targets, t)].eval_loss))])
    body = markdown_table(header, rows)
    best = {t: label(min(CONFIGS, key=lambda c: results[(c, t)].eval_loss)) for t in tasks}
    body += ("\n\nEvery row trains the same number of parameters (2·L̂·d·r with L̂·r = "
             f"{4 * BUDGET_RANK} for the 4 blocks), α = {LORA_ALPHA:g}. NLL: test-target negative log-likelihood "
             "(nats/token). Lowest NLL per task: "
             + ", ".join(f"{t}: {b}" for t, b in best.items()) + ".")
    figure = _plot(ctx, results, tasks)
    text = write_markdown(ctx, "targets", TITLE, body, [figure])
    return {"markdown": text, "figures": [figure],
            "results": {f"{label(c)}/{t}": r.metric for (c, t), r in results.items()}}


def _plot(ctx, results, tasks) -> str:
    fig = new_figure(11, 3.5)
    x = np.arange(len(CONFIGS))
    width = 0.8 / len(tasks)
    for j, (what, ylabel) in enumerate((("metric", "test metric ↑"), ("eval_loss", "test NLL ↓"))):
        ax = fig.add_subplot(1, 2, j + 1)
        for i, task in enumerate(tasks):
            ax.bar(x + (i - (len(tasks) - 1) / 2) * width, [getattr(results[(c, task)], what) for c in CONFIGS],
                   width, label=f"{task} ({TASK_METRICS[task]})" if what == "metric" else task)
        ax.set_xticks(x)
        ax.set_xticklabels([f"{label(c) if len(c) < 4 else 'all four'}\nr={rank_for(c)}" for c in CONFIGS],
                           fontsize=7)
        if what == "metric":
            ax.set_ylim(0, 1.05)
        else:
            values = [results[(c, t)].eval_loss for c in CONFIGS for t in tasks]
            low, high = min(values), max(values)
            ax.set_ylim(max(0.0, low - 0.2 * (high - low + 1e-9)), high + 0.1 * (high - low + 1e-9))
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle("Same budget, different weight matrices", fontsize=10)
    return write_figure(ctx, fig, "targets.png")
