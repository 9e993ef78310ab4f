"""Tables 2–4 in miniature: every method on every task, with its trainable parameters and its metric.

Each cell is the mean ± std over the settings' seeds; the "base" row is the shipped model with no
fine-tuning (what the pretraining alone gives). ``e2e`` also gets BLEU and ROUGE-L against its
several references (the paper's Table 3 metrics).
"""

from __future__ import annotations

import numpy as np

from ..data import TASK_METRICS
from ..methods import METHODS, PAPER_NAMES
from .report import markdown_table, new_figure, write_figure
from .runs import Context
from .stats import format_spread, spread

TITLE = "Baselines (Tables 2–4): every method × every task"
ROWS = ("base",) + METHODS
NAMES = {**PAPER_NAMES, "base": "base (no fine-tuning)"}


def plan(ctx: Context) -> list:
    """The fine-tuning runs this experiment reads: (task, method, seed, hyper-parameters)."""
    return [(task, method, seed, {}) for method in ROWS for task in ctx.settings.tasks for seed in ctx.settings.seeds]


def collect(ctx: Context) -> dict:
    s = ctx.settings
    cells, trainable = {}, {}
    for method in ROWS:
        cells[method] = {}
        for task in s.tasks:
            runs = [ctx.run(task, method, seed) for seed in s.seeds]
            cell = {"metric": spread([r.metric for r in runs]), "nll": spread([r.eval_loss for r in runs])}
            for name in runs[0].text_scores:
                cell[name] = spread([r.text_scores[name] for r in runs])
            cells[method][task] = cell
            trainable[method] = runs[0].trainable_params
    pre = ctx.run(s.tasks[0], "preembed", s.seeds[0])
    return {"tasks": list(s.tasks), "methods": list(ROWS), "cells": cells, "trainable": trainable,
            "total_params": ctx.run(s.tasks[0], "full", s.seeds[0]).total_params,
            "preembed": {"l_p": pre.hp.get("l_p"), "l_i": pre.hp.get("l_i"),
                         "skipped": {t: ctx.run(t, "preembed", s.seeds[0]).skipped_train for t in s.tasks}},
            "block_size": ctx.base.config.block_size}


def render(data: dict, page) -> tuple[str, list]:
    tasks, cells, total = data["tasks"], data["cells"], data["total_params"]
    header = ["Method", "# Trainable", "% of model"]
    header += [h for t in tasks for h in (f"{t} {TASK_METRICS[t]} ↑", f"{t} NLL ↓")] + ["Avg. metric"]
    rows = []
    for method in data["methods"]:
        n = data["trainable"][method]
        row = [NAMES[method], f"{n:,}", f"{100 * n / total:.2f}"]
        for t in tasks:
            row += [format_spread(cells[method][t]["metric"]), format_spread(cells[method][t]["nll"], 4)]
        row.append(f"{np.mean([cells[method][t]['metric']['mean'] for t in tasks]):.3f}")
        rows.append(row)
    body = markdown_table(header, rows)
    pre = data["preembed"]
    body += (
        f"\n\nThe base model has {total:,} parameters. Each cell is the mean ± std over "
        f"{page.n_seeds} seeds on the test split; metrics: higher is better. NLL is the mean negative "
        "log-likelihood of the test targets y given x (eq. 2 on held-out data, nats per token, lower is better). "
        "The base row is the shipped model read as it is (its pretraining corpus holds MR strings, "
        "descriptions and questions with answers, but never `=>` nor the `sql` query keywords). "
        f"PreEmbed (l_p = {pre['l_p']}, l_i = {pre['l_i']}) leaves {data['block_size'] - pre['l_p'] - pre['l_i']} "
        f"of the {data['block_size']} positions to the task: it skipped "
        + ", ".join(f"{pre['skipped'][t]} {t}" for t in tasks)
        + " training examples that no longer fit, and its answers are cut at that length."
    )
    if "e2e" in tasks and "bleu" in cells["full"]["e2e"]:
        text_rows = [[NAMES[m]] + [format_spread(cells[m]["e2e"][k], 4 if k == "nll" else 3)
                                   for k in ("metric", "bleu", "rouge_l", "nll")] for m in data["methods"]]
        body += ("\n\n**Data-to-text with the paper's text metrics** (Table 3): `e2e`, BLEU (sacrebleu, corpus "
                 "level) and ROUGE-L (rouge-score, F-measure, best reference) against the 5 references of each "
                 "test MR (other descriptions of the same restaurant), beside slot accuracy and NLL.\n\n"
                 + markdown_table(["Method", "slot accuracy ↑", "BLEU ↑", "ROUGE-L ↑", "NLL ↓"], text_rows))
    figures = [_bars(page, data), _scatter(page, data)]
    return body, figures


def _bars(page, data) -> str:
    tasks, cells, methods = data["tasks"], data["cells"], data["methods"]
    fig = new_figure(8.5, 3.9)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(methods)
    x = np.arange(len(tasks))
    for i, method in enumerate(methods):
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, [cells[method][t]["metric"]["mean"] for t in tasks], width,
               yerr=[cells[method][t]["metric"]["std"] for t in tasks], capsize=1.5, label=NAMES[method])
    ax.set_xticks(x)
    ax.set_xticklabels([f"{t}\n({TASK_METRICS[t]})" for t in tasks])
    ax.set_ylim(0, 1.35)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("test metric (higher is better)")
    ax.set_title(f"Every method on every task (mean ± std over {page.n_seeds} seeds)")
    ax.legend(fontsize=7, ncol=4, loc="upper center")
    return write_figure(page, fig, "baselines_metric.png")


def _scatter(page, data) -> str:
    """Test NLL against trainable parameters (log scale), like the paper's Fig. 2."""
    tasks, cells = data["tasks"], data["cells"]
    fig = new_figure(3 * len(tasks), 3.2)
    for j, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), j + 1)
        for method in data["methods"]:
            if method == "base":
                continue
            c = cells[method][task]["nll"]
            ax.errorbar([data["trainable"][method]], [c["mean"]], yerr=[c["std"]], fmt="o", label=NAMES[method])
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_title(task, fontsize=9)
        if j == 0:
            ax.set_ylabel("test NLL (nats/token) ↓")
    fig.axes[-1].legend(fontsize=6)
    return write_figure(page, fig, "baselines_params.png")
