"""Beyond the paper, in miniature: LoRA, rsLoRA, DoRA, PiSSA, LoRA+ and LoRA on a 4-bit NF4 base.

    minilora experiment variants --out DIR [--fast]

Every variant adapts Wq and Wv at r = 4 with α = 8, on the analysis task (``sql``, where LoRA is
far from the metric's ceiling), with LoRA's steps and learning rate for that task
(``methods.hyperparams("lora", task)``) and the same seeds; what changes is only the variant's own
idea:

    variant  what changes                                                       paper
    lora     h = W₀x + (α/r)·B·A·x (the baseline)                                Hu et al. 2021
    dora     h = m ⊙ (W₀ + s·B·A)x / ‖W₀ + s·B·A‖_row, m learned (+d per layer)   Liu et al. 2024
    pissa    A, B start at the top-r singular part of W₀; W₀ -> the residual     Meng et al. 2024
    lora+    lr_B = 16 × lr_A (lr_A = lr / 4)                                    Hayou et al. 2024
    qlora    W₀ stored in NF4 (4.5 bits a value), dequantized on the fly          Dettmers et al. 2023

and rsLoRA (Kalajdzievski 2023) is an r-sweep on the same task: the same runs with the scaling α/r
(LoRA) and α/√r (rsLoRA), r ∈ {1, 4, 32} (at r = 1 the two are the same run). Its claim is that
with α/r large ranks learn too slowly (the update shrinks as 1/r), which α/√r repairs.
Every cell is the mean ± std over the settings' seeds.

Reported per run: the task metric and the test NLL, trainable parameters, time per step, the peak
memory of one training step (tracemalloc: activations, gradients, optimizer state) and the bytes
of the base model's Linear weights as stored (float32, or NF4 codes + scales).
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import functools
import multiprocessing

import numpy as np

from .. import backend as bk
from .. import lora, optim
from ..data import TASK_METRICS, Tokenizer, encode_example, load_task
from ..methods import hyperparams
from ..nn import Linear
from ..recipes import evaluate, peak_step_memory, target_loss, task_batches
from ..train import fit
from .report import markdown_table, new_figure, write_figure
from .runs import Context, one_blas_thread_for_children
from .settings import LORA_ALPHA
from .stats import format_spread, spread

TITLE = "Beyond the paper: DoRA, PiSSA, LoRA+, rsLoRA and an NF4 base (QLoRA)"

VARIANTS = ("lora", "dora", "pissa", "lora+", "qlora")
LABELS = {"lora": "LoRA", "dora": "DoRA", "pissa": "PiSSA", "lora+": "LoRA+ (λ = 16)", "qlora": "LoRA on NF4 (QLoRA)",
          "rslora": "rsLoRA"}
R, TARGETS = 4, ("q", "v")
LORA_PLUS_RATIO, LORA_PLUS_LR_DIVISOR = 16.0, 4.0  # the paper's λ = 2⁴; lr_A = lr / 4 so that lr_B = 4 lr stays sane
SWEEP_RANKS, FAST_SWEEP_RANKS = (1, 4, 32), (1, 8)
NF4_BLOCK = 64


def plan(ctx: Context) -> list:
    """No run goes through the shared baseline cache: every run here is a variant (see ``jobs``)."""
    return []


def tasks(ctx: Context) -> tuple:
    return tuple(ctx.settings.analysis_tasks)


def jobs(ctx: Context) -> list:
    """(task, variant, r, seed) of every run: each variant on each task, and the r-sweep on the first task."""
    sweep_task = ctx.settings.analysis_tasks[0]
    ranks = FAST_SWEEP_RANKS if ctx.fast else SWEEP_RANKS
    out = [(task, variant, R) for task in tasks(ctx) for variant in VARIANTS]
    out += [(sweep_task, variant, r) for variant in ("lora", "rslora") for r in ranks if (variant, r) != ("rslora", 1)]
    out = list(dict.fromkeys(out))  # rsLoRA at r = 1 is LoRA at r = 1 (α/√1 = α/1): one run
    return [(task, variant, r, seed) for task, variant, r in out for seed in ctx.settings.seeds]


def _key(task, variant, r) -> str:
    return f"{task}/{'lora' if (variant, r) == ('rslora', 1) else variant}/r={r}"


def size(ctx: Context, task: str) -> dict:
    """steps, lr, batch_size, n_train, n_eval, max_new_tokens of every run on ``task``."""
    s = ctx.settings
    hp = hyperparams("lora", task)
    return {"steps": s.steps if s.steps is not None else hp["steps"], "lr": hp["lr"], "batch_size": s.batch_size,
            "length_group": hp.get("length_group", 1), "n_train": s.n_train, "n_eval": s.n_eval,
            "max_new_tokens": s.max_new_tokens}


def train_variant(base, s: dict, task: str, variant: str, r: int, seed: int = 0) -> dict:
    """One fine-tuning run of ``variant`` at rank ``r`` on ``task`` (``s``: ``size(ctx)``): one table row."""
    tokenizer = Tokenizer.default()
    model = copy.deepcopy(base)
    bk.manual_seed(seed)
    linear_bytes = sum(m.weight.data.nbytes for _, m in model.named_modules() if isinstance(m, Linear))
    config = lora.LoRAConfig(r=r, alpha=LORA_ALPHA, target_modules=TARGETS, use_dora=variant == "dora",
                             init="pissa" if variant == "pissa" else "kaiming", use_rslora=variant == "rslora")
    lora.apply_lora(model, config, adapter_name=task)
    lora.mark_only_lora_as_trainable(model)
    stored_bytes = linear_bytes
    if variant == "qlora":
        report = lora.quantize_base(model, "nf4", block_size=NF4_BLOCK)
        stored_bytes = linear_bytes - report.original_bytes + report.nf4_bytes
    if variant == "lora+":
        params = optim.lora_plus_param_groups(model, lr=s["lr"] / LORA_PLUS_LR_DIVISOR, ratio=LORA_PLUS_RATIO)
    else:
        params = model.named_parameters(trainable_only=True)
    optimizer = optim.AdamW(params, lr=s["lr"], weight_decay=0.0)
    steps = s["steps"]
    scheduler = optim.LRScheduler(optimizer, functools.partial(optim.warmup_linear, total=steps,
                                                               warmup=max(1, steps // 10)))
    train = [ex for ex in load_task(task, "train", s["n_train"])
             if len(encode_example(tokenizer, ex)[0]) <= model.config.block_size]
    get_batch = task_batches(train, tokenizer, s["batch_size"], seed, model.config.block_size,
                             length_group=s["length_group"])
    peak = peak_step_memory(model, optimizer, get_batch)
    history = fit(model, optimizer, get_batch, steps, scheduler=scheduler, progress=False, desc=f"{task}/{variant}")
    evaluation = load_task(task, "test", s["n_eval"])
    model.eval()
    metric_name, metric, _ = evaluate(model, task, evaluation, tokenizer, max_new_tokens=s["max_new_tokens"])
    return {"task": task, "variant": variant, "r": r, "seed": seed, "scaling": config.scaling, "metric_name": metric_name,
            "metric": float(metric), "eval_loss": float(target_loss(model, evaluation, tokenizer)),
            "trainable_params": int(model.num_parameters(trainable_only=True)),
            "ms_per_step": 1000.0 * history.seconds / max(1, steps), "peak_step_bytes": int(peak),
            "optimizer_state_bytes": int(optimizer.state_bytes()), "base_linear_bytes": int(stored_bytes),
            "final_loss": float(np.mean(history.losses[-10:])) if history.losses else float("nan")}


_WORKER: dict = {}


def _init(base, sizes) -> None:
    import warnings

    warnings.simplefilter("ignore")
    _WORKER["base"], _WORKER["sizes"] = base, sizes


def _work(task, variant, r, seed) -> dict:
    return train_variant(_WORKER["base"], _WORKER["sizes"][task], task, variant, r, seed)


def _train_all(ctx: Context, todo: list) -> list:
    """Every job's row, ``ctx.workers`` processes at a time (each with one BLAS thread), in ``todo``'s order."""
    sizes = {task: size(ctx, task) for task in {job[0] for job in todo}}
    results = {}
    with ctx.bar(len(todo), "variants") as bar:
        if ctx.workers <= 1 or len(todo) == 1:
            for job in todo:
                results[job] = train_variant(ctx.base, sizes[job[0]], *job)
                bar.update(1)
        else:
            with one_blas_thread_for_children(), cf.ProcessPoolExecutor(
                    max_workers=min(ctx.workers, len(todo)), mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init, initargs=(ctx.base, sizes)) as pool:
                futures = {pool.submit(_work, *job): job for job in todo}
                for future in cf.as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update(1)
    return [results[job] for job in todo]


AGGREGATED = ("metric", "eval_loss", "ms_per_step", "peak_step_bytes", "final_loss")


def collect(ctx: Context) -> dict:
    rows = _train_all(ctx, jobs(ctx))
    cells = {}
    for row in rows:
        cells.setdefault(f"{row['task']}/{row['variant']}/r={row['r']}", []).append(row)
    out = {}
    for key, group in cells.items():
        first = group[0]
        out[key] = {**{k: first[k] for k in ("task", "variant", "r", "scaling", "metric_name", "trainable_params",
                                                "optimizer_state_bytes", "base_linear_bytes")},
                    **{k: spread([g[k] for g in group]) for k in AGGREGATED}}
    task0 = tasks(ctx)[0]
    return {"tasks": list(tasks(ctx)), "sweep_task": ctx.settings.analysis_tasks[0],
            "ranks": list(FAST_SWEEP_RANKS if ctx.fast else SWEEP_RANKS), "size": size(ctx, task0),
            "runs": rows, "cells": out}


def render(data: dict, page) -> tuple[str, list]:
    cells, size_ = data["cells"], data["size"]
    header = ["Task", "Variant", "Trainable params", "Metric ↑", "NLL ↓", "ms / step", "Peak step memory (KiB)",
              "Base Linear weights (KiB)"]
    rows = []
    for task in data["tasks"]:
        for variant in VARIANTS:
            c = cells[_key(task, variant, R)]
            rows.append([f"{task} ({TASK_METRICS[task]})", LABELS[variant], f"{c['trainable_params']:,}",
                         format_spread(c["metric"]), format_spread(c["eval_loss"], 4),
                         f"{c['ms_per_step']['mean']:.0f}", f"{c['peak_step_bytes']['mean'] / 1024:,.0f}",
                         f"{c['base_linear_bytes'] / 1024:,.0f}"])
    body = markdown_table(header, rows, align=["l", "l"] + ["r"] * 6)
    sweep_task, ranks = data["sweep_task"], data["ranks"]
    sweep_rows = []
    for variant, name in (("lora", "α/r (LoRA)"), ("rslora", "α/√r (rsLoRA)")):
        for what, label in (("eval_loss", "NLL ↓"), ("metric", f"{TASK_METRICS[sweep_task]} ↑")):
            sweep_rows.append([f"{name} {label}"] + [format_spread(cells[_key(sweep_task, variant, r)][what],
                                                                    4 if what == "eval_loss" else 3) for r in ranks])
    lr = size_["lr"]
    body += (f"\n\nr = {R} on Wq, Wv, α = {LORA_ALPHA:g}, {size_['steps']} AdamW steps at lr {lr:g} "
             f"(LoRA+: lr_A = {lr / LORA_PLUS_LR_DIVISOR:g}, lr_B = {LORA_PLUS_RATIO:g} × lr_A); NF4 blocks of "
             f"{NF4_BLOCK}; mean ± std over {page.n_seeds} seeds. Peak step memory: tracemalloc's peak during one "
             "training step (it sees NumPy's allocations; the stored weights are not in it). Base Linear weights: "
             "every Linear weight of the base as stored, float32 or NF4 (4-bit codes + a float32 absmax per block)."
             f"\n\n**rsLoRA: the r-sweep on {sweep_task}** (α = {LORA_ALPHA:g} for every r, Wq and Wv):\n\n")
    body += markdown_table(["Scaling"] + [f"r = {r}" for r in ranks], sweep_rows, align=["l"] + ["r"] * len(ranks))
    return body, [_plot(page, data)]


def _plot(page, data) -> str:
    cells, task_list = data["cells"], data["tasks"]
    fig = new_figure(11, 3.6)
    ax = fig.add_subplot(1, 2, 1)
    width = 0.8 / len(VARIANTS)
    for j, variant in enumerate(VARIANTS):
        c = [cells[_key(task, variant, R)]["metric"] for task in task_list]
        ax.bar(np.arange(len(task_list)) + (j - (len(VARIANTS) - 1) / 2) * width, [x["mean"] for x in c], width,
               yerr=[x["std"] for x in c], capsize=2, label=LABELS[variant])
    ax.set_ylim(0, 1.05)
    ax.set_xticks(np.arange(len(task_list)))
    ax.set_xticklabels(task_list)
    ax.set_ylabel("test metric ↑")
    ax.set_title(f"variants at r = {R} on Wq, Wv", fontsize=9)
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 2, 2)
    sweep_task, ranks = data["sweep_task"], data["ranks"]
    for variant, name in (("lora", "α/r (LoRA)"), ("rslora", "α/√r (rsLoRA)")):
        points = [cells[_key(sweep_task, variant, r)]["eval_loss"] for r in ranks]
        ax.errorbar(ranks, [p["mean"] for p in points], yerr=[p["std"] for p in points], marker="o", capsize=2,
                    label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks)
    ax.set_xticklabels([str(r) for r in ranks])
    ax.set_xlabel("rank r")
    ax.set_ylabel("test NLL ↓")
    ax.set_title(f"{sweep_task}: scaling α/r against α/√r", fontsize=9)
    ax.legend(fontsize=7)
    return write_figure(page, fig, "variants.png")
