"""Table 7 in miniature: how ΔW relates to W (Sec. 7.3).

For the top-r singular directions U, V of ΔW (r = the adapter's rank), ‖UᵀWVᵀ‖_F says how much
of the pre-trained W lies in the subspace the update acts on; it is compared with W's own top-r
directions and with random ones. The amplification factor ‖ΔW‖_F / ‖UᵀWVᵀ‖_F is how strongly
ΔW amplifies directions that W already has (the paper: ≈ 21.5 for r = 4 in GPT-3's layer 48).
"""

from __future__ import annotations

import numpy as np

from .. import backend as bk
from ..analysis import amplification_report
from .report import markdown_table, new_figure, write_figure
from .runs import Context
from .settings import LORA_ALPHA

TITLE = "How the update relates to the pre-trained weight (Table 7)"

RANKS = (4, 64)
TARGETS = ("q", "v")


def plan(ctx: Context) -> list:
    return [(ctx.settings.subspace_task, "lora", 0, {"r": r, "alpha": LORA_ALPHA, "targets": TARGETS}) for r in RANKS]


def collect(ctx: Context) -> dict:
    task = ctx.settings.subspace_task
    runs = {hp["r"]: ctx.run(task, method, seed, **hp) for task, method, seed, hp in plan(ctx)}
    base_weights = {name: bk.to_numpy(p.data).astype(np.float64) for name, p in ctx.base.named_parameters()}
    reports = []
    for r, run_ in runs.items():
        for path, arrays in run_.lora.items():
            report = amplification_report(arrays["delta"], base_weights[f"{path}.weight"], r, seed=0)
            reports.append({"path": path, "r": r, **{k: float(v) for k, v in report.items()}})
    return {"task": task, "ranks": list(RANKS), "layer": f"blocks.{ctx.base.config.n_layer // 2}",
            "paths": list(next(iter(runs.values())).lora), "reports": reports}


def render(data: dict, page) -> tuple[str, list]:
    reports = {(rp["path"], rp["r"]): rp for rp in data["reports"]}
    ranks, layer = data["ranks"], data["layer"]
    # the paper's layout for one layer and Wq: rows = the three projections, columns = r × {ΔWq, Wq, random}
    header = [""] + [f"r = {r}: {col}" for r in ranks for col in ("ΔWq", "Wq", "Random")]
    rep = {r: reports[(f"{layer}.attn.q", r)] for r in ranks}
    paper_rows = [
        ["‖UᵀWqVᵀ‖_F"] + [rep[r][k] for r in ranks for k in ("projection_delta_W", "projection_W", "projection_random")],
        ["‖Wq‖_F"] + [v for r in ranks for v in (rep[r]["norm_W"], "", "")],
        ["‖ΔWq‖_F"] + [v for r in ranks for v in (rep[r]["norm_delta_W"], "", "")],
        ["factor ‖ΔWq‖_F / ‖UᵀWqVᵀ‖_F"] + [v for r in ranks for v in (rep[r]["amplification_factor"], "", "")],
    ]
    all_header = ["Matrix", "r", "‖UᵀWVᵀ‖ (ΔW dirs)", "(W's top-r)", "(random)", "‖W‖_F", "‖ΔW‖_F", "factor"]
    all_rows = [[_short(path), r, rp["projection_delta_W"], rp["projection_W"], rp["projection_random"],
                 rp["norm_W"], rp["norm_delta_W"], rp["amplification_factor"]]
                for (path, r), rp in sorted(reports.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    body = (
        f"LoRA on Wq and Wv, trained on `{data['task']}` (α = {LORA_ALPHA:g}, ΔW = (α/r)·B·A, seed 0); U, V are "
        f"the top-r singular vectors of ΔW, of W itself, or random (r = the adapter's rank). {layer}, Wq, in the "
        "layout of the paper's Table 7:\n\n"
        + markdown_table(header, paper_rows)
        + "\n\nEvery adapted matrix:\n\n" + markdown_table(all_header, all_rows)
    )
    return body, [_plot(page, data, reports)]


def _short(path: str) -> str:
    parts = path.split(".")
    return f"W{parts[-1]}, layer {parts[1]}" if len(parts) >= 4 else path


def _plot(page, data, reports) -> str:
    paths, ranks = data["paths"], data["ranks"]
    fig = new_figure(4.2 * len(ranks), 3.4)
    x = np.arange(len(paths))
    for j, r in enumerate(ranks):
        ax = fig.add_subplot(1, len(ranks), j + 1)
        for i, (key, name) in enumerate((("projection_delta_W", "ΔW's top-r"), ("projection_W", "W's top-r"),
                                          ("projection_random", "random"))):
            ax.bar(x + (i - 1) * 0.27, [reports[(p, r)][key] for p in paths], 0.27, label=f"‖UᵀWVᵀ‖, {name}")
        ax.plot(x, [reports[(p, r)]["norm_delta_W"] for p in paths], "k_", markersize=14, label="‖ΔW‖_F")
        ax.set_yscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels([_short(p).replace(", layer ", "\nL") for p in paths], fontsize=7)
        ax.set_title(f"r = {r}", fontsize=9)
        if j == 0:
            ax.legend(fontsize=6)
    return write_figure(page, fig, "amplification.png")
