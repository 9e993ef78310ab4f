"""The low-data study in miniature (the paper's Appendix F.3, Table 16: MNLI-n).

FT, LoRA, an adapter (Adapter^H) and PreEmbed (prefix-embedding tuning) are trained on n
examples of a task, n ∈ {16, 64, 256, 2,000}, with each method's usual steps and learning rate
(so a small n is seen for many epochs). Each seed draws its own subset of n training examples
(``recipes.training_examples``) as well as its own initialisation and batch order: with one
fixed subset, full fine-tuning (which has no random initialisation) would give the same number
for every seed. The paper finds LoRA ahead of full fine-tuning at small n on GPT-3, and prefix
methods far behind.
"""

from __future__ import annotations

from ..data import TASK_METRICS
from ..methods import PAPER_NAMES
from .report import markdown_table, new_figure, write_figure
from .runs import Context
from .stats import format_spread, spread

TITLE = "Low-data regime (Table 16): the metric against the number of training examples"


def plan(ctx: Context) -> list:
    s = ctx.settings
    return [(task, method, seed, {"n_train": n}) for task in s.low_data_tasks for method in s.low_data_methods
            for n in s.low_data_sizes for seed in s.seeds]


def collect(ctx: Context) -> dict:
    s = ctx.settings
    cells = {}
    for task in s.low_data_tasks:
        for method in s.low_data_methods:
            for n in s.low_data_sizes:
                runs = [ctx.run(task, method, seed, n_train=n) for seed in s.seeds]
                cells.setdefault(task, {}).setdefault(method, {})[str(n)] = {
                    "metric": spread([r.metric for r in runs]), "nll": spread([r.eval_loss for r in runs])}
    return {"tasks": list(s.low_data_tasks), "methods": list(s.low_data_methods), "sizes": list(s.low_data_sizes),
            "cells": cells}


def render(data: dict, page) -> tuple[str, list]:
    tasks, methods, sizes, cells = data["tasks"], data["methods"], data["sizes"], data["cells"]
    header = ["Task", "Method"] + [f"n = {n:,}" for n in sizes]
    rows = []
    for task in tasks:
        for what in ("metric", "nll"):
            for method in methods:
                rows.append([f"{task} {TASK_METRICS[task] + ' ↑' if what == 'metric' else 'NLL ↓'}",
                             PAPER_NAMES[method]]
                            + [format_spread(cells[task][method][str(n)][what], 4 if what == "nll" else 3)
                               for n in sizes])
    body = markdown_table(header, rows, align=["l", "l"] + ["r"] * len(sizes))
    body += (f"\n\nMean ± std over {page.n_seeds} seeds; each seed draws its own n training examples of the "
             "2,000, its own initialisation and its own batch order. Every method keeps its usual number of steps "
             "and learning rate (`methods.hyperparams`), so a small n is seen for many epochs. Test split, "
             "200 examples.")
    return body, [_plot(page, data)]


def _plot(page, data) -> str:
    tasks, methods, sizes, cells = data["tasks"], data["methods"], data["sizes"], data["cells"]
    fig = new_figure(4.5 * len(tasks), 3.4)
    for j, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), j + 1)
        for method in methods:
            points = [cells[task][method][str(n)]["metric"] for n in sizes]
            ax.errorbar(sizes, [p["mean"] for p in points], yerr=[p["std"] for p in points], marker="o", capsize=2,
                        label=PAPER_NAMES[method])
        ax.set_xscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([f"{n:,}" for n in sizes])
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("training examples n")
        ax.set_ylabel(f"test {TASK_METRICS[task]} ↑")
        ax.set_title(f"{task}: mean ± std over {page.n_seeds} seeds", fontsize=9)
        ax.legend(fontsize=7)
    return write_figure(page, fig, "lowdata.png")

