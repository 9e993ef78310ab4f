"""How the learning rates of FT and LoRA are chosen: on the val split, never on test.

For each task, full fine-tuning and LoRA are trained with three learning rates each (the
method's other settings from ``methods.hyperparams``, seed 0) and scored on the 200 val
examples. The choice is the lowest val NLL: the metric sits at its ceiling on some tasks, the
NLL still ranks. ``methods.HYPERPARAMS`` and ``TASK_HYPERPARAMS`` hold the chosen values, and a
test checks that they agree with the choices recorded in ``docs/results.json``.
"""

from __future__ import annotations

from ..data import TASK_METRICS
from ..methods import PAPER_NAMES, hyperparams
from .report import markdown_table, new_figure, write_figure
from .runs import Context

TITLE = "Choosing the learning rates on the val split"

GRID = {"full": (3e-4, 1e-3, 3e-3), "lora": (5e-3, 1e-2, 2e-2)}
FAST_GRID = {"full": (1e-3,), "lora": (1e-2,)}
SEED = 0


def grid(ctx: Context) -> dict:
    return FAST_GRID if ctx.fast else GRID


def plan(ctx: Context) -> list:
    return [(task, method, SEED, {"lr": lr, "eval_split": "val"})
            for task in ctx.settings.tuning_tasks for method, lrs in grid(ctx).items() for lr in lrs]


def collect(ctx: Context) -> dict:
    cells, chosen, table = {}, {}, {}
    for task in ctx.settings.tuning_tasks:
        for method, lrs in grid(ctx).items():
            runs = {lr: ctx.run(task, method, SEED, lr=lr, eval_split="val") for lr in lrs}
            cells.setdefault(task, {})[method] = {repr(lr): {"metric": r.metric, "nll": r.eval_loss}
                                                 for lr, r in runs.items()}
            chosen.setdefault(task, {})[method] = min(lrs, key=lambda lr: runs[lr].eval_loss)
            table.setdefault(task, {})[method] = hyperparams(method, task)["lr"]
    return {"tasks": list(ctx.settings.tuning_tasks), "grid": {m: list(v) for m, v in grid(ctx).items()},
            "cells": cells, "chosen": chosen, "table": table, "seed": SEED}


def render(data: dict, page) -> tuple[str, list]:
    header = ["Task", "Method"] + [f"lr {i + 1}" for i in range(max(len(v) for v in data["grid"].values()))]
    header += ["chosen (val)", "in HYPERPARAMS"]
    rows = []
    for task in data["tasks"]:
        for method, lrs in data["grid"].items():
            cells = data["cells"][task][method]
            row = [f"{task} ({TASK_METRICS[task]})", PAPER_NAMES[method]]
            row += [f"{lr:g}: {cells[repr(lr)]['metric']:.3f} / {cells[repr(lr)]['nll']:.4f}" for lr in lrs]
            row += [""] * (len(header) - 4 - len(lrs))
            row += [f"{data['chosen'][task][method]:g}", f"{data['table'][task][method]:g}"]
            rows.append(row)
    body = markdown_table(header, rows, align=["l", "l"] + ["r"] * (len(header) - 2))
    body += (f"\n\nEach cell: learning rate: val metric / val NLL (seed {data['seed']}, 200 val examples, the "
             "method's steps for the task). The choice is the lowest val NLL; the last column is the value that "
             "`minilora.methods.hyperparams(method, task)` trains with, for every experiment on this page and for "
             "the demo. The other methods' learning rates are their rows of `methods.HYPERPARAMS`.")
    return body, [_plot(page, data)]


def _plot(page, data) -> str:
    tasks = data["tasks"]
    fig = new_figure(3.2 * len(tasks), 3.2)
    for j, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), j + 1)
        for method, lrs in data["grid"].items():
            cells = data["cells"][task][method]
            ax.plot(lrs, [cells[repr(lr)]["nll"] for lr in lrs], marker="o", label=PAPER_NAMES[method])
            chosen = data["chosen"][task][method]
            ax.plot([chosen], [cells[repr(chosen)]["nll"]], marker="*", markersize=12, color="black")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(f"{task}: val NLL ↓ (★ chosen)", fontsize=9)
        if j == 0:
            ax.legend(fontsize=7)
    return write_figure(page, fig, "tuning.png")
