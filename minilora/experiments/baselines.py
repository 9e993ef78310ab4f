"""Tables 2–4 in miniature: every method on every task, with its trainable parameters and its metric."""

from __future__ import annotations

import numpy as np

from ..data import TASK_METRICS, TASKS
from ..methods import METHODS, PAPER_NAMES
from .report import markdown_table, new_figure, nll, write_figure, write_markdown
from .runs import Context

TITLE = "Baselines (Tables 2–4): every method × every task"


def plan(ctx: Context) -> list:
    """The fine-tuning runs this experiment reads: (task, method, seed, hyper-parameters)."""
    return [(task, method, 0, {}) for method in METHODS for task in TASKS]


def run(ctx: Context) -> dict:
    ctx.prefetch(plan(ctx), "baselines")
    results = {(method, task): ctx.run(task, method, seed, **hp) for task, method, seed, hp in plan(ctx)}

    total = results[("full", TASKS[0])].total_params
    header = ["Method", "# Trainable", "% of model"]
    header += [h for t in TASKS for h in (f"{t} {TASK_METRICS[t]} ↑", f"{t} NLL ↓")] + ["Avg. metric"]
    rows = []
    for method in METHODS:
        runs = [results[(method, t)] for t in TASKS]
        n = runs[0].trainable_params
        metrics = [r.metric for r in runs]
        rows.append([PAPER_NAMES[method], f"{n:,}", f"{100 * n / total:.2f}"]
                    + [v for r in runs for v in (r.metric, nll(r.eval_loss))] + [float(np.mean(metrics))])
    body = markdown_table(header, rows)
    skipped = {t: results[("preembed", t)].skipped_train for t in TASKS}
    lp, li = (results[("preembed", TASKS[0])].hp.get(k) for k in ("l_p", "l_i"))
    body += (
        f"\n\nThe base model has {total:,} parameters. Metrics are on the test split, higher is better; NLL is "
        "the mean negative log-likelihood of the test targets y given x (eq. 2 on held-out data, nats per token, "
        "lower is better), a smooth measure that still ranks methods when a metric is near 0 or at chance. "
        f"PreEmbed (l_p = {lp}, l_i = {li}) leaves {ctx.base.config.block_size - lp - li} of the "
        f"{ctx.base.config.block_size} positions to the task: it skipped "
        + ", ".join(f"{skipped[t]} {t}" for t in TASKS)
        + " training examples that no longer fit, and its answers are cut at that length."
    )
    figures = [_bars(ctx, results), _scatter(ctx, results)]
    text = write_markdown(ctx, "baselines", TITLE, body, figures)
    return {"markdown": text, "figures": figures,
            "results": {f"{m}/{t}": r.metric for (m, t), r in results.items()}}


def _bars(ctx, results) -> str:
    fig = new_figure(7.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(METHODS)
    x = np.arange(len(TASKS))
    for i, method in enumerate(METHODS):
        ax.bar(x + (i - (len(METHODS) - 1) / 2) * width, [results[(method, t)].metric for t in TASKS], width,
               label=PAPER_NAMES[method])
    ax.set_xticks(x)
    ax.set_xticklabels([f"{t}\n({TASK_METRICS[t]})" for t in TASKS])
    ax.set_ylim(0, 1.3)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("test metric (higher is better)")
    ax.set_title("Every method on every task")
    ax.legend(fontsize=7, ncol=4, loc="upper center")
    return write_figure(ctx, fig, "baselines_metric.png")


def _scatter(ctx, results) -> str:
    """Test NLL against trainable parameters (log scale), like the paper's Fig. 2."""
    fig = new_figure(9, 3.2)
    for j, task in enumerate(TASKS):
        ax = fig.add_subplot(1, len(TASKS), j + 1)
        for method in METHODS:
            r = results[(method, task)]
            ax.scatter([r.trainable_params], [r.eval_loss], label=PAPER_NAMES[method])
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_title(task, fontsize=9)
        if j == 0:
            ax.set_ylabel("test NLL (nats/token) ↓")
    fig.axes[-1].legend(fontsize=6)
    return write_figure(ctx, fig, "baselines_params.png")
