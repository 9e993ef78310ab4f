"""Beyond the paper, in miniature: LoRA, rsLoRA, DoRA, PiSSA, LoRA+ and LoRA on a 4-bit NF4 base.

    minilora experiment variants --out DIR [--fast]

Every variant adapts Wq and Wv at r = 4 with α = 8, on each of the three tasks, with the same
steps, learning rate and seed; what changes is only the variant's own idea:

    variant  what changes                                                       paper
    lora     h = W₀x + (α/r)·B·A·x (the baseline)                                Hu et al. 2021
    dora     h = m ⊙ (W₀ + s·B·A)x / ‖W₀ + s·B·A‖_row, m learned (+d per layer)   Liu et al. 2024
    pissa    A, B start at the top-r singular part of W₀; W₀ -> the residual     Meng et al. 2024
    lora+    lr_B = 16 × lr_A (lr_A = lr / 4)                                    Hayou et al. 2024
    qlora    W₀ stored in NF4 (4.5 bits a value), dequantized on the fly          Dettmers et al. 2023

and rsLoRA (Kalajdzievski 2023) is an r-sweep on one task: the same runs with the scaling α/r
(LoRA) and α/√r (rsLoRA), r ∈ {1, 4, 32} (at r = 1 the two are the same run). Its claim is that
with α/r large ranks learn too slowly (the update shrinks as 1/r), which α/√r repairs.

The size is pinned here, not taken from ``minilora.methods.HYPERPARAMS`` (300 steps at lr 1e-2 for
LoRA): ``RUN_STEPS`` = 200 steps at the same lr 1e-2 and ``RUN_EVAL`` = 100 test examples, so that
the 19 runs fit in about 10 CPU-minutes.

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
from ..data import TASK_METRICS, TASKS, Tokenizer, encode_example, load_task
from ..nn import Linear
from ..recipes import evaluate, peak_step_memory, target_loss, task_batches
from ..train import fit
from .report import markdown_table, new_figure, nll, write_figure
from .runs import Context, one_blas_thread_for_children
from .settings import LORA_ALPHA

TITLE = "Beyond the paper: DoRA, PiSSA, LoRA+, rsLoRA and an NF4 base (QLoRA)"

VARIANTS = ("lora", "dora", "pissa", "lora+", "qlora")
LABELS = {"lora": "LoRA", "dora": "DoRA", "pissa": "PiSSA", "lora+": "LoRA+ (λ = 16)", "qlora": "LoRA on NF4 (QLoRA)",
          "rslora": "rsLoRA"}
R, TARGETS = 4, ("q", "v")
RUN_STEPS, RUN_EVAL = 200, 100  # full size (fast: the experiments' FAST_SETTINGS)
LR = 1e-2  # LoRA's better learning rate of the 300-step sweep (docs/results.md)
LORA_PLUS_RATIO, LORA_PLUS_LR_A = 16.0, LR / 4  # lr_B = 4e-2: the paper's λ = 2⁴, lr_A lowered so lr_B stays sane
SWEEP_RANKS, FAST_SWEEP_RANKS = (1, 4, 32), (1, 8)
NF4_BLOCK = 64


def plan(ctx: Context) -> list:
    """No run goes through the shared baseline cache: every run here is a variant (see ``jobs``)."""
    return []


def tasks(ctx: Context) -> tuple:
    return ("classify",) if ctx.fast else TASKS


def jobs(ctx: Context) -> list:
    """(task, variant, r) of every run: each variant on each task, and the r-sweep on the analysis task."""
    sweep_task = ctx.settings.analysis_tasks[0]
    ranks = FAST_SWEEP_RANKS if ctx.fast else SWEEP_RANKS
    out = [(task, variant, R) for task in tasks(ctx) for variant in VARIANTS]
    out += [(sweep_task, variant, r) for variant in ("lora", "rslora") for r in ranks if (variant, r) != ("rslora", 1)]
    return list(dict.fromkeys(out))  # rsLoRA at r = 1 is LoRA at r = 1 (α/√1 = α/1): one run


def _row(results, task, variant, r):
    return results[(task, "lora" if (variant, r) == ("rslora", 1) else variant, r)]


def size(ctx: Context) -> dict:
    """steps, batch_size, n_train, n_eval, max_new_tokens of every run."""
    s = ctx.settings
    if ctx.fast:
        return {"steps": s.steps, "batch_size": s.batch_size, "n_train": s.n_train, "n_eval": s.n_eval,
                "max_new_tokens": s.max_new_tokens}
    return {"steps": RUN_STEPS, "batch_size": s.batch_size, "n_train": s.n_train, "n_eval": RUN_EVAL,
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
        params = optim.lora_plus_param_groups(model, lr=LORA_PLUS_LR_A, ratio=LORA_PLUS_RATIO)
    else:
        params = model.named_parameters(trainable_only=True)
    optimizer = optim.AdamW(params, lr=LR, weight_decay=0.0)
    steps = s["steps"]
    scheduler = optim.LRScheduler(optimizer, functools.partial(optim.warmup_linear, total=steps,
                                                               warmup=max(1, steps // 10)))
    train = [ex for ex in load_task(task, "train", s["n_train"])
             if len(encode_example(tokenizer, ex)[0]) <= model.config.block_size]
    get_batch = task_batches(train, tokenizer, s["batch_size"], seed, model.config.block_size)
    peak = peak_step_memory(model, optimizer, get_batch)
    history = fit(model, optimizer, get_batch, steps, scheduler=scheduler, progress=False, desc=f"{task}/{variant}")
    evaluation = load_task(task, "test", s["n_eval"])
    model.eval()
    metric_name, metric, _ = evaluate(model, task, evaluation, tokenizer, max_new_tokens=s["max_new_tokens"])
    return {"task": task, "variant": variant, "r": r, "scaling": config.scaling, "metric_name": metric_name,
            "metric": float(metric), "eval_loss": float(target_loss(model, evaluation, tokenizer)),
            "trainable_params": int(model.num_parameters(trainable_only=True)),
            "ms_per_step": 1000.0 * history.seconds / max(1, steps), "peak_step_bytes": int(peak),
            "optimizer_state_bytes": int(optimizer.state_bytes()), "base_linear_bytes": int(stored_bytes),
            "final_loss": float(np.mean(history.losses[-10:])) if history.losses else float("nan")}


_WORKER: dict = {}


def _init(base, settings) -> None:
    import warnings

    warnings.simplefilter("ignore")
    _WORKER["base"], _WORKER["settings"] = base, settings


def _work(task, variant, r) -> dict:
    return train_variant(_WORKER["base"], _WORKER["settings"], task, variant, r)


def _train_all(ctx: Context, todo: list) -> dict:
    """{(task, variant, r): row}, ``ctx.workers`` processes at a time (each with one BLAS thread)."""
    results = {}
    with ctx.bar(len(todo), "variants") as bar:
        if ctx.workers <= 1 or len(todo) == 1:
            for job in todo:
                results[job] = train_variant(ctx.base, size(ctx), *job)
                bar.update(1)
            return results
        with one_blas_thread_for_children(), cf.ProcessPoolExecutor(
                max_workers=min(ctx.workers, len(todo)), mp_context=multiprocessing.get_context("spawn"),
                initializer=_init, initargs=(ctx.base, size(ctx))) as pool:
            futures = {pool.submit(_work, *job): job for job in todo}
            for future in cf.as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
    return results


def run(ctx: Context) -> dict:
    todo = jobs(ctx)
    results = _train_all(ctx, todo)
    body = _tables(ctx, results)
    figure = _plot(ctx, results)
    text = _write_markdown(ctx, body, figure)
    return {"markdown": text, "figures": [figure],
            "results": {f"{t}/{v}/r={r}": row["metric"] for (t, v, r), row in results.items()}}


def _tables(ctx: Context, results: dict) -> str:
    header = ["Task", "Variant", "Trainable params", "Metric ↑", "NLL ↓", "ms / step", "Peak step memory (KiB)",
              "Base Linear weights (KiB)"]
    rows = []
    for task in tasks(ctx):
        for variant in VARIANTS:
            row = results[(task, variant, R)]
            rows.append([f"{task} ({TASK_METRICS[task]})", LABELS[variant], f"{row['trainable_params']:,}",
                         row["metric"], nll(row["eval_loss"]), f"{row['ms_per_step']:.0f}",
                         f"{row['peak_step_bytes'] / 1024:,.0f}", f"{row['base_linear_bytes'] / 1024:,.0f}"])
    body = markdown_table(header, rows, align=["l", "l"] + ["r"] * 6)
    sweep_task = ctx.settings.analysis_tasks[0]
    ranks = FAST_SWEEP_RANKS if ctx.fast else SWEEP_RANKS
    sweep_header = ["Scaling"] + [f"r = {r}" for r in ranks]
    sweep_rows = []
    for variant, name in (("lora", "α/r (LoRA)"), ("rslora", "α/√r (rsLoRA)")):
        for what, label in (("eval_loss", "NLL ↓"), ("metric", f"{TASK_METRICS[sweep_task]} ↑")):
            values = [_row(results, sweep_task, variant, r)[what] for r in ranks]
            sweep_rows.append([f"{name} {label}"] + ([nll(v) for v in values] if what == "eval_loss" else values))
    body += (f"\n\nr = {R} on Wq, Wv, α = {LORA_ALPHA:g}, AdamW lr {LR:g} (LoRA+: lr_A = {LORA_PLUS_LR_A:g}, "
             f"lr_B = {LORA_PLUS_RATIO:g} × lr_A); NF4 blocks of {NF4_BLOCK}. Peak step memory: tracemalloc's peak "
             "during one training step (it sees NumPy's allocations; the stored weights are not in it). Base Linear "
             "weights: every Linear weight of the base as stored, float32 or NF4 (4-bit codes + a float32 absmax "
             "per block).\n\n"
             f"**rsLoRA: the r-sweep on {sweep_task}** (α = {LORA_ALPHA:g} for every r, Wq and Wv):\n\n")
    body += markdown_table(sweep_header, sweep_rows, align=["l"] + ["r"] * len(ranks))
    return body


def _plot(ctx: Context, results: dict) -> str:
    fig = new_figure(11, 3.6)
    ax = fig.add_subplot(1, 2, 1)
    task_list = tasks(ctx)
    width = 0.8 / len(VARIANTS)
    for j, variant in enumerate(VARIANTS):  # the tasks' NLLs differ 10×: show each relative to LoRA's
        values = [results[(task, variant, R)]["eval_loss"] / results[(task, "lora", R)]["eval_loss"]
                  for task in task_list]
        ax.bar(np.arange(len(task_list)) + (j - (len(VARIANTS) - 1) / 2) * width, values, width, label=LABELS[variant])
    ax.axhline(1.0, color="black", lw=0.6)
    ax.set_ylim(0.85 * min(p.get_height() for p in ax.patches), 1.02 * max(p.get_height() for p in ax.patches))
    ax.set_xticks(np.arange(len(task_list)))
    ax.set_xticklabels(task_list)
    ax.set_ylabel("test NLL / LoRA's test NLL ↓")
    ax.set_title(f"variants at r = {R} on Wq, Wv", fontsize=9)
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 2, 2)
    sweep_task = ctx.settings.analysis_tasks[0]
    ranks = FAST_SWEEP_RANKS if ctx.fast else SWEEP_RANKS
    for variant, name in (("lora", "α/r (LoRA)"), ("rslora", "α/√r (rsLoRA)")):
        ax.plot(ranks, [_row(results, sweep_task, variant, r)["eval_loss"] for r in ranks], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks)
    ax.set_xticklabels([str(r) for r in ranks])
    ax.set_xlabel("rank r")
    ax.set_ylabel("test NLL ↓")
    ax.set_title(f"{sweep_task}: scaling α/r against α/√r", fontsize=9)
    ax.legend(fontsize=7)
    return write_figure(ctx, fig, "variants.png")


def _write_markdown(ctx: Context, body: str, figure: str) -> str:
    """``variants.md``: like the other experiments', with this experiment's own run size in the settings line."""
    s = size(ctx)
    lines = [f"## {TITLE}", "", body.strip(), "", f"![{figure}]({figure})", "",
             f"_Settings: {'--fast, ' if ctx.fast else ''}{s['steps']} AdamW steps of batch {s['batch_size']}, "
             f"{'all' if s['n_train'] is None else s['n_train']} training examples, {s['n_eval']} test examples per "
             f"run, greedy decoding; base: {ctx.base_note}._", ""]
    text = "\n".join(lines)
    with open(ctx.path("variants.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text
