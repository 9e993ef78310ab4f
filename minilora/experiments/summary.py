"""The Summary table of docs/results.md: each claim of the paper, what the miniature measured, a verdict.

Every verdict follows from the spread over seeds (``stats.compare``): a claim that one setting
beats another "agrees" when the difference exceeds twice its standard error in the paper's
direction, "disagrees" when it does so the other way, and is "within noise" otherwise. A claim
of a tie agrees when the difference is within noise; "matches or beats" agrees unless the
difference goes the other way. Where both sides sit at the metric's ceiling, LoRA against full
fine-tuning is judged on the NLL, which still ranks. Findings whose experiment did not run are
left out.
"""

from __future__ import annotations

import numpy as np

from ..data import TASK_METRICS
from ..methods import PAPER_NAMES
from .stats import compare, format_spread, spread
from .variants import LABELS as VARIANT_LABELS

__all__ = ["findings"]

_BETTER = {"better": "agrees", "worse": "disagrees", "within noise": "within noise", "tie": "within noise"}
_TIE = {"better": "disagrees", "worse": "disagrees", "within noise": "agrees (a tie within noise)",
        "tie": "agrees (equal on every seed)"}


CEILING = 0.995  # a metric this close to 1 for both sides cannot tell them apart
_AT_LEAST = {"better": "agrees (ahead)", "worse": "disagrees", "within noise": "agrees (within noise)",
             "tie": "agrees (equal on every seed)"}


def _claim_at_least(a: dict, b: dict, higher_is_better: bool = True) -> str:
    return _AT_LEAST[compare(a, b, higher_is_better)["verdict"]]


def _claim_better(a: dict, b: dict, higher_is_better: bool = True) -> str:
    return _BETTER[compare(a, b, higher_is_better)["verdict"]]


def _claim_tie(a: dict, b: dict) -> str:
    return _TIE[compare(a, b)["verdict"]]


def _seed_average(cells: dict, method: str, tasks) -> dict:
    """The spread over seeds of a method's metric averaged over tasks (seeds line up across tasks)."""
    per_task = np.array([cells[method][t]["metric"]["values"] for t in tasks])  # (tasks, seeds)
    return spread(per_task.mean(axis=0))


def findings(experiments: dict) -> list[list[str]]:
    """[[finding, here (numbers), verdict], ...] from the experiments' results, in the page's order."""
    readers = (("baselines", _baselines), ("lowdata", _lowdata), ("targets", _targets), ("rank", _rank),
               ("subspace", _subspace), ("amplification", _amplification), ("latency", _latency),
               ("variants", _variants))
    return [row for name, read in readers if name in experiments for row in read(experiments[name])]


def _baselines(data) -> list:
    cells, tasks, rows = data["cells"], data["tasks"], []
    for task in tasks:
        ft, lo = cells["full"][task]["metric"], cells["lora"][task]["metric"]
        measure, higher, digits = TASK_METRICS[task], True, 3
        if min(ft["mean"], lo["mean"]) >= CEILING:  # a tie at the ceiling tests nothing: compare the NLL
            ft, lo = cells["full"][task]["nll"], cells["lora"][task]["nll"]
            measure, higher, digits = "NLL (both at the metric's ceiling)", False, 4
        rows.append([f"LoRA matches or beats full fine-tuning on `{task}` (Tables 2–4)",
                     f"{measure}: FT {format_spread(ft, digits)}, LoRA {format_spread(lo, digits)}",
                     _claim_at_least(lo, ft, higher)])
    for task in tasks:
        base, lo = cells["base"][task]["metric"], cells["lora"][task]["metric"]
        rows.append([f"Fine-tuning (LoRA) improves on the base model on `{task}`",
                     f"base {format_spread(base)}, LoRA {format_spread(lo)}", _claim_better(lo, base)])
    lora_avg = _seed_average(cells, "lora", tasks)
    for other in ("bitfit", "adapter_h", "adapter_l", "preembed"):
        avg = _seed_average(cells, other, tasks)
        rows.append([f"LoRA beats {PAPER_NAMES[other]} at a similar budget (average over the tasks)",
                     f"LoRA {format_spread(lora_avg)}, {PAPER_NAMES[other]} {format_spread(avg)}",
                     _claim_better(lora_avg, avg)])
    return rows


def _lowdata(data) -> list:
    rows, cells = [], data["cells"]
    small = [n for n in data["sizes"] if n <= 64]
    for task in data["tasks"]:
        for n in small:
            ft, lo = cells[task]["full"][str(n)]["metric"], cells[task]["lora"][str(n)]["metric"]
            rows.append([f"With few examples LoRA is ahead of full fine-tuning (Table 16): `{task}`, n = {n}",
                         f"FT {format_spread(ft)}, LoRA {format_spread(lo)}", _claim_better(lo, ft)])
        if "preembed" in cells[task]:
            n = data["sizes"][0]
            pre, lo = cells[task]["preembed"][str(n)]["metric"], cells[task]["lora"][str(n)]["metric"]
            rows.append([f"Prefix tuning falls behind LoRA with few examples (Table 16): `{task}`, n = {n}",
                         f"PreEmbed {format_spread(pre)}, LoRA {format_spread(lo)}", _claim_better(lo, pre)])
    return rows


def _targets(data) -> list:
    rows = []
    for task in data["tasks"]:
        c = data["cells"]
        for what, higher in (("metric", True), ("nll", False)):
            qv, q = c["Wq+Wv"][task][what], c["Wq"][task][what]
            name = TASK_METRICS[task] if what == "metric" else "NLL"
            rows.append([f"At one budget, Wq+Wv (r = 4) beats Wq alone (r = 8) (Table 5): `{task}` {name}",
                         f"Wq+Wv {format_spread(qv, 4 if what == 'nll' else 3)}, "
                         f"Wq {format_spread(q, 4 if what == 'nll' else 3)}", _claim_better(qv, q, higher)])
    return rows


def _rank(data) -> list:
    rows = []
    for task in data["tasks"]:
        cells, rs = data["cells"][task]["Wq+Wv"], data["ranks"]
        low, high = cells[str(rs[0])]["metric"], cells[str(rs[-1])]["metric"]
        rows.append([f"A very small rank suffices (Table 6): `{task}`, Wq+Wv, r = {rs[0]} against r = {rs[-1]}",
                     f"{TASK_METRICS[task]}: r = {rs[0]} {format_spread(low)}, r = {rs[-1]} {format_spread(high)}",
                     _claim_tie(low, high)])
    return rows


def _subspace(data) -> list:
    values = [r["cells"][0] for r in data["rows"]["A"]]
    control = data["control"]["cells"][0]
    above = sum(v > 2 * control for v in values)
    verdict = "agrees" if above == len(values) else ("partly" if above else "disagrees")
    return [["The top direction of an r = 8 and an r = 64 adapter overlap (Fig. 3): φ(1, 1) of A",
             f"{min(values):.2f} to {max(values):.2f} over {len(values)} matrices; random {control:.2f}; "
             f"{above} of {len(values)} above twice random", verdict]]


def _amplification(data) -> list:
    reports = {(rp["path"], rp["r"]): rp for rp in data["reports"]}
    path = f"{data['layer']}.attn.q"
    factors = {r: reports[(path, r)]["amplification_factor"] for r in data["ranks"]}
    small, large = data["ranks"][0], data["ranks"][-1]
    verdict = "agrees" if factors[small] > 1 and factors[small] > factors[large] else "disagrees"
    return [[f"ΔW amplifies directions W does not emphasise, more at small r (Table 7): {data['layer']} Wq",
             f"factor {factors[small]:.1f} at r = {small}, {factors[large]:.1f} at r = {large}", verdict]]


def _latency(data) -> list:
    merged = [v for c in data["cells"].values() for v in c["overhead"]["lora_merged"]["values"]]
    first = next(iter(data["cells"].values()))
    adapter = first["overhead"]["adapter_h"]
    zero = {"mean": 0.0, "std": 0.0, "n": 1, "values": [0.0]}
    return [
        ["Merged LoRA adds no inference latency (Sec. 4.2, Table 1)",
         f"{min(merged):+.1f} % to {max(merged):+.1f} % over every cell and round",
         "agrees within that band" if min(merged) <= 0.0 <= max(merged) else "disagrees"],
        [f"Adapter layers add latency at small batch (Table 1): batch {first['batch']}, length {first['length']}",
         f"Adapter^H {adapter['mean']:+.1f} ± {adapter['std']:.1f} %", _claim_better(adapter, zero)],
    ]


def _variants(data) -> list:
    cells, rows = data["cells"], []
    claims = (("dora", "DoRA beats LoRA (Liu et al. 2024)", _claim_better),
              ("pissa", "PiSSA beats LoRA (Meng et al. 2024)", _claim_better),
              ("lora+", "LoRA+ beats LoRA (Hayou et al. 2024)", _claim_better),
              ("qlora", "LoRA on an NF4 base matches LoRA (Dettmers et al. 2023)", _claim_tie))
    for task in data["tasks"]:
        lo = cells[f"{task}/lora/r=4"]["metric"]
        for variant, claim, judge in claims:
            c = cells[f"{task}/{variant}/r=4"]["metric"]
            rows.append([f"{claim}: `{task}`", f"{TASK_METRICS[task]}: LoRA {format_spread(lo)}, "
                         f"{VARIANT_LABELS[variant]} {format_spread(c)}", judge(c, lo)])
    task, large = data["sweep_task"], data["ranks"][-1]
    lo, rs = cells[f"{task}/lora/r={large}"]["eval_loss"], cells[f"{task}/rslora/r={large}"]["eval_loss"]
    rows.append([f"rsLoRA's α/√r trains a large rank better than α/r (Kalajdzievski 2023): `{task}`, r = {large}, NLL",
                 f"α/r {format_spread(lo, 4)}, α/√r {format_spread(rs, 4)}", _claim_better(rs, lo, higher_is_better=False)])
    return rows
