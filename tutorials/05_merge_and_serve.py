# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 05 · Merge and serve: no extra latency, task switching, mixed batches
#
# A fine-tuned LoRA model is the frozen base plus, per task, two thin matrices per adapted
# layer. Section 4.2 of the paper draws three consequences for serving:
#
# 1. **Merge.** W = W₀ + (α/r)·B A is an ordinary weight matrix, so a merged model runs exactly
#    as fast as the base. Adapter layers (Houlsby et al. 2019) add layers that must run one
#    after another; the paper measures +20–30 % latency at batch size 1 (Table 1).
# 2. **Switch.** To change task, subtract B A and add B′A′. The 350 GB base stays in memory;
#    only the megabytes of the adapters change.
# 3. **Mix.** The paper names a limitation: once merged, "it is not straightforward to batch
#    inputs to different tasks with different A and B in a single forward pass". Unmerged it is
#    easy: W₀x is shared by every row, and each row adds its own B_i A_i x.
#
# You will see all three, on two adapters trained briefly (the first cell prints how many steps).

# %%
import copy
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny matrices: one BLAS thread is fastest

import numpy as np

import minilora as ml
from minilora import lora
from minilora.methods import apply_method
from minilora.data import Tokenizer, collate, load_task, prompt_ids
from minilora.exercises import (
    check_merge, check_mixed_batch, check_switch, output_dir, save_figure, show_hint, show_solution,
)
from minilora.generate import generate
from minilora.models import load_base
from minilora.models.pretrained import BASE_WEIGHTS
from minilora.recipes import FAST, finetune

TASKS = ("e2e", "classify")
STEPS = 3 if FAST else 80            # per adapter
N_EVAL = 3 if FAST else 20           # test examples scored per adapter
ROUNDS = 5 if FAST else 100          # latency: rounds of 3 forward passes per model
LORA = {"method": "lora", "r": 4, "alpha": 8, "targets": ("q", "v")}  # the paper's setting, as in tutorial 04
tokenizer = Tokenizer.default()
base = load_base()

# %% [markdown]
# ## 1. Two adapters, two small files
#
# We fine-tune one adapter per task (`e2e`: data-to-text; `classify`: yes / no / maybe
# questions about a description) and save each with `lora.save_adapter`: a safetensors file with
# A, B and the LoRAConfig, and no copy of W₀.

# %%
paths, scores = {}, {}
print(f"{STEPS} LoRA steps per adapter, scored on {N_EVAL} test examples")
for task in TASKS:
    run = finetune(task, base=base, steps=STEPS, n_eval=N_EVAL, seed=0, progress=not FAST, **LORA)
    scores[task] = run.metric
    paths[task] = lora.save_adapter(os.path.join(output_dir(), f"05_{task}.safetensors"), run.model, adapter_name=task)
    chance = "   (chance level for 3 labels: 0.33)" if task == "classify" else ""
    print(f"{task:<9} {run.metric_name} {run.metric:.2f}{chance}   adapter file "
          f"{os.path.getsize(paths[task]) / 1e3:,.0f} kB")
print(f"the base model's weights: {os.path.getsize(BASE_WEIGHTS) / 1e3:,.0f} kB")
wrong = round((1 - scores["classify"]) * N_EVAL)
print(f"classify gets {wrong} of its {N_EVAL} test answers wrong (accuracy {scores['classify']:.2f}; chance: 0.33)")

# %% [markdown]
# Be honest about the numbers printed above: compare each score with its ceiling of 1.0, and
# classify's with chance (one of three labels, 0.33). `make demo` trains far longer. Where
# classify stays low after a short run, this is why: the base answers most such questions already
# (it read them in pretraining), but the task's separator "=>" is a token it never saw, and a few
# dozen steps may be too few to route the answer there. This tutorial keeps the short run because
# what it shows, merging, switching and mixing, does not depend on how good the adapters are;
# the last line above says how many classify answers to expect wrong.

# %% [markdown]
# One server holds the base once and loads both adapters under their names:

# %%
server = load_base()
for task, path in paths.items():
    lora.load_adapter(path, server)
server.eval()
print("adapters:", lora.list_adapters(server))
lora.set_adapter(server, "e2e")
print(server.blocks[0].attn.q)

# %% [markdown]
# ## 2. Merge: the same outputs, the base model's cost
#
# `lora.merge` writes W₀ + s·B A into every adapted weight, in place (keeping a copy of W₀ so that
# `unmerge` restores it bit for bit). The forward pass is then a plain `F.linear`: no second path,
# no extra matmul.

# %%
probe = collate(load_task("e2e", "test", 4), tokenizer).idx         # (4, T) token ids
with ml.no_grad():
    unmerged_logits = server(probe).data.copy()
    lora.merge(server)
    merged_logits = server(probe).data
print(server.blocks[0].attn.q)
print(f"max |merged − unmerged| logit: {np.abs(merged_logits - unmerged_logits).max():.2e}  (float32 rounding)")

# %% [markdown]
# What merge did to one weight, `blocks.0.attn.q`: it added the rank-r matrix s·B A to W₀, and
# the layer is one matrix again. Note the two colour scales; the lines printed below the figure
# give the size of the update next to W₀ and its singular values: r of them, the rest zero up to
# rounding.

# %%
from matplotlib.figure import Figure

q_layer = server.blocks[0].attn.q
delta = ml.backend.to_numpy(q_layer.delta_weight("e2e")).astype(np.float64)   # s·B A, (d, k)
W_merged = ml.backend.to_numpy(q_layer.weight.data).astype(np.float64)        # W₀ + s·B A
W0 = W_merged - delta
fig = Figure(figsize=(12, 3.4), layout="constrained")
scale, dscale = np.abs(W0).max(), np.abs(delta).max()
panels = [("W₀ (frozen)", W0, scale), ("+ s·B A (rank 4, own colour scale)", delta, dscale),
          ("= W, what the merged layer uses", W_merged, scale)]
for n, (title, matrix, vmax) in enumerate(panels):
    ax = fig.add_subplot(1, 4, n + 1)
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("k (input)")
    ax.set_ylabel("d (output)") if n == 0 else None
    fig.colorbar(image, ax=ax, shrink=0.8)
ax = fig.add_subplot(1, 4, 4)
singular = np.linalg.svd(delta, compute_uv=False)
ax.semilogy(np.arange(1, 13), np.maximum(singular[:12], 1e-12), "o-")
ax.set_xlabel("index")
ax.set_title("singular values of s·B A", fontsize=9)
fig.suptitle("lora.merge: W = W₀ + s·B A, then the layer is a plain matmul (unmerge subtracts it back)", fontsize=10)
save_figure(fig, "05_merge.png")
rank = int((singular > 1e-6 * singular[0]).sum())
print(f"W is {W0.shape[0]} × {W0.shape[1]}; ‖s·B A‖_F / ‖W₀‖_F = {np.linalg.norm(delta) / np.linalg.norm(W0):.3f}")
print("largest singular values of s·B A:", np.array2string(singular[:6], precision=2))
print(f"numerical rank of s·B A: {rank} (the adapter's r = {LORA['r']})")

# %% [markdown]
# ### Latency at batch size 1 (Table 1)
#
# We time one forward pass of a 32-token sequence at batch size 1. The four models are timed
# interleaved: in every round each one runs three passes, in a rotating order, so that a busy
# machine slows all of them alike. We report the median time over the rounds, and the overhead
# as the median of each round's ratio to the base's time in that round. The four models:
#
# - **base**: the pre-trained model;
# - **LoRA merged**: `server` as it is now;
# - **LoRA unmerged**: W₀x + s·B(Ax), two extra thin matmuls per adapted layer;
# - **Adapterᴴ**: Houlsby adapters (a d → 4 → d bottleneck with a skip connection) after the
#   attention output and after the MLP of every block. This is the paper's adapter baseline
#   ("Adapter^H" in its tables), `minilora.methods.apply_method(model, "adapter_h")`.

# %%
unmerged = copy.deepcopy(server)
lora.unmerge(unmerged)

adapter_model = copy.deepcopy(base)
apply_method(adapter_model, "adapter_h", r=4)
adapter_model.eval()

models = {"base": base, "LoRA merged": server, "LoRA unmerged": unmerged, "Adapterᴴ": adapter_model}
if FAST:
    print(f"FAST mode: {ROUNDS} rounds on a busy machine — these timings mean nothing; run in full mode to measure.")
one = collate(load_task("e2e", "test", 1), tokenizer).idx[:, :32]      # (1, 32): batch 1, 32 tokens
timings = {name: [] for name in models}
with ml.no_grad():
    for m in models.values():
        m(one)  # warm-up
    for round_ in range(ROUNDS):
        order = list(models)[round_ % len(models):] + list(models)[:round_ % len(models)]
        for name in order:
            start = time.perf_counter()
            for _ in range(3):
                models[name](one)
            timings[name].append((time.perf_counter() - start) / 3)
median = {name: 1e3 * float(np.median(t)) for name, t in timings.items()}
# the overhead of each round, over the base's time in the same round: robust when the machine's load drifts
overhead = {name: 100 * float(np.median(np.array(t) / np.array(timings["base"])) - 1) for name, t in timings.items()}
for name, ms in median.items():
    print(f"{name:<14} {ms:6.2f} ms   {overhead[name]:+6.1f} % over the base (median of per-round ratios)")
# is the median overhead more than noise? A 95 % interval of the median from the order statistics
# of the rounds (ranks n/2 ± 0.98·√n): it holds the true median 95 % of the time, whatever the spread
n_rounds = len(timings["base"])
half = 0.98 * np.sqrt(n_rounds)
ranks = int(max(0, np.floor(n_rounds / 2 - half))), int(min(n_rounds - 1, np.ceil(n_rounds / 2 + half)))
for name in list(models)[1:]:
    per_round = np.sort(100 * (np.array(timings[name]) / np.array(timings["base"]) - 1))
    low, high = per_round[ranks[0]], per_round[ranks[1]]
    verdict = ("within the timing noise of the base" if low <= 0 <= high else
               "slower than the base" if low > 0 else "faster than the base")
    print(f"{name:<14} {verdict}: its median overhead lies between {low:+.1f} % and {high:+.1f} % (95 %)")

# %%
fig = Figure(figsize=(6.4, 3.6))
ax = fig.add_subplot(1, 1, 1)
names = list(median)
ratios = {n: 100 * np.array(timings[n]) / np.array(timings["base"]) for n in names}  # % of the base, per round
centre = [float(np.median(ratios[n])) for n in names]
quartiles = np.array([np.percentile(ratios[n], [25, 75]) for n in names])
ax.bar(names, centre, color=["#777777", "#31a354", "#74c476", "#de2d26"],
       yerr=np.array([centre - quartiles[:, 0], quartiles[:, 1] - centre]), capsize=4)
ax.axhline(100, color="grey", linewidth=0.8)
for i, n in enumerate(names):
    ax.text(i, 50, f"{overhead[n]:+.0f} %\n{median[n]:.1f} ms", ha="center", color="white", fontsize=9,
            fontweight="bold")
ax.set_ylabel("latency, % of the base (per round)")
ax.set_title("Batch-1 inference latency, 32 tokens (Table 1 in miniature)"
             + ("\nFAST mode: 5 rounds, these timings mean nothing" if FAST else ""), fontsize=10)
save_figure(fig, "05_latency.png")

# %% [markdown]
# Read the verdicts printed above. The merged model runs exactly the base model's matmuls, so
# whatever it shows beyond timing noise is Python: a merged `LoRALinear` still checks its state
# on every call, a few microseconds, and `lora.merge_and_unload` turns the layers back into plain
# `nn.Linear`. The other two do extra work: the unmerged LoRA its thin matmuls, and the adapters
# their extra layers. On a
# GPU the adapters' cost is mostly *sequential* (their layers cannot run in parallel with the
# block). On a CPU at this size each small matmul carries a fixed Python and BLAS overhead, so the
# percentages differ from the paper's. What does not change is the merged column: the merged
# model runs exactly the base model's operations.
#
# ## 3. Switch tasks: subtract B A, add B′A′
#
# Merged weights hold one task. To serve the other, `unmerge` (W back to W₀), `set_adapter`, and
# `merge` again. (What that does to the numbers in W, without keeping a copy of W₀, is exercise 2.)
# The question is a `classify` one; remember from section 1 how many answers this short-trained
# classify adapter gets wrong: its answer may differ from the reference.

# %%
question = load_task("classify", "test", 1)[0]
ids = [prompt_ids(tokenizer, question.prompt)]


def answer(model):
    return tokenizer.decode(generate(model, ids, max_new_tokens=5, eos_id=tokenizer.eos_id)[0], skip_special=True)


print("question:", question.prompt, "  reference:", question.target)
print("with the e2e adapter merged     :", answer(server))
lora.unmerge(server)
lora.set_adapter(server, "classify")
lora.merge(server)
reply = answer(server)
lora.unmerge(server)
right = reply.split()[-1:] == question.target.split()  # the label is the last word of the answer
print("with the classify adapter merged:", reply, " (right)" if right else
      f" (wrong: this adapter got {wrong} of {N_EVAL} test answers wrong, see section 1)")

# %% [markdown]
# ## 4. One batch, several tasks
#
# A merged W serves one task at a time. Unmerged, a batch can mix tasks. Each row names its
# adapter in `adapter_ids`, and `"__base__"` means no adapter: `generate(..., adapter_ids=...)`
# runs each step inside `with lora.mixed_batch(server, adapter_ids): server(idx)`, which works
# on any model with LoRA layers (the model's code never sees the names). Inside every LoRA layer the
# shared W₀x is computed once for the whole batch, then each group of rows adds its own
# s·B(Ax). This is the idea behind Punica and S-LoRA, which serve thousands of adapters this way.

# %%
rows = [load_task("e2e", "test", 1)[0], question, load_task("e2e", "test", 2)[1]]
adapter_ids = ["e2e", "classify", "__base__"]
prompts = [prompt_ids(tokenizer, ex.prompt) for ex in rows]
mixed = generate(server, prompts, max_new_tokens=40, eos_id=tokenizer.eos_id, adapter_ids=adapter_ids)
for name, ex, out in zip(adapter_ids, rows, mixed):
    print(f"[{name}] {ex.prompt}\n    => {tokenizer.decode(out, skip_special=True)}")

# %% [markdown]
# Is each row's output exactly what its adapter alone would give? Run every row again, one
# adapter at a time, and compare:

# %%
alone = []
for name, p in zip(adapter_ids, prompts):
    if name == "__base__":
        with lora.disable_adapters(server):
            alone.append(generate(server, [p], max_new_tokens=40, eos_id=tokenizer.eos_id)[0])
    else:
        lora.set_adapter(server, name)
        alone.append(generate(server, [p], max_new_tokens=40, eos_id=tokenizer.eos_id)[0])
print("mixed batch == one adapter at a time:", all(list(a) == list(b) for a, b in zip(mixed, alone)))

# %% [markdown]
# ## Exercises
#
# **Exercise 1 — merge.** `my_merge(W0, lora_A, lora_B, scaling)` returns the merged weight.
# The check verifies that `F.linear` with your weight gives the LoRA layer's output.

# %%
def my_merge(W0, lora_A, lora_B, scaling):
    raise NotImplementedError  # your code here


check_merge(my_merge)

# %% [markdown]
# **Exercise 2 — switch.** `W` holds W₀ + s·B A of the old task. `my_switch(W, old, new)`, with
# `old = (A, B, s)` and `new = (A′, B′, s′)`, returns the weight for the new task, without W₀.

# %%
def my_switch(W, old, new):
    raise NotImplementedError  # your code here


check_switch(my_switch)

# %% [markdown]
# **Exercise 3 — a mixed batch by hand.** `my_mixed(x, W0, bias, adapters, adapter_ids)`: x is
# (N, k), `adapters` maps a name to (A, B, s), `adapter_ids` has one name per row (`"__base__"`
# for none). Return h (N, d), row i computed with its own adapter. The check compares with
# a `LoRALinear` run under `lora.mixed_batch(layer, adapter_ids)`.

# %%
def my_mixed(x, W0, bias, adapters, adapter_ids):
    raise NotImplementedError  # your code here


check_mixed_batch(my_mixed)

# %% [markdown]
# ## Solutions
#
# Not in this file: try first. `show_hint("05.1")` (and "05.2", "05.3") gives a hint, with 2 the
# formula; `show_solution("05.1")` prints a solution.

# %% [markdown]
# **Next:** [`06_what_rank.py`](06_what_rank.py) — how small can r be? A rank sweep, and what the learned subspaces
# have in common (Sec. 7).
