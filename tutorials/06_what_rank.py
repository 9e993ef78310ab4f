# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 06 · What rank? A rank sweep and the subspace similarity of Sec. 7.2
#
# Table 6 of the paper is surprising: on GPT-3, LoRA with r = 1 on Wq and Wv is about as good as
# r = 64. Section 7.2 explains it by comparing the learned A matrices. The top directions that an
# r = 8 adapter learns are also the top directions of an r = 64 adapter, and the other directions
# look like noise. So the update ΔW has a very low "intrinsic rank".
#
# In this tutorial you run a small rank sweep on the `sql` task (a description → a query in a
# small WikiSQL-like language the base model has never written), then measure the subspace
# similarity φ between the A matrices of two ranks and draw it as a heatmap, as in Fig. 3.
# `sql` is the task to sweep on: on `e2e` or `parse` every rank reaches the metric's ceiling,
# and a sweep where every entry is 1.0 cannot show whether the rank matters.

# %%
import copy
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny matrices: one BLAS thread is fastest

import numpy as np

import minilora as ml
from minilora import backend as bk
from minilora import lora
from minilora.analysis import subspace_similarity, subspace_similarity_grid
from minilora.data import Tokenizer, collate, load_task
from minilora.exercises import (
    check_random_subspace_baseline, check_subspace_similarity, save_figure, show_hint, show_solution,
)
from minilora.methods import hyperparams
from minilora.models import load_base
from minilora.recipes import FAST, finetune

TASK = "sql"
RANKS = (2, 4) if FAST else (1, 2, 4, 8)
STEPS = 3 if FAST else hyperparams("lora", TASK)["steps"]
LR = hyperparams("lora", TASK)["lr"]
N_EVAL = 3 if FAST else 100
ALPHA = 8.0                      # fixed while r varies: "we simply set α to the first r we try" (Sec. 4.1)
TARGETS = ("q", "v")             # the paper's choice for Table 6's first rows and for Fig. 3
base = load_base()
tokenizer = Tokenizer.default()
print(f"ranks {RANKS}, {STEPS} steps each{' (FAST mode: the numbers mean nothing)' if FAST else ''}")

# %% [markdown]
# ## 1. The rank sweep
#
# One LoRA run per rank, on Wq and Wv, with the same α, learning rate and number of steps: LoRA's
# settings for `sql` in the hyper-parameter table (`methods.hyperparams("lora", "sql")`, chosen
# on the val split). Each run gets its own random seed (seed = r). That way two ranks never
# start from the same random rows of A, which matters in section 2. Quality is measured twice:
# the test loss of eq. 2 (the mean NLL of the reference queries) and exact match of the greedy
# queries (one wrong condition makes a query wrong).

# %%
test_batch = collate(load_task(TASK, "test", N_EVAL), tokenizer)
runs, losses = {}, {}
for r in RANKS:
    runs[r] = finetune(TASK, "lora", base=base, r=r, alpha=ALPHA, targets=TARGETS, lr=LR, steps=STEPS,
                       seed=r, n_eval=N_EVAL, progress=not FAST, measure_memory=False)
    with ml.no_grad():
        losses[r] = float(runs[r].model.loss(test_batch.idx, test_batch.targets, test_batch.mask).item())
    print(f"r = {r}: {runs[r].trainable_params:>6,} trainable   test loss {losses[r]:.3f}   "
          f"{runs[r].metric_name} {runs[r].metric:.2f}")

with ml.no_grad():
    base_loss = float(base.loss(test_batch.idx, test_batch.targets, test_batch.mask).item())
print(f"the base model, not fine-tuned: test loss {base_loss:.3f}")

# %%
from matplotlib.figure import Figure

fig = Figure(figsize=(9, 3.4))
for panel, (label, values, top) in enumerate([
    ("test loss (y tokens)", [losses[r] for r in RANKS], 1.3 * base_loss),
    (f"test {runs[RANKS[0]].metric_name}", [runs[r].metric for r in RANKS], 1.05),
]):
    ax = fig.add_subplot(1, 2, panel + 1)
    ax.plot(RANKS, values, marker="o")
    if panel == 0:
        ax.axhline(base_loss, color="grey", linestyle="--", linewidth=0.8)
        ax.text(RANKS[0], base_loss * 1.03, "the base model, not fine-tuned", fontsize=7, color="grey")
        for r, value in zip(RANKS, values):
            ax.annotate(f"{runs[r].trainable_params:,}\nparams", (r, value), textcoords="offset points",
                        xytext=(0, 8), ha="center", fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xticks(RANKS)
    ax.set_xticklabels([str(r) for r in RANKS])
    ax.set_ylim(0, top)
    ax.set_xlabel("rank r (LoRA on Wq, Wv, α fixed)")
    ax.set_ylabel(label)
fig.suptitle(f"Table 6 in miniature: {TASK}, {STEPS} steps per rank", fontsize=10)
save_figure(fig, "06_rank_sweep.png")

# %% [markdown]
# The parameter count doubles with each step along the axis. Compare the step from the base
# model to any rank with the differences between ranks (the next cell prints both). One seed
# per rank cannot say whether those differences are real; the experiments repeat each rank over
# three seeds (`minilora experiment rank`, r up to 64 and three target sets), and the cell after
# reads their verdict.

# %%
losses_by_rank = [losses[r] for r in RANKS]
print(f"test loss: base {base_loss:.3f}; ranks {RANKS[0]}..{RANKS[-1]} from {min(losses_by_rank):.3f} "
      f"to {max(losses_by_rank):.3f} (the base-to-rank-{RANKS[0]} drop is "
      f"{(base_loss - losses[RANKS[0]]) / max(1e-12, max(losses_by_rank) - min(losses_by_rank)):.0f}x the spread "
      "between ranks)")

# %%
from pathlib import Path

from minilora.experiments import read_results
from minilora.experiments.stats import compare, format_spread

results_file = Path(ml.__file__).resolve().parents[1] / "docs" / "results.json"
if results_file.exists():
    rank_data = read_results(results_file)["experiments"]["rank"]
    cells = rank_data["cells"][TASK]["Wq+Wv"]
    low, high = str(rank_data["ranks"][0]), str(rank_data["ranks"][-1])
    for r in rank_data["ranks"]:
        print(f"Wq+Wv, r = {r:>2}: exact match {format_spread(cells[str(r)]['metric'])}   "
              f"NLL {format_spread(cells[str(r)]['nll'], 4)}   (3 seeds)")
    verdict = compare(cells[low]["metric"], cells[high]["metric"])["verdict"]
    print(f"r = {low} against r = {high} (exact match): {verdict}")
    smallest_as_good = next(r for r in rank_data["ranks"]
                            if compare(cells[str(r)]["metric"], cells[high]["metric"])["verdict"] in ("within noise", "tie", "better"))
    print(f"the smallest rank within noise of r = {high} here: r = {smallest_as_good}")
else:
    print(f"{results_file} is not here (an installed package without the docs): see docs/results.md online")

# %% [markdown]
# Table 6's message on GPT-3 is that r = 1 on Wq and Wv is within noise of r = 64. Read the two
# lines above against it: the verdict between the two ends, and the smallest rank that already
# matches the largest. `sql` asks the adapter for more than GPT-3's tasks did: the base has never
# produced its query keywords, so the update must open directions to two new output tokens.
# Whatever rank the run needs, it is still a tiny fraction of d = 128, which is the paper's deeper
# point: the update has a low "intrinsic rank".
#
# ## 2. Subspace similarity (Sec. 7.2, eq. 4)
#
# Why would r = 1 be enough? The paper compares the A matrices that adapters of different ranks
# learn. Take the right-singular vectors of A (the directions of the input space R^k that A
# reads), U₁ from A_{r₁} and U₂ from A_{r₂}. Then
#
#     φ(A₁, A₂, i, j) = ‖U₁ⁱᵀ U₂ʲ‖²_F / min(i, j)  ∈ [0, 1]
#
# measures how much of the top-i directions of one lie in the span of the top-j of the other:
# 1 when one subspace contains the other, 0 when they are orthogonal. `minilora.analysis`
# computes it for one (i, j) or for the whole grid.
#
# We compare the two largest ranks of the sweep, in a middle block. Their A matrices started from
# different random numbers (different seeds) and moved far during training:

# %%
r_small, r_large = RANKS[-2], RANKS[-1]
block = f"blocks.{base.config.n_layer // 2}"


def lora_A(run, path):
    return bk.to_numpy(dict(lora.lora_layers(run.model))[path].lora_A[TASK].data).astype(np.float64)


def initial_A(r, path):
    """The A that finetune(seed=r) started from: the same seed, the same apply_lora."""
    model = copy.deepcopy(base)
    bk.manual_seed(r)
    lora.apply_lora(model, lora.LoRAConfig(r=r, alpha=ALPHA, target_modules=TARGETS), adapter_name=TASK)
    return bk.to_numpy(dict(lora.lora_layers(model))[path].lora_A[TASK].data).astype(np.float64)


for matrix in ("q", "v"):
    path = f"{block}.attn.{matrix}"
    A = lora_A(runs[r_large], path)
    moved = np.linalg.norm(A - initial_A(r_large, path)) / np.linalg.norm(initial_A(r_large, path))
    print(f"{path}: ‖A − A_init‖ / ‖A_init‖ = {moved:.2f} for r = {r_large}")

# %%
grids = {m: subspace_similarity_grid(lora_A(runs[r_small], f"{block}.attn.{m}"),
                                     lora_A(runs[r_large], f"{block}.attn.{m}")) for m in ("q", "v")}
k = base.config.d_model
rng = np.random.default_rng(0)
grids["random"] = subspace_similarity_grid(rng.standard_normal((r_small, k)), rng.standard_normal((r_large, k)))
for name, grid in grids.items():
    print(f"{name:>6}: φ(1, 1) = {grid[0, 0]:.2f}   φ({r_small}, {r_large}) = {grid[-1, -1]:.2f}")
print(f"φ(1, 1) for Wq, one more time from analysis.subspace_similarity: "
      f"{subspace_similarity(lora_A(runs[r_small], f'{block}.attn.q'), lora_A(runs[r_large], f'{block}.attn.q'), 1, 1):.2f}")

# %%
fig = Figure(figsize=(11, 3.2), layout="constrained")
titles = {"q": f"ΔWq, {block}", "v": f"ΔWv, {block}", "random": "two random Gaussian matrices"}
image = None
for n, (name, grid) in enumerate(grids.items()):
    ax = fig.add_subplot(1, 3, n + 1)
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto",
                      extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j + 1, i + 1, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if grid[i, j] < 0.5 else "black")
    ax.set_xticks(range(1, grid.shape[1] + 1))
    ax.set_yticks(range(1, grid.shape[0] + 1))
    ax.set_xlabel(f"j (A of r = {r_large})")
    if n == 0:
        ax.set_ylabel(f"i (A of r = {r_small})")
    ax.set_title(titles[name], fontsize=9)
fig.colorbar(image, ax=fig.axes, shrink=0.85, label="φ(i, j)")
fig.suptitle(f"Subspace similarity φ(A_r={r_small}, A_r={r_large}, i, j) (Fig. 3 in miniature)", fontsize=10)
save_figure(fig, "06_subspace.png")

# %% [markdown]
# Read the top-left cell of each panel: φ(1, 1) compares the single most important direction of
# the two adapters. For two random matrices it is small (right panel); compare it with the
# trained adapters', which started from unrelated random A's and had different ranks. Moving
# right along the top row, the top direction of the smaller adapter can only lie more inside
# the span of the larger one. Down the diagonal, the paper sees the agreement fall: the extra
# directions are more like noise. The next cell prints the diagonal of each panel, so you can
# check whether that holds here, matrix by matrix. (Two caveats on a model this small. With
# k = 128, random subspaces already overlap a little, and more as i and j grow; exercise 2 asks
# how much. And a run leaves part of the random initialisation in A. `minilora experiment
# subspace` runs the paper's r = 8 vs r = 64 comparison, and two seeds, as in Fig. 4.)

# %%
for name, grid in grids.items():
    diagonal = [float(grid[i, i]) for i in range(min(grid.shape))]
    falls = all(a >= b for a, b in zip(diagonal, diagonal[1:]))
    print(f"{name:>6}: diagonal φ(i, i) = {', '.join(f'{v:.2f}' for v in diagonal)}  "
          f"({'falls at every step' if falls else 'does not fall at every step'})")
#
# ## Exercises
#
# **Exercise 1 — φ yourself.** `my_phi(A1, A2, i, j)` returns φ of eq. 4 for two A matrices of
# shapes (r₁, k) and (r₂, k). `np.linalg.svd(A, full_matrices=False)` returns (U, S, Vᵀ). The
# right-singular vectors are the rows of Vᵀ, in order of decreasing singular value.

# %%
def my_phi(A1, A2, i, j):
    raise NotImplementedError  # your code here


check_subspace_similarity(my_phi)

# %% [markdown]
# **Exercise 2 — what does "random" look like?** For a random i-dimensional and a random
# j-dimensional subspace of R^k, what is the expected φ? Return it from `my_baseline(i, j, k)`.
# Hint: a random unit vector u and a fixed unit vector v have E[(u·v)²] = 1/k.

# %%
def my_baseline(i, j, k):
    raise NotImplementedError  # your code here


check_random_subspace_baseline(my_baseline)

# %% [markdown]
# ## Solutions
#
# Not in this file: try first. `show_hint("06.1")` gives a hint (`show_hint("06.1", 2)` the
# formula), and `show_solution("06.1")` prints a solution.

# %% [markdown]
# **Next:** [`07_gpu.py`](07_gpu.py) — the same code on a GPU, by one switch.
