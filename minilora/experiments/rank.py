"""Table 6 in miniature: the metric for r ∈ {1, 2, 4, 8, 64} on Wq, Wq+Wv and all four matrices."""

from __future__ import annotations

import numpy as np

from ..data import TASK_METRICS
from .report import markdown_table, new_figure, nll, write_figure, write_markdown
from .runs import Context
from .settings import LORA_ALPHA
from .targets import label

TITLE = "The rank r (Table 6)"

RANKS = (1, 2, 4, 8, 64)
FAST_RANKS = (1, 8)
TARGET_SETS = (("q",), ("q", "v"), ("q", "k", "v", "o"))


def ranks(ctx: Context) -> tuple:
    return FAST_RANKS if ctx.fast else RANKS


def plan(ctx: Context) -> list:
    return [(task, "lora", 0, {"r": r, "alpha": LORA_ALPHA, "targets": targets})
            for task in ctx.settings.analysis_tasks for targets in TARGET_SETS for r in ranks(ctx)]


def run(ctx: Context) -> dict:
    tasks, rs = ctx.settings.analysis_tasks, ranks(ctx)
    ctx.prefetch(plan(ctx), "rank")
    results = {(task, hp["targets"], hp["r"]): ctx.run(task, method, seed, **hp)
               for task, method, seed, hp in plan(ctx)}
    header = ["Task", "Weight type"] + [f"r = {r}" for r in rs]
    rows = []
    for task in tasks:
        for what, name in (("metric", f"{TASK_METRICS[task]} ↑"), ("eval_loss", "NLL ↓")):
            for targets in TARGET_SETS:
                values = [getattr(results[(task, targets, r)], what) for r in rs]
                rows.append([f"{task} {name}", label(targets)] + ([nll(v) for v in values] if what == "eval_loss"
                                                                  else values))
    body = markdown_table(header, rows, align=["l", "l"] + ["r"] * len(rs))
    body += (f"\n\nα = {LORA_ALPHA:g} for every r (scaling α/r), as in the paper. NLL: test-target negative "
             "log-likelihood (nats/token). Trainable parameters: "
             "2·L̂·d·r, e.g. " + ", ".join(
                 f"{label(t)} r={rs[-1]}: {results[(tasks[0], t, rs[-1])].trainable_params:,}" for t in TARGET_SETS) + ".")
    figure = _plot(ctx, results, tasks, rs)
    text = write_markdown(ctx, "rank", TITLE, body, [figure])
    return {"markdown": text, "figures": [figure],
            "results": {f"{t}/{label(c)}/r={r}": v.metric for (t, c, r), v in results.items()}}


def _plot(ctx, results, tasks, rs) -> str:
    fig = new_figure(4 * 2 * len(tasks), 3.3)
    n = 0
    for task in tasks:
        for what, ylabel in (("metric", f"{TASK_METRICS[task]} ↑"), ("eval_loss", "test NLL ↓")):
            n += 1
            ax = fig.add_subplot(1, 2 * len(tasks), n)
            for targets in TARGET_SETS:
                ax.plot(np.arange(len(rs)), [getattr(results[(task, targets, r)], what) for r in rs], marker="o",
                        label=label(targets))
            ax.set_xticks(np.arange(len(rs)))
            ax.set_xticklabels([str(r) for r in rs])
            ax.set_xlabel("rank r")
            if what == "metric":
                ax.set_ylim(0, 1.05)
            ax.set_title(f"{task}: {ylabel}", fontsize=9)
            ax.legend(fontsize=7)
    return write_figure(ctx, fig, "rank.png")
