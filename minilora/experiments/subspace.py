"""Figs. 3 and 4 in miniature: subspace similarity φ between adapters (Sec. 7.2).

φ(A₁, A₂, i, j) = ‖U₁ⁱᵀU₂ʲ‖²_F / min(i, j) over the top right-singular vectors of the A matrices
(``minilora.analysis``). Fig. 3 compares A of an r = 8 and an r = 64 adapter trained on the same
task and matrices (Wq, Wv) — from different seeds, so that their initial A share no rows; Fig. 4
two r = 64 adapters that differ only in the random seed. The
control is a pair of random Gaussian matrices of the same shapes: for random subspaces of a
k-dimensional space E[φ(i, j)] = max(i, j) / k, which is small for GPT-3 (k = 12288) but not for
k = 128, so the control matters more here than in the paper.

The paper's φ reads A alone. A starts random and moves slowly while B is still small, so a second
view (also in the table) uses the right-singular vectors of the update ΔW = (α/r)·B·A, which
span the same row space as A but are ordered by what the adapter actually adds.
"""

from __future__ import annotations

import numpy as np

from ..analysis import subspace_similarity_grid
from .report import markdown_table, new_figure, write_figure
from .runs import Context
from .settings import LORA_ALPHA

TITLE = "Subspace similarity between adapters (Figs. 3 and 4)"

R_SMALL, R_LARGE = 8, 64
TARGETS = ("q", "v")
SEEDS = (0, 1)


def _grid(m1, m2, r1, r2) -> np.ndarray:
    """φ(i, j) for i ≤ r1, j ≤ r2 (for ΔW the directions beyond its rank are meaningless)."""
    return subspace_similarity_grid(m1, m2)[:r1, :r2]


def _random_grid(r1, r2, k, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return subspace_similarity_grid(rng.standard_normal((r1, k)), rng.standard_normal((r2, k)))


def plan(ctx: Context) -> list:
    return [(ctx.settings.subspace_task, "lora", seed, {"r": r, "alpha": LORA_ALPHA, "targets": TARGETS})
            for r, seed in ((R_SMALL, SEEDS[0]), (R_LARGE, SEEDS[0]), (R_LARGE, SEEDS[1]))]


def _cells(rank_grid, seed_grid) -> list:
    return [rank_grid[0, 0], rank_grid[0, R_SMALL - 1], rank_grid[R_SMALL - 1, R_LARGE - 1],
            seed_grid[0, 0], seed_grid[R_SMALL - 1, R_SMALL - 1], seed_grid[R_LARGE // 2 - 1, R_LARGE // 2 - 1]]


def _rounded(grid) -> list:
    return np.round(np.asarray(grid, dtype=np.float64), 4).tolist()


def collect(ctx: Context) -> dict:
    task = ctx.settings.subspace_task
    runs = {(hp["r"], seed): ctx.run(task, method, seed, **hp) for task, method, seed, hp in plan(ctx)}
    # r = 8 (seed 0) against r = 64 of the OTHER seed: with one seed the r = 8 run's first A would start
    # as the first 8 rows of the r = 64 run's (the same random stream), an overlap that training did not make
    small, large, other = runs[(R_SMALL, 0)], runs[(R_LARGE, 0)], runs[(R_LARGE, 1)]
    paths = list(large.lora)  # "blocks.0.attn.q", ...
    k = large.lora[paths[0]]["A"].shape[1]
    random_rank = _random_grid(R_SMALL, R_LARGE, k, 0)
    random_seed = _random_grid(R_LARGE, R_LARGE, k, 1)
    layer = f"blocks.{ctx.base.config.n_layer // 2}"  # a middle block (the paper shows layer 48 of 96)
    rows, heatmaps = {"A": [], "delta": []}, {}
    for path in paths:
        for view in ("A", "delta"):
            rank_grid = _grid(small.lora[path][view], other.lora[path][view], R_SMALL, R_LARGE)
            seed_grid = _grid(large.lora[path][view], other.lora[path][view], R_LARGE, R_LARGE)
            row = {"matrix": _short(path), "cells": [float(v) for v in _cells(rank_grid, seed_grid)]}
            if view == "A":
                A, A0 = large.lora[path]["A"], large.lora[path]["A0"]
                row["moved"] = float(np.linalg.norm(A - A0) / np.linalg.norm(A0))
            rows[view].append(row)
            if path.startswith(layer + "."):
                heatmaps[f"{path}|{view}|rank"] = _rounded(rank_grid)
                heatmaps[f"{path}|{view}|seed"] = _rounded(seed_grid)
    control = {"matrix": "random Gaussian", "cells": [float(v) for v in _cells(random_rank, random_seed)]}
    heatmaps["random|rank"], heatmaps["random|seed"] = _rounded(random_rank), _rounded(random_seed)
    return {"task": task, "k": int(k), "layer": layer, "rows": rows, "control": control, "heatmaps": heatmaps}


def render(data: dict, page) -> tuple[str, list]:
    header = ["Matrix", "r8 vs r64: φ(1,1)", "φ(1,8)", "φ(8,64)", "seed vs seed (r=64): φ(1,1)", "φ(8,8)",
              "φ(32,32)"]
    control = data["control"]
    rows_a = [[r["matrix"]] + r["cells"] + [r["moved"]] for r in data["rows"]["A"]]
    rows_a.append([control["matrix"]] + control["cells"] + [float("nan")])
    rows_d = [[r["matrix"]] + r["cells"] for r in data["rows"]["delta"]] + [[control["matrix"]] + control["cells"]]
    k = data["k"]
    body = (
        f"Adapters of Wq and Wv trained on `{data['task']}` (α = {LORA_ALPHA:g}); k = {k}, so two random "
        f"subspaces already give φ(i, j) ≈ max(i, j)/{k}. r = 8 is seed 0 and r = 64 seed 1 (one seed would start "
        "the r = 8 run's first A as rows of the r = 64 run's); the seed pair is two r = 64 runs.\n\n"
        "**The paper's view: right-singular vectors of A.** The last column is how far A moved from its "
        "random initialisation in the r = 64, seed 0 run (‖A − A₀‖_F / ‖A₀‖_F).\n\n"
        + markdown_table(header + ["‖A−A₀‖/‖A₀‖"], rows_a)
        + "\n\n**The update's view: right-singular vectors of ΔW = (α/r)·B·A** (same row space as A, "
        "ordered by the singular values of the update).\n\n"
        + markdown_table(header, rows_d)
    )
    layer, grids = data["layer"], {key: np.asarray(v) for key, v in data["heatmaps"].items()}
    figures = [
        _heatmaps(page, "subspace_r8_r64.png", layer, grids, "rank",
                  f"φ(A_r={R_SMALL}, A_r={R_LARGE}, i, j)", "j (r = 64)", "i (r = 8)"),
        _heatmaps(page, "subspace_seeds.png", layer, grids, "seed",
                  f"φ(A_r={R_LARGE}, A'_r={R_LARGE}, i, j): two seeds", "j (seed 1)", "i (seed 0)"),
    ]
    return body, figures


def _short(path: str) -> str:
    """blocks.2.attn.q -> ΔWq, layer 2."""
    parts = path.split(".")
    return f"ΔW{parts[-1]}, layer {parts[1]}" if len(parts) >= 4 else path


def _heatmaps(page, name, layer, grids, kind, title, xlabel, ylabel) -> str:
    panels = [(f"{layer}.attn.q|A", "ΔWq (A)"), (f"{layer}.attn.v|A", "ΔWv (A)"),
              (f"{layer}.attn.q|delta", "ΔWq (ΔW)"), (f"{layer}.attn.v|delta", "ΔWv (ΔW)"),
              ("random", "random Gaussian")]
    wide = kind == "rank"
    fig = new_figure(14, 3.2 if wide else 3.3, layout="constrained")
    image = None
    for n, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), n + 1)
        grid = grids[f"{key}|{kind}"]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="upper",
                          extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        if n == 0:
            ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{title}, {layer}", fontsize=10)
    fig.colorbar(image, ax=list(fig.axes), shrink=0.9, label="φ")
    return write_figure(page, fig, name, tight=False)  # constrained layout already
