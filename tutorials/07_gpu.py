# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 07 · The same code on a GPU: the backend switch
#
# Everything in tutorials 01–06 ran on NumPy. minilora runs the same code on an NVIDIA GPU
# through CuPy, a NumPy-compatible array library, with one switch. No op is written twice.
# Each op asks for the array module of its inputs (`xp = get_array_module(x)`) and calls
# `xp.exp`, `xp.tanh`, `@`, and so on. `minilora/backend.py` is the only file that imports CuPy.
#
# This tutorial runs on any machine. With a GPU and CuPy (`pip install minilora[gpu]`) it trains
# on the GPU and compares with NumPy. Without them it runs on the **strict** backend: NumPy arrays
# that obey CuPy's rules, so every mistake that would break on a GPU breaks here too.

# %%
import copy
import inspect
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny matrices: one BLAS thread is fastest

import numpy as np

import minilora as ml
from minilora import backend as bk
from minilora import functional as F
from minilora import lora, optim
from minilora.data import Tokenizer, collate, load_task
from minilora.exercises import (
    check_host_logits, check_softmax_any_backend, save_figure, show_hint, show_solution,
)
from minilora.models import load_base
from minilora.recipes import FAST

# %% [markdown]
# ## 1. Is there a GPU?
#
# `ml.backend.cupy_available()` is True when CuPy imports *and* sees a GPU. Asking for the CuPy
# backend without one raises `BackendUnavailableError`, and its message says what is missing.

# %%
print("backends that can run here:", bk.available_backends())
if bk.cupy_available():
    BACKEND = "cupy"
    print("A GPU is available: this tutorial runs on CuPy and compares with NumPy.")
else:
    BACKEND = "strict"
    try:
        ml.set_backend("cupy")
    except ml.BackendUnavailableError as error:
        print("No GPU backend on this machine. minilora says:\n ", error)
    print("\n>>> Continuing on the 'strict' backend: NumPy underneath, CuPy's rules on top. Every cell")
    print(">>> below runs the code it would run on a GPU, and refuses what a GPU would refuse.\n")

# %% [markdown]
# ### No GPU? The strict backend checks your code anyway
#
# A GPU array lives in another memory. CuPy therefore refuses to turn one into a NumPy array behind
# your back (`np.asarray(x)`) and to mix it with a NumPy array in one operation. A NumPy function
# called on it (`np.exp(x)`, `np.add.at`) is handed to CuPy where CuPy implements it, and fails
# where it does not, depending on the function and the CuPy version; the strict backend refuses
# them all, so code that takes its module from `get_array_module` works on every version. Code
# full of such mistakes runs happily on NumPy and breaks the first time it meets a GPU.
# `ml.set_backend("strict")` (or
# `MINILORA_BACKEND=strict`) computes with NumPy but keeps CuPy's rules, so those mistakes raise
# on any laptop. Copies to the host go through `ml.backend.to_numpy(x)` (or `x.get()`, as in
# CuPy). Reductions return 0-d arrays, and `float()` of a one-element array is allowed.

# %%
with bk.use("strict"):
    d = ml.tensor([1.0, 2.0, 3.0]).data  # a strict "device" array
xp = bk.get_array_module(d)  # the strict module: NumPy's functions, CuPy's rules
for mistake, attempt in (("np.exp(d)", lambda: np.exp(d)), ("np.asarray(d)", lambda: np.asarray(d)),
                         ("d + a NumPy array", lambda: d + np.ones(3)), ("float(d)", lambda: float(d))):
    try:
        attempt()
    except TypeError as error:  # BackendMismatchError is a TypeError too
        print(f"{mistake:<18} refused: {str(error)[:90]}...")
print("the device-clean way:", xp.exp(d), "| sum:", float(d.sum()), "| on the host:", bk.to_numpy(d))

# %% [markdown]
# ## 2. The switch
#
# Three ways to choose where new tensors live:
#
# - `ml.set_backend("cupy")`, for the rest of the program;
# - `with ml.backend.use("cupy"): ...`, inside a block only;
# - the environment variable `MINILORA_BACKEND=cupy`, read at import time.
#
# An existing model moves with `model.to(backend="cupy")`. A tensor's `.data` is then a
# `cupy.ndarray` in GPU memory, and `ml.backend.to_numpy(...)` copies it back to the host.

# %%
with bk.use(BACKEND):
    x = ml.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
y = (x * x).sum()
y.backward()
print(f"x lives on {x.backend}: {type(x.data).__module__}.{type(x.data).__name__}; grad {bk.to_numpy(x.grad)}")
print("the current backend outside the block is still:", ml.get_backend())

# %% [markdown]
# How does one op serve both? Here is the forward pass of the fused GELU. `get_array_module`
# returns `numpy`, `cupy` or the strict module depending on where `x` lives. The arithmetic
# operators and the in-place updates are the same in both libraries.

# %%
print(inspect.getsource(F.GELU.forward))

# %% [markdown]
# ## 3. The same LoRA fine-tuning code, on the chosen backend
#
# This is tutorial 04's LoRA with one extra call: `model.to(backend=BACKEND)`.
# `apply_lora` creates A and B on the backend of the weights they adapt. The optimizer keeps its
# state next to the parameters. Token ids from the data pipeline are NumPy arrays, and the
# model moves them to its own backend.

# %%
tokenizer = Tokenizer.default()
batch = collate(load_task("e2e", "train", 16), tokenizer)


def lora_model(backend):
    ml.manual_seed(0)
    model = load_base().to(backend=backend)
    lora.apply_lora(model, lora.LoRAConfig(r=4, alpha=8, target_modules=("q", "v")))
    lora.mark_only_lora_as_trainable(model)
    return model


def train_steps(model, optimizer, batch, steps):
    """``steps`` LoRA training steps on one batch; returns the losses (syncing a GPU at the end)."""
    losses = []
    for _ in range(steps):
        loss = model.loss(batch.idx, batch.targets, batch.mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())  # keep the value, drop the graph
    return [float(loss.item()) for loss in losses]  # .item() copies to the host: waits for the GPU


model = lora_model(BACKEND)
opt = optim.AdamW(model.parameters(), lr=4e-3)
print(f"training on {model.wte.weight.backend}:", np.round(train_steps(model, opt, batch, 3 if FAST else 10), 3))

# %% [markdown]
# Started from the same weights, the same steps on both backends should agree to float32 rounding.
# (Started from scratch they would not: each backend draws LoRA's A from its own random stream, as
# a GPU does.) The two backends' matrix-multiply kernels sum in different orders, so the results
# are close but not bit-identical. The strict backend runs NumPy's own kernels: it agrees exactly.

# %%
cpu = lora_model("numpy")
dev = copy.deepcopy(cpu).to(backend=BACKEND)  # the same A, B and W0, moved to the other backend
cpu_losses = train_steps(cpu, optim.AdamW(cpu.parameters(), lr=4e-3), batch, 3)
dev_losses = train_steps(dev, optim.AdamW(dev.parameters(), lr=4e-3), batch, 3)
print("NumPy losses:         ", np.round(cpu_losses, 5))
print(f"{BACKEND} losses:".ljust(22), np.round(dev_losses, 5))
with ml.no_grad():
    diff = np.abs(bk.to_numpy(cpu(batch.idx)) - bk.to_numpy(dev(batch.idx))).max()
print(f"max |logits NumPy − logits {BACKEND}| after 3 steps: {diff:.2e}")

# %% [markdown]
# gradcheck runs on either backend too. The perturbed inputs and the analytic gradients live on
# the device, and the comparison happens in float64 on the host:

# %%
rng = np.random.default_rng(0)
with bk.use(BACKEND):
    args = [ml.tensor(rng.standard_normal(shape), requires_grad=grad, dtype="float64")
            for shape, grad in (((3, 5), True), ((4, 5), False), ((4,), False), ((2, 5), True), ((4, 2), True))]
x, W0, b, A, B_ = args
print(f"gradcheck of F.lora_linear on {BACKEND}:", ml.gradcheck(lambda x, A, B_: F.lora_linear(x, W0, b, A, B_, 2.0), [x, A, B_]))

# %% [markdown]
# ## 4. How fast?
#
# Time per LoRA training step for a few batch sizes, on every backend available here. A GPU
# pays a fixed cost per kernel launch, and our model is tiny, so it wins only once a batch holds
# enough work. On a CPU the time grows with the batch from the start. The strict backend runs
# NumPy's own kernels and adds checks of CuPy's rules: a correctness tool, not a speed-up. Whether
# those checks cost anything you can measure at this size, the ratios printed below say (one
# timing on a shared machine varies by tens of percent from run to run: compare several).

# %%
batch_sizes = (2,) if FAST else (1, 4, 16, 64)
repeats = 1 if FAST else 3
all_examples = load_task("e2e", "train", max(batch_sizes))
step_ms = {}
for backend in bk.available_backends():
    model = lora_model(backend)
    opt = optim.AdamW(model.parameters(), lr=4e-3)
    step_ms[backend] = []
    for size in batch_sizes:
        b = collate(all_examples[:size], tokenizer)
        train_steps(model, opt, b, 1)  # warm-up (and, on a GPU, kernel compilation)
        start = time.perf_counter()
        train_steps(model, opt, b, repeats)
        step_ms[backend].append(1e3 * (time.perf_counter() - start) / repeats)
    print(f"{backend:<6}", "  ".join(f"batch {s}: {ms:7.1f} ms" for s, ms in zip(batch_sizes, step_ms[backend])))
if "strict" in step_ms:
    for size, strict_ms, numpy_ms in zip(batch_sizes, step_ms["strict"], step_ms["numpy"]):
        ratio = strict_ms / numpy_ms
        verdict = ("slower" if ratio > 1.1 else "faster" if ratio < 1 / 1.1 else "within 10 % of NumPy,")
        print(f"batch {size}: strict / NumPy = {ratio:.2f}, strict {verdict} in this run")
if FAST:
    print("FAST mode: one batch size, one repeat — these timings mean nothing; run in full mode to measure.")

# %%
from matplotlib.figure import Figure

fig = Figure(figsize=(6.4, 3.6))
ax = fig.add_subplot(1, 1, 1)
width = 0.8 / len(step_ms)
for n, (backend, values) in enumerate(step_ms.items()):
    positions = np.arange(len(batch_sizes)) + (n - (len(step_ms) - 1) / 2) * width
    ax.bar(positions, values, width, label=backend)
ax.set_xticks(np.arange(len(batch_sizes)))
ax.set_xticklabels([str(s) for s in batch_sizes])
ax.set_xlabel("batch size (e2e sequences of up to 64 tokens)")
ax.set_ylabel("ms per LoRA training step")
ax.set_yscale("log")
ax.legend()
title = "NumPy vs CuPy" if "cupy" in step_ms else "NumPy and strict (no GPU on this machine)"
ax.set_title(f"One LoRA training step: {title}" + ("\nFAST mode: one repeat, these timings mean nothing"
                                                    if FAST else ""), fontsize=10)
save_figure(fig, "07_step_time.png")

# %% [markdown]
# ## Exercises
#
# **Exercise 1 — a softmax for any backend.** Write `my_softmax(a)` for a *raw array* `a`
# (NumPy or CuPy) over its last axis. It must return an array of the same backend and dtype,
# and it must stay finite for logits as large as 1000. Use `xp = ml.backend.get_array_module(a)`
# instead of `np`. The check tries strict arrays too, so an `np.exp` in your function fails even
# without a GPU; where a GPU is present, it tries CuPy arrays as well.

# %%
def my_softmax(a):
    raise NotImplementedError  # your code here


check_softmax_any_backend(my_softmax)

# %% [markdown]
# **Exercise 2 — results back on the host.** Plotting and printing need NumPy arrays.
# `my_host_logits(model, idx)` returns the model's logits for token ids `idx` as a host NumPy
# array, whatever backend the model is on, without building a graph.

# %%
def my_host_logits(model, idx):
    raise NotImplementedError  # your code here


check_host_logits(my_host_logits)

# %% [markdown]
# ## Solutions
#
# Not in this file: try first. `show_hint("07.1")` gives a hint, `show_solution("07.1")` and
# `show_solution("07.2")` print solutions.

# %% [markdown]
# That is the core of the course. You built autograd, the LoRA layer with its backward, put it in
# a Transformer, fine-tuned it against full fine-tuning, merged and served it, measured which
# rank it needs, and ran it on a GPU (or checked, on the strict backend, that it would run there).
# Two tutorials take it further: 08 carries the adapter to Hugging Face PEFT, and 09 the variants
# that came after the paper.
#
# **Next:** [`08_to_peft.py`](08_to_peft.py) — from minilora to PEFT: GPT-2's fused `c_attn`, an
# adapter exported and loaded by PEFT with the same logits.
