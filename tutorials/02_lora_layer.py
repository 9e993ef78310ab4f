# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 02 · The LoRA layer: h = W₀x + (α/r)·B A x
#
# Section 4.1 of the paper in one line: keep a pre-trained weight W₀ ∈ R^{d×k} frozen and learn
# its change as a product of two thin matrices,
#
#     h = W₀x + ΔWx = W₀x + B A x,      B ∈ R^{d×r},  A ∈ R^{r×k},  r ≪ min(d, k)      (eq. 3)
#
# with ΔWx scaled by α/r. In this tutorial you will build one such layer, derive its backward
# pass on paper, check it with `gradcheck`, count its parameters, see why B starts at zero, and
# measure what the α/r scaling does.

# %%
import math

import numpy as np

import minilora as ml
from minilora import functional as F
from minilora import lora, nn, optim
from minilora.exercises import (
    check_dA, check_dB, check_lora_param_count, save_figure, show_hint, show_solution,
)

ml.manual_seed(0)

# %% [markdown]
# ## 1. One layer
#
# `lora.LoRALinear` wraps an ordinary `nn.Linear` and adds named adapters. The Linear keeps its
# own weight (the frozen W₀) and bias; each adapter adds `lora_A` (r × k) and `lora_B` (d × r).
# In a whole model `lora.apply_lora` does this wrapping for you (tutorial 03).
#
# The paper's Fig. 1 draws the layer: x reaches h along the frozen W₀ and along the thin path
# A then B, whose width is the rank r. Here it is to scale for the layer built below:

# %%
from minilora.diagrams import draw_reparametrisation

save_figure(draw_reparametrisation(d=4, k=6, r=2), "02_reparametrisation.png")

# %%
k, d, r = 6, 4, 2  # in_features, out_features, rank
layer = lora.LoRALinear(nn.Linear(k, d, dtype=np.float64))
# α = 4, so s = α/r = 2 (target_modules only matters to apply_lora, which picks layers in a model)
layer.add_adapter("default", lora.LoRAConfig(r=r, alpha=4, target_modules=("q",)))
print(layer)
print("W0      ", layer.weight.shape, "(d, k)")
print("lora_A  ", layer.lora_A["default"].shape, "(r, k)")
print("lora_B  ", layer.lora_B["default"].shape, "(d, r)")
print("scaling ", layer.scaling("default"), "= alpha / r")

# %% [markdown]
# ## 2. B = 0 at the start: the adapted model *is* the base model
#
# The paper initialises A randomly and B to zero (Sec. 4.1), so ΔW = BA = 0 at step 0. Fine-tuning
# therefore starts exactly at the pre-trained model — no random perturbation to recover from.
# (minilora's default A is loralib's uniform U(−1/√k, 1/√k); `LoRAConfig(init="gaussian")` gives
# the paper's Gaussian.)

# %%
x = ml.tensor(np.random.default_rng(0).standard_normal((5, k)), dtype="float64")  # 5 inputs of size k
print("B is all zeros:", not layer.lora_B["default"].data.any())
print("A is random:   ", layer.lora_A["default"].data.round(2)[0])
with layer.disable_adapters():
    h_base = layer(x)          # W0 x + b
h_lora = layer(x)              # W0 x + b + s B A x
print("LoRA output == base output:", np.array_equal(h_lora.data, h_base.data))

# %% [markdown]
# Why not start *both* at zero? Then BA would stay zero forever: two zero matrices never move
# (exercises 1–2 will show you why, once you have written their gradients). One random factor
# breaks the symmetry; the zero one keeps ΔW = 0.
#
# ## 3. The backward pass, on paper
#
# minilora computes the layer as **one fused op**, `F.lora_linear` (the Function class is
# `lora.LoRALinearFn`, in `minilora/lora/function.py`), with a hand-written backward. Write
# u = x Aᵀ (the N × r bottleneck) and s = α/r. Then
#
#     h = x W₀ᵀ + b + s·u Bᵀ,      u = x Aᵀ
#
# and the backward receives g = ∂L/∂h (N × d). Here is one line of it, worked through. x reaches h
# along two paths, the frozen one and the adapter; the chain rule adds them:
#
#     ∂L/∂x = g W₀  +  (∂L/∂u) A,      with ∂L/∂u = s·g B   (N × r)
#           = g W₀ + s·(g B) A                               (N × k)
#
# Check the shapes: g is N × d, W₀ is d × k, B is d × r, A is r × k. The same two steps, "what
# does this matrix multiply?" and "which shape must the result have?", give ∂L/∂A and ∂L/∂B.
# You will derive those two yourself in exercises 1 and 2.
#
# One more line matters for LoRA: ∂L/∂W₀ = gᵀx is a d × k matrix, and for a frozen W₀ the fused
# backward **never forms it**. Everything else costs O(N·r·(d + k)), thin matrices only. That is
# where LoRA's backward saves time and memory (tutorial 04 measures it).
#
# ## 4. Check it with gradcheck
#
# B = 0 would hide mistakes (every term with B in it vanishes), so for the check we give B random
# values. x, A and B require grad; W₀ and b are frozen, and gradcheck also asserts that frozen
# inputs receive **no** gradient.

# %%
rng = np.random.default_rng(1)
x = ml.tensor(rng.standard_normal((5, k)), requires_grad=True, dtype="float64")
W0 = ml.tensor(rng.standard_normal((d, k)), dtype="float64")            # frozen
b = ml.tensor(rng.standard_normal(d), dtype="float64")                  # frozen
A = ml.tensor(rng.standard_normal((r, k)), requires_grad=True, dtype="float64")
B = ml.tensor(rng.standard_normal((d, r)), requires_grad=True, dtype="float64")
s = 2.0

print(ml.gradcheck(lambda x, A, B: F.lora_linear(x, W0, b, A, B, s), [x, A, B]))

# %% [markdown]
# gradcheck agrees with the fused backward. Now check the worked line of section 3, ∂L/∂x, with
# an explicit upstream gradient g (∂L/∂A and ∂L/∂B are yours to write, in the exercises):

# %%
g = rng.standard_normal((5, d))
x.grad = A.grad = B.grad = None
F.lora_linear(x, W0, b, A, B, s).backward(g)
dx_by_hand = g @ W0.data + s * (g @ B.data) @ A.data
print("dL/dx by hand == backward:", np.allclose(dx_by_hand, x.grad))
print("W0.grad:", W0.grad, "(frozen: never computed)")

# %% [markdown]
# ## 5. Counting parameters
#
# Full fine-tuning of one d × k matrix trains d·k numbers; LoRA trains r·(d + k). For the
# square d × d projections of a Transformer, adapting L̂ matrices gives
#
#     |Θ| = 2 × L̂ × d_model × r        (Sec. 4.2)
#
# For a 1024 × 1024 matrix at r = 4:

# %%
big = lora.LoRALinear(nn.Linear(1024, 1024))
big.add_adapter("default", lora.LoRAConfig(r=4, alpha=8, target_modules=("q",)))
full_count = big.weight.size
lora_count = big.lora_A["default"].size + big.lora_B["default"].size
print(f"full fine-tuning: {full_count:,} values   LoRA r=4: {lora_count:,} values "
      f"({100 * lora_count / full_count:.2f} %)")

# %% [markdown]
# And the paper's headline number: GPT-3 175B (d_model = 12288, 96 layers) with r = 1 on Wq and Wv,
# so L̂ = 2 × 96:

# %%
print(f"GPT-3, r = 1 on Wq, Wv: |Θ| = 2 × {2 * 96} × 12288 × 1 = {2 * 2 * 96 * 12288 * 1:,}  (the paper: 4.7M)")

# %% [markdown]
# ## 6. Why α/r?
#
# The paper scales ΔWx by α/r and then *does not tune α*: "we simply set α to the first r we try"
# (Sec. 4.1). The argument is about Adam. Adam moves each entry of B by about the learning rate
# per step, whatever the size of its gradient. ΔW = B A is a sum of r rank-one terms, so without a
# scaling factor the same learning rate gives a larger update when r is larger. Dividing by r is
# meant to make different ranks comparable without retuning the learning rate.
#
# Let us measure it. One layer (d = k = 64) learns a random regression target; for each r we take
# 10 AdamW steps with the same learning rate and record ‖ΔW‖_F, with three scalings: α (none),
# α/r (the paper) and α/√r (rsLoRA, Kalajdzievski 2023, arXiv 2312.03732; `use_rslora=True`).

# %%
def update_norm(r, scaling_rule, steps=10, alpha=8.0):
    """‖ΔW‖_F after ``steps`` AdamW steps on a toy regression, with the scaling ``scaling_rule``."""
    ml.manual_seed(0)
    data = np.random.default_rng(0)
    X = ml.tensor(data.standard_normal((64, 64)).astype(np.float32))
    T = ml.tensor(0.5 * data.standard_normal((64, 64)).astype(np.float32))
    layer = lora.LoRALinear(nn.Linear(64, 64))
    # pick alpha so that LoRAConfig.scaling = alpha / r equals the rule's scaling
    target_scaling = {"α (no scaling)": alpha, "α/r (paper)": alpha / r, "α/√r (rsLoRA)": alpha / math.sqrt(r)}[scaling_rule]
    layer.add_adapter("default", lora.LoRAConfig(r=r, alpha=target_scaling * r, target_modules=("q",)))
    layer.weight.requires_grad = layer.bias.requires_grad = False          # W0 frozen
    opt = optim.AdamW([layer.lora_A["default"], layer.lora_B["default"]], lr=1e-3, weight_decay=0.0)
    for _ in range(steps):
        error = layer(X) - T
        loss = (error * error).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(np.linalg.norm(layer.delta_weight("default")))


ranks = [1, 2, 4, 8, 16, 32, 64]
rules = ["α (no scaling)", "α/r (paper)", "α/√r (rsLoRA)"]
norms = {rule: [update_norm(r, rule) for r in ranks] for rule in rules}
for rule in rules:
    print(f"{rule:<16}", "  ".join(f"r={r}: {n:.3f}" for r, n in zip(ranks, norms[rule])))
# the growth with r as a power law: the slope of log ‖ΔW‖ against log r
slopes = {rule: float(np.polyfit(np.log(ranks), np.log(norms[rule]), 1)[0]) for rule in rules}
for rule, slope in slopes.items():
    trend = "grows" if slope > 0.15 else "shrinks" if slope < -0.15 else "stays nearly flat"
    print(f"{rule:<16} ‖ΔW‖_F ∝ r^{slope:+.2f}: it {trend} with r")

# %%
from matplotlib.figure import Figure

fig = Figure(figsize=(6.4, 3.8))
ax = fig.add_subplot(1, 1, 1)
for rule, marker in zip(rules, "osd"):
    ax.plot(ranks, norms[rule], marker=marker, label=rule)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xticks(ranks)
ax.set_xticklabels([str(r) for r in ranks])
ax.set_xlabel("rank r")
ax.set_ylabel("‖ΔW‖_F after 10 AdamW steps")
ax.set_title("The same learning rate, three scalings of ΔW = s·B A", fontsize=10)
ax.legend()
save_figure(fig, "02_update_scale.png")

# %% [markdown]
# Read the plot from left to right, and the fitted exponents printed below the table. A sum of r
# rank-one terms that partly add up grows like √r (exponent +0.5) without scaling; dividing it by
# r over-corrects to 1/√r (−0.5), and dividing by √r keeps it flat (0). That is the rsLoRA
# argument: with α/r, large ranks learn more slowly at the same learning rate. For the small ranks the paper
# uses (r ≤ 8 in Table 6), α/r works well, and that is minilora's default. Set
# `LoRAConfig(use_rslora=True)` to get α/√r.
#
# ## Exercises
#
# **Exercise 1 — write ∂L/∂A yourself.** `my_dA(x, lora_A, lora_B, grad_h, scaling)` receives
# NumPy arrays x (N × k), A (r × k), B (d × r), g = ∂L/∂h (N × d) and s, and returns ∂L/∂A.
# Derive it on paper first, as section 3 did for ∂L/∂x. `check_dA` runs `ml.gradcheck` on a LoRA
# layer whose backward uses *your* formula, then compares it with `F.lora_linear`'s. A wrong
# answer gets a diagnosis; `show_hint("02.1")` gives a hint, `check_dA(my_dA, hint_level=2)`
# the formula, and `show_solution("02.1")` a solution.

# %%
def my_dA(x, lora_A, lora_B, grad_h, scaling):
    raise NotImplementedError  # your code here: an (r, k) array


check_dA(my_dA)

# %% [markdown]
# **Exercise 2 — and ∂L/∂B.** Same arguments, returns the (d × r) gradient of B. What does B
# multiply in the forward pass? (`show_hint("02.2")` if you are stuck.)

# %%
def my_dB(x, lora_A, lora_B, grad_h, scaling):
    raise NotImplementedError  # your code here: a (d, r) array


check_dB(my_dB)

# %% [markdown]
# **Exercise 3 — count.** `my_count(d, k, r, n_matrices)` returns the number of trainable LoRA
# parameters when n_matrices weights of shape d × k each get a rank-r adapter. Careful: not every
# matrix is square (a Transformer's MLP maps d_model to 4·d_model).

# %%
def my_count(d, k, r, n_matrices):
    raise NotImplementedError  # your code here


check_lora_param_count(my_count)

# %% [markdown]
# ## Solutions
#
# Not in this file: try first. A wrong answer gets a diagnosis; `show_hint("02.1")` gives a hint
# (`show_hint("02.1", 2)` the formula), and `show_solution("02.1")` (also "02.2", "02.3") prints
# a solution with a comment on each line.

# %% [markdown]
# **Next:** [`03_tiny_transformer.py`](03_tiny_transformer.py) — where these layers go inside a GPT, and the loss of eq. 2.
