"""Table 1 in miniature: forward latency of adapter layers versus (merged and unmerged) LoRA.

Each cell times one forward pass (inference: ``no_grad``, eval mode) of the base model, LoRA
merged into W (W = W₀ + BA: the base's own cost, Sec. 4.2), LoRA unmerged (W₀x + BAx, one fused
op per adapted layer), Adapter^H (two adapters per block) and Adapter^L (one), for a grid of
batch sizes and sequence lengths. The models are timed interleaved — every repeat runs each of
them once, in a rotating order — so a busy machine slows them all alike. The whole grid is timed
``latency_rounds`` times; each cell reports the overhead over the base (% of the base's median)
as the mean ± std over rounds, and its range, so "no extra latency" can only be read within that band. Adapters are extra layers that run one after another, which costs
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
from .report import markdown_table, new_figure, write_figure
from .runs import Context
from .stats import spread

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


def collect(ctx: Context) -> dict:
    s = ctx.settings
    models = build_models(ctx.base)
    vocab = ctx.base.config.vocab_size
    cells = [(b, t) for t in s.latency_lengths for b in s.latency_batches]
    rounds = []  # rounds[i][cell] = {model: median seconds}
    with ctx.bar(len(cells) * s.latency_rounds, "latency") as bar:
        for i in range(s.latency_rounds):
            medians = {}
            for b, t in cells:
                bar.set_postfix_str(f"round {i + 1} batch={b} T={t}")
                medians[f"{b}x{t}"] = time_cell(models, b, t, s.latency_repeats, vocab, seed=i)
                bar.update(1)
            rounds.append(medians)
    out = {}
    for b, t in cells:
        key = f"{b}x{t}"
        base_ms = [1e3 * rnd[key]["base"] for rnd in rounds]
        out[key] = {"batch": b, "length": t, "base_ms": spread(base_ms),
                    "overhead": {n: spread([_overhead(rnd[key][n], rnd[key]["base"]) for rnd in rounds])
                                 for n in MODELS[1:]}}
    return {"cells": out, "rounds": s.latency_rounds, "repeats": s.latency_repeats,
            "batches": list(s.latency_batches), "lengths": list(s.latency_lengths)}


def _pm(s: dict) -> str:
    return f"{s['mean']:+.1f} ± {s['std']:.1f}"


def render(data: dict, page) -> tuple[str, list]:
    header = ["Batch", "Seq. length", "base (ms)"] + [f"{NAMES[m]} (%)" for m in MODELS[1:]]
    rows = [[c["batch"], c["length"], c["base_ms"]["mean"]] + [_pm(c["overhead"][n]) for n in MODELS[1:]]
            for c in data["cells"].values()]
    body = markdown_table(header, rows)
    band = {n: (min(min(c["overhead"][n]["values"]) for c in data["cells"].values()),
                max(max(c["overhead"][n]["values"]) for c in data["cells"].values())) for n in MODELS[1:]}
    body += (f"\n\nEach round times every cell with the median of {data['repeats']} interleaved forward passes "
             f"(NumPy, float32, inference mode); a cell is the mean ± std over {data['rounds']} rounds of the "
             "latency over the base model's (%). Adapter bottleneck widths as in the baselines; LoRA r = 4 on Wq, Wv. "
             "Over every cell and round the overheads ranged: "
             + "; ".join(f"{NAMES[n]} {lo:+.1f} % to {hi:+.1f} %" for n, (lo, hi) in band.items()) + ".")
    return body, [_plot(page, data)]


def _overhead(seconds: float, base: float) -> float:
    return 100.0 * (seconds / base - 1.0)


def _plot(page, data) -> str:
    lengths, batches = data["lengths"], data["batches"]
    fig = new_figure(4 * len(lengths), 3.3)
    for j, t in enumerate(lengths):
        ax = fig.add_subplot(1, len(lengths), j + 1)
        for n in MODELS[1:]:
            points = [data["cells"][f"{b}x{t}"]["overhead"][n] for b in batches]
            ax.errorbar(batches, [p["mean"] for p in points], yerr=[p["std"] for p in points], marker="o",
                        capsize=2, label=NAMES[n])
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(f"sequence length {t}", fontsize=9)
        if j == 0:
            ax.set_ylabel("latency over the base (%)")
            ax.legend(fontsize=7)
    return write_figure(page, fig, "latency.png")
