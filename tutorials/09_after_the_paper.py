# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 09 · After the paper: DoRA, PiSSA, LoRA+, rsLoRA and a 4-bit base
#
# LoRA (2021) was the start. The variants people fine-tune with today each change one thing:
#
# | variant | what changes | paper |
# |---|---|---|
# | **DoRA** | W′ = m ⊙ (W₀ + s·B·A) / ‖W₀ + s·B·A‖_row: a learned length m per output row, LoRA for the direction | Liu et al. 2024, arXiv 2402.09353 |
# | **PiSSA** | A and B start at the top-r singular part of W₀, and W₀ is replaced by the rest | Meng et al. 2024, arXiv 2404.02948 |
# | **LoRA+** | B gets a larger learning rate than A: lr_B = λ·lr_A | Hayou et al. 2024, arXiv 2402.12354 |
# | **rsLoRA** | the scaling α/√r instead of α/r, so large ranks keep learning | Kalajdzievski 2023, arXiv 2312.03732 |
# | **QLoRA** | the frozen W₀ is stored in 4 bits (NF4) and dequantized on the fly | Dettmers et al. 2023, arXiv 2305.14314 |
#
# In this tutorial you derive DoRA's backward on paper and check it with `gradcheck`, see why
# PiSSA starts exactly where LoRA starts, race the variants on a task, and measure what 4 bits
# cost. Everything below calls the library (`lora.LoRAConfig(use_dora=True)`, `init="pissa"`,
# `optim.lora_plus_param_groups`, `lora.quantize_base`); nothing is re-implemented.

# %%
import copy
import functools
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny matrices: one BLAS thread is fastest

import numpy as np
from matplotlib.figure import Figure

import minilora as ml
from minilora import lora, optim, quant
from minilora.data import Tokenizer, collate, load_task
from minilora.exercises import check_dora_dm, check_nf4_bytes, check_pissa_init, save_figure, show_hint, show_solution
from minilora.methods import hyperparams
from minilora.models import load_base
from minilora.recipes import FAST, task_batches
from minilora.train import fit

TASK = "sql"  # the task the base has never seen: LoRA is far from the metric's ceiling there
STEPS = 3 if FAST else 300
LR = hyperparams("lora", TASK)["lr"]  # LoRA's learning rate for the task (chosen on val; docs/results.md)
base = load_base()
tokenizer = Tokenizer.default()
print(f"{STEPS} steps per run{' (FAST mode: the numbers mean nothing)' if FAST else ''}")


def adapted(**variant):
    """A copy of the shipped base with LoRA (r = 4, α = 8 on Wq, Wv) and the variant's options; only LoRA trains."""
    model = copy.deepcopy(base)
    lora.apply_lora(model, lora.LoRAConfig(r=4, alpha=8, target_modules=("q", "v"), **variant))
    return lora.mark_only_lora_as_trainable(model)

# %% [markdown]
# ## 1. DoRA: a length and a direction
#
# Write V = W₀ + s·B·A (d × k) and n_i = ‖V_i‖ for each row i (one per output feature). DoRA's
# layer is
#
#     h = c ⊙ (x·Vᵀ) + b,        c = m / n   (d,)
#
# so each row of the weight has a learned length m_i and a LoRA-adapted direction V_i / n_i. It
# starts with m = ‖W₀‖_row and B = 0, so c = 1 and h = W₀x + b: the base again.
#
# **The backward on paper.** Let g = ∂L/∂h (N × d) and P = x·Vᵀ (N × d).
#
# 1. h = c ⊙ P + b, so ∂L/∂c_i = Σ_rows g_i·P_i =: γ_i and ∂L/∂P = G̃ := g ⊙ c.
# 2. c_i = m_i / n_i: ∂L/∂m_i = γ_i / n_i, and ∂L/∂n_i = −γ_i·m_i / n_i².
# 3. n_i = ‖V_i‖ has ∂n_i/∂V_i = V_i / n_i, so the norm sends diag(ρ)·V into ∂L/∂V, ρ_i = −γ_i·m_i / n_i³.
# 4. P = x·Vᵀ sends G̃ᵀ·x. So ∂L/∂V = G̃ᵀ·x + diag(ρ)·V, and through V = W₀ + s·B·A:
#    ∂L/∂A = s·Bᵀ·∂L/∂V,   ∂L/∂B = s·∂L/∂V·Aᵀ,   ∂L/∂x = G̃·V.
#
# The library never forms the d × k matrix V: ‖V_i‖² = ‖W₀_i‖² + 2s·B_i·(W₀Aᵀ)_i + s²·B_i(AAᵀ)B_iᵀ,
# and Bᵀ·diag(ρ)·V = (ρ⊙B)ᵀ·W₀ + s·(ρ⊙B)ᵀ·B·A (read `DoRALinearFn` in `minilora/lora/dora.py`).
# The DoRA paper (Sec. 4.3) and PEFT drop step 3 to save memory: they treat n as a constant.
# `dora_detach_norm=True` does that; the default is the exact gradient. `gradcheck` decides:

# %%
rng = np.random.default_rng(0)
d, k, r, s = 4, 6, 2, 1.5
arrays = [rng.standard_normal((3, k)), rng.standard_normal((d, k)), rng.standard_normal(d),
          rng.standard_normal((r, k)), rng.standard_normal((d, r)) * 0.3, rng.uniform(0.5, 2.0, d)]
x, W, b, A, B, m = [ml.tensor(a, requires_grad=True, dtype="float64") for a in arrays]
print("exact DoRA backward passes gradcheck:",
      ml.gradcheck(lambda *t: lora.dora_linear(*t, s), [x, W, b, A, B, m]))
try:
    ml.gradcheck(lambda *t: lora.dora_linear(*t, s, detach_norm=True), [x, W, b, A, B, m])
except ml.GradcheckError as err:
    print("the detached-norm backward is NOT the gradient of the forward:", str(err).splitlines()[0][:110], "...")

grads, upstream = {}, rng.standard_normal((3, d))  # one upstream gradient for both backward passes
for detach in (False, True):
    for t in (x, W, b, A, B, m):
        t.grad = None
    lora.dora_linear(x, W, b, A, B, m, s, detach_norm=detach).backward(upstream)
    grads[detach] = {"A": A.grad.copy(), "B": B.grad.copy(), "m": m.grad.copy()}
for name in ("A", "B", "m"):
    exact, detached = grads[False][name], grads[True][name]
    print(f"∂L/∂{name}: exact vs detached differ by {np.linalg.norm(exact - detached) / np.linalg.norm(exact):.1%}")

# %% [markdown]
# ∂L/∂m is the same either way (m does not go through the norm); A and B lose the norm's term.
# The detached gradient is still a descent direction in practice, and it saves keeping what the
# norm's backward needs. A fresh DoRA adapter on the shipped base is the base, to the last bit:

# %%
batch = collate(load_task(TASK, "test", 4), tokenizer)
dora_model = adapted(use_dora=True)
with ml.no_grad():
    same = np.array_equal(dora_model(batch.idx).data, base(batch.idx).data)
print("fresh DoRA == base, bit for bit:", same)
print(lora.trainable_summary(dora_model))

# %% [markdown]
# ## 2. PiSSA: start from the top of the spectrum
#
# LoRA starts from B = 0, so the first steps move along random directions of A. PiSSA asks: which
# rank-r matrix already holds most of W₀? The top-r part of its SVD, W₀ = U S Vᵀ (Eckart–Young).
# So PiSSA sets A = √(S_r/s)·V_rᵀ and B = U_r·√(S_r/s), which makes s·B·A = U_r S_r V_rᵀ, and
# replaces W₀ by the residual W_res = W₀ − s·B·A. The model is still W_res + s·B·A = W₀: it
# starts where the base is (to rounding), but the adapter now trains the principal directions.

# %%
path = "blocks.1.attn.q"
W0 = np.asarray(dict(base.named_parameters())[f"{path}.weight"].data, dtype=np.float64)
S = np.linalg.svd(W0, compute_uv=False)
r = 4
print(f"{path}: the top {r} of {S.size} singular values hold {np.sum(S[:r] ** 2) / np.sum(S ** 2):.1%} "
      f"of ‖W₀‖²_F")
pissa_model = adapted(init="pissa")  # r = 4
with ml.no_grad():
    gap = np.abs(pissa_model(batch.idx).data - base(batch.idx).data).max()
print(f"PiSSA model vs base: max |Δ logit| = {gap:.1e} (float32 rounding of W_res + s·B·A)")
W_res = np.asarray(dict(pissa_model.named_parameters())[f"{path}.weight"].data, dtype=np.float64)
S_res = np.linalg.svd(W_res, compute_uv=False)

fig = Figure(figsize=(6.4, 3.4))
ax = fig.add_subplot(1, 1, 1)
ax.semilogy(np.arange(1, S.size + 1), S, label="W₀")
ax.semilogy(np.arange(1, S_res.size + 1), S_res, label="W_res = W₀ − s·B·A (PiSSA)")
ax.axvspan(0.5, r + 0.5, alpha=0.15, color="C1", label=f"the top {r}: now in A and B")
ax.set_xlabel("index i")
ax.set_ylabel("singular value σᵢ")
ax.set_title(f"{path} of the shipped base", fontsize=9)
ax.legend(fontsize=8)
save_figure(fig, "09_spectrum.png")

# %% [markdown]
# The residual's spectrum is W₀'s with its top r removed: the other singular values are
# untouched. One practical point: PiSSA changes W₀, so its adapter only fits that changed base.
# `lora.pissa_to_lora(model)` writes ΔW = s·(B·A − B₀·A₀) = s·[B | −B₀]·[A ; A₀] as an ordinary
# LoRA of rank 2r on the original W₀ (α doubled to keep the scaling), the conversion PEFT documents.
#
# ## 3. LoRA+ and a short race
#
# LoRA+ argues from the infinite-width limit that A and B should not share one learning rate:
# B should learn faster, by a fixed ratio λ (≈ 16 in the paper). In minilora that is a choice of
# parameter groups, which `optim.AdamW` accepts like `torch.optim` does:

# %%
lp_model = adapted()
groups = optim.lora_plus_param_groups(lp_model, lr=2.5e-3, ratio=16)
for group in groups:
    print(f"group {group['name']}: {len(group['params'])} tensors, lr {group['lr']:g}")

# %% [markdown]
# Now the race: the same task, steps, rank, learning rate and seed for LoRA, DoRA, PiSSA, LoRA+
# and LoRA on an NF4 base (section 4), and the training loss of each. The task is `sql`, whose
# query language the base model has never written: on a task the base already knows, every
# variant reaches the same tiny loss and the race is flat. (`minilora experiment variants` runs
# the full comparison over three seeds, with test metrics, timings, memory and the rsLoRA
# r-sweep; the cell after the race reads its verdicts.)

# %%
train = load_task(TASK, "train", 256 if FAST else None)
test = collate(load_task(TASK, "test", 8 if FAST else 100), tokenizer)


def race(variant):
    ml.manual_seed(0)
    model = adapted(use_dora=variant == "DoRA", init="pissa" if variant == "PiSSA" else "kaiming")
    if variant == "NF4 base":
        lora.quantize_base(model, "nf4", block_size=64)
    params = (optim.lora_plus_param_groups(model, lr=LR / 4, ratio=16) if variant == "LoRA+"
              else model.named_parameters(trainable_only=True))
    opt = optim.AdamW(params, lr=LR, weight_decay=0.0)
    sched = optim.LRScheduler(opt, functools.partial(optim.warmup_linear, total=STEPS, warmup=max(1, STEPS // 10)))
    history = fit(model, opt, task_batches(train, tokenizer, 16, 0, model.config.block_size), STEPS,
                  scheduler=sched, progress=False)
    model.eval()
    with ml.no_grad():
        test_loss = float(model.loss(test.idx, test.targets, test.mask).item())
    return history, test_loss


curves = {}
for variant in ("LoRA", "DoRA", "PiSSA", "LoRA+", "NF4 base"):
    history, test_loss = race(variant)
    curves[variant] = history.losses
    print(f"{variant:>9}: final training loss {np.mean(history.losses[-5:]):.4f}   test loss {test_loss:.4f}   "
          f"{1000 * history.seconds / STEPS:.0f} ms/step")

fig = Figure(figsize=(6.4, 3.4))
ax = fig.add_subplot(1, 1, 1)
for variant, losses in curves.items():
    ax.plot(np.arange(1, len(losses) + 1), losses, label=variant, lw=1)
ax.set_yscale("log")
ax.set_xlabel("step")
ax.set_ylabel("training loss (y tokens)")
ax.set_title(f"{TASK}: r = 4 on Wq, Wv, {STEPS} steps", fontsize=9)
ax.legend(fontsize=8)
save_figure(fig, "09_race.png")

# %% [markdown]
# Look at the first steps of the curves, where the variants differ most: PiSSA's adapter starts on
# the principal directions of W₀ instead of random ones, and LoRA+ moves B 16× faster than A.
# Whether that is still visible at the end, the printed test losses say for this one seed. One
# seed cannot rank the variants; the experiments' three seeds can say which differences are
# larger than the noise:

# %%
from pathlib import Path

from minilora.experiments import read_results
from minilora.experiments.stats import compare, format_spread

results_file = Path(ml.__file__).resolve().parents[1] / "docs" / "results.json"
if results_file.exists():
    variants = read_results(results_file)["experiments"]["variants"]
    reference = variants["cells"][f"{TASK}/lora/r=4"]
    for name in ("lora", "dora", "pissa", "lora+", "qlora"):
        cell = variants["cells"][f"{TASK}/{name}/r=4"]
        verdict = "" if name == "lora" else f"   against LoRA: {compare(cell['metric'], reference['metric'])['verdict']}"
        print(f"{name:>6}: exact match {format_spread(cell['metric'])}   NLL {format_spread(cell['eval_loss'], 4)}{verdict}")
else:
    print(f"{results_file} is not here (an installed package without the docs): see docs/results.md online")
#
# ## 4. What 4 bits cost
#
# NF4 stores each block of 64 weights as 16-level codes (4 bits) plus one float32 absmax c_b:
# Ŵ = c_b · NF4_LEVELS[code]. The 16 levels are quantiles of a normal distribution, because
# trained weights are roughly normal: the levels are dense where the weights are.

# %%
q = quant.quantize_nf4(W0.astype(np.float32), block_size=64)
W_hat = quant.dequantize(q)
normalised = (W0.reshape(-1, 64) / np.abs(W0.reshape(-1, 64)).max(axis=1, keepdims=True)).ravel()
error = np.abs(W_hat - W0)
print(f"{path}: {q.nbytes:,} bytes in NF4 against {W0.astype(np.float32).nbytes:,} in float32 "
      f"({8 * q.nbytes / W0.size:.2f} bits per value); mean |Ŵ − W| = {error.mean():.2e}, "
      f"{error.mean() / np.abs(W0).mean():.1%} of mean |W|")

fig = Figure(figsize=(6.4, 3.4))
ax = fig.add_subplot(1, 1, 1)
ax.hist(normalised, bins=80, color="C0", alpha=0.7, label="W / absmax of its block")
for level in quant.NF4_LEVELS:
    ax.axvline(level, color="C3", lw=0.8)
ax.set_xlabel("normalised weight (red: the 16 NF4 levels)")
ax.set_title(f"{path}: NF4 puts its levels where the weights are", fontsize=9)
ax.legend(fontsize=8)
save_figure(fig, "09_nf4.png")

# %%
nf4_base = adapted()
report = lora.quantize_base(nf4_base, "nf4", block_size=64)
print(report)
with ml.no_grad():
    loss_float = float(base.loss(test.idx, test.targets, test.mask).item())
    loss_nf4 = float(nf4_base.loss(test.idx, test.targets, test.mask).item())
print(f"test loss of the untouched base: float32 {loss_float:.4f}, NF4 {loss_nf4:.4f}")
print(f"Linear weights: {report.original_bytes / 2**20:.2f} MiB in float32, {report.nf4_bytes / 2**20:.2f} MiB in NF4 "
      f"({report.original_bytes / report.nf4_bytes:.1f}x less)")

# %% [markdown]
# That is QLoRA's trade: several times less memory for the frozen weights (the ratio printed
# above), a rounding of every weight by a fraction of its size (the mean error printed in the
# cell before; compare how much the loss of the untouched base moves), and a slower step: every
# forward and backward dequantizes W₀ again. The adapters stay in float32 and are trained on top
# of the rounded base (the "NF4 base" curve of the race).
#
# ## Exercises
#
# **Exercise 1 — DoRA's ∂L/∂m.** From step 2 of the derivation: `my_dm(x, W, A, B, m, grad_h, s)`
# returns ∂L/∂m (d,) on NumPy arrays, for x (N, k), W (d, k), A (r, k), B (d, r), grad_h (N, d).

# %%
def my_dm(x, W, A, B, m, grad_h, s):
    raise NotImplementedError  # your code here


check_dora_dm(my_dm)

# %% [markdown]
# **Exercise 2 — PiSSA's start.** `my_pissa(W, r, s)` returns (A, B, W_res) with s·B·A the top-r
# singular part of W and W_res = W − s·B·A, the singular values split evenly between A and B.

# %%
def my_pissa(W, r, s):
    raise NotImplementedError  # your code here


check_pissa_init(my_pissa)

# %% [markdown]
# **Exercise 3 — what 4 bits cost.** `my_nf4_bytes(n_values, block_size, double_quant)` returns the
# bytes `quant.quantize_nf4` stores: codes (two per byte, the last block padded), and one float32
# absmax per block — or, with double quantization, one byte per block plus a float32 scale per
# 256 blocks and one float32 offset.

# %%
def my_nf4_bytes(n_values, block_size, double_quant):
    raise NotImplementedError  # your code here


check_nf4_bytes(my_nf4_bytes)

# %% [markdown]
# ## Solutions
#
# Not in this file: try first. `show_hint("09.1")` gives a hint (`show_hint("09.1", 2)` the
# formula), and `show_solution("09.1")` prints a solution.

# %% [markdown]
# **Next:** [the capstone](../docs/syllabus.md#capstone-doras-backward-derived-and-gradchecked)
# of the syllabus — DoRA's backward, derived and gradchecked with what the course gave you.
# `minilora experiment variants` runs these variants on all three tasks; its table and the
# reading of it are in [the results](../docs/results.md).
