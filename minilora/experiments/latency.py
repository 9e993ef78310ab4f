"""Table 1 in miniature: forward latency of adapter layers versus (merged and unmerged) LoRA.

Each cell times one forward pass (inference: ``no_grad``, eval mode) of the base model, LoRA
merged into W (W = W₀ + BA: the base's own cost, Sec. 4.2), LoRA unmerged (W₀x + BAx, one fused
op per adapted layer), Adapter^H (two adapters per block) and Adapter^L (one), for a grid of
batch sizes and sequence lengths. The models are timed interleaved — every repeat runs each of
them once, in a rotating order — so a busy machine slows them all alike; the table reports
medians as % over the base. Adapters are extra layers that run one after another, which costs
most where the pass is short (batch 1, few tokens): the paper's +20–30 % on GPT-2 medium.
"""

from __future__ import annotations

import copy
import functools

import numpy as np

from .. import backend as bk
from .. import lora
from ..methods import apply_method, randomize_zero_init
from ..tensor import no_grad
from ..timing import interleaved, median
from .report import markdown_table, new_figure, write_figure, write_markdown
from .runs import Context

TITLE = "Inference latency of adapters and LoRA (Table 1)"

MODELS = ("base", "lora_merged", "lora_unmerged", "adapter_h", "adapter_l")
NAMES = {"base": "base", "lora_merged": "LoRA (merged)", "lora_unmerged": "LoRA (unmerged)",
         "adapter_h": "Adapter^H", "adapter_l": "Adapter^L"}


def build_models(base) -> dict:
    models = {"base": copy.deepcopy(base)}
    for name, method in (("lora_merged", "lora"), ("lora_unmerged", "lora"), ("adapter_h", "adapter_h"),
                         ("adapter_l", "adapter_l")):
        bk.manual_seed(0)
        model = apply_method(copy.deepcopy(base), method)
        randomize_zero_init(model, std=0.01)  # non-zero updates: a trained adapter
        if name == "lora_merged":
            lora.merge(model)
        models[name] = model
    for model in models.values():
        model.eval()
        model.requires_grad_(False)
    return models


def time_cell(models: dict, batch: int, length: int, repeats: int, vocab: int, seed: int = 0) -> dict:
    """Median seconds of one forward pass per model, timed interleaved in a rotating order."""
    idx = np.random.default_rng(seed).integers(0, vocab, size=(batch, length))
    with no_grad():
        times = interleaved({n: functools.partial(model, idx) for n, model in models.items()}, repeats)
    return {n: median(t) for n, t in times.items()}


def plan(ctx: Context) -> list:
    return []  # no fine-tuning: latency does not depend on the values of the weights


def run(ctx: Context) -> dict:
    s = ctx.settings
    models = build_models(ctx.base)
    vocab = ctx.base.config.vocab_size
    cells = [(b, t) for t in s.latency_lengths for b in s.latency_batches]
    medians = {}
    with ctx.bar(len(cells), "latency") as bar:
        for b, t in cells:
            bar.set_postfix_str(f"batch={b} T={t}")
            medians[(b, t)] = time_cell(models, b, t, s.latency_repeats, vocab)
            bar.update(1)
    header = ["Batch", "Seq. length", "base (ms)"] + [f"{NAMES[m]} (%)" for m in MODELS[1:]]
    rows = []
    for b, t in cells:
        m = medians[(b, t)]
        rows.append([b, t, 1e3 * m["base"]] + [_overhead(m[n], m["base"]) for n in MODELS[1:]])
    body = markdown_table(header, rows)
    body += (f"\n\nMedian of {s.latency_repeats} interleaved forward passes per cell (NumPy, float32, "
             "inference mode); % = latency over the base model's. Adapter bottleneck widths as in the "
             "baselines; LoRA r = 4 on Wq, Wv.")
    figure = _plot(ctx, medians, s)
    text = write_markdown(ctx, "latency", TITLE, body, [figure])
    return {"markdown": text, "figures": [figure],
            "results": {f"b={b}/T={t}/{n}": _overhead(m[n], m["base"]) for (b, t), m in medians.items()
                        for n in MODELS[1:]}}


def _overhead(seconds: float, base: float) -> float:
    return 100.0 * (seconds / base - 1.0)


def _plot(ctx, medians, s) -> str:
    fig = new_figure(4 * len(s.latency_lengths), 3.3)
    for j, t in enumerate(s.latency_lengths):
        ax = fig.add_subplot(1, len(s.latency_lengths), j + 1)
        for n in MODELS[1:]:
            ax.plot(s.latency_batches, [_overhead(medians[(b, t)][n], medians[(b, t)]["base"])
                                        for b in s.latency_batches], marker="o", label=NAMES[n])
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(f"sequence length {t}", fontsize=9)
        if j == 0:
            ax.set_ylabel("latency over the base (%)")
            ax.legend(fontsize=7)
    return write_figure(ctx, fig, "latency.png")
