# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 03 · A tiny Transformer, where LoRA goes, and the loss of eq. 2
#
# The paper adapts the weight matrices of a Transformer's self-attention (Sec. 4.2). In this
# tutorial you open minilora's tiny GPT-2, find Wq, Wk, Wv, Wo and the MLP, put LoRA on some of
# them, freeze everything else, and build the training loss of eq. 2 — the one that scores
# only the answer y, never the prompt x.

# %%
import numpy as np

import minilora as ml
from minilora import functional as F
from minilora import lora
from minilora.data import Tokenizer, collate, load_task
from minilora.exercises import check_loss_mask, check_masked_loss, save_figure, show_hint, show_solution
from minilora.models import load_base

ml.manual_seed(0)

# %% [markdown]
# ## 1. The model
#
# `load_base()` loads the shipped pre-trained model: a 4-layer GPT-2 with d_model = 128, trained
# on descriptions of restaurants (the "restaurant world"). It plays the part of the paper's
# pre-trained Φ₀. Each block is the GPT-2 block: LayerNorm, causal self-attention, LayerNorm,
# MLP, each wrapped in a residual connection.

# %%
model = load_base()
n_base = model.num_parameters()
print(model.config)
print(f"{n_base:,} parameters")
print(model.blocks[0])

# %% [markdown]
# ## 2. Where Wq, Wk, Wv, Wo and the MLP sit
#
# Parameter names follow GPT-2: `blocks.{i}.attn.{q,k,v,o}` are the attention projections
# (d_model → d_model each), `blocks.{i}.mlp.fc` (d_model → 4·d_model) and `blocks.{i}.mlp.proj`
# (4·d_model → d_model) the MLP. Weights are stored as (out, in), so a weight of shape (d, k) is
# the paper's W₀ ∈ R^{d×k} and a Linear computes y = x Wᵀ + b.

# %%
from minilora.diagrams import draw_block

save_figure(draw_block(targets=(), d_model=model.config.d_model), "03_block.png")

# %%
for name, p in model.named_parameters():
    if name.startswith("blocks.0.") and name.endswith(".weight"):
        print(f"{name:<26} {tuple(p.shape)!s:<11} {p.size:>7,}")

groups = {"attention Wq, Wk, Wv, Wo": (".attn.",), "MLP fc, proj": (".mlp.",), "embeddings": ("wte", "wpe"),
          "LayerNorms": ("ln",)}
counts = {g: sum(p.size for n, p in model.named_parameters() if any(key in n for key in keys))
          for g, keys in groups.items()}
for group, count in counts.items():
    print(f"{group:<26} {count:>9,}  ({100 * count / model.num_parameters():.1f} %)")

# %% [markdown]
# ## 3. Where LoRA goes
#
# `lora.apply_lora` replaces the Linear layers named in `target_modules` by `LoRALinear`
# layers (tutorial 02). The paper's main setting adapts only Wq and Wv (Sec. 4.2 and Table 5).
# The names of the frozen weights do not change, so a base checkpoint still loads into the
# adapted model. Here is the block above, with the paper's choice:

# %%
save_figure(draw_block(targets=("q", "v"), r=4, d_model=model.config.d_model), "03_block_lora.png")

# %% [markdown]
# Now on the model itself:

# %%
base_logits_idx = np.array([[1, 5, 9, 12, 3]])
with ml.no_grad():
    before = model(base_logits_idx).data.copy()

config = lora.LoRAConfig(r=4, alpha=8, target_modules=("q", "v"))
lora.apply_lora(model, config)
print(model.blocks[0].attn)

# %% [markdown]
# So far every parameter still requires grad, the frozen W₀ included. `mark_only_lora_as_trainable`
# sets `requires_grad = False` on everything but the A and B matrices. That is eq. 2: the
# optimisation runs over Θ only.

# %%
print("before freezing:", lora.trainable_summary(model))
lora.mark_only_lora_as_trainable(model)
print("after freezing: ", lora.trainable_summary(model))
print("trainable:", [n for n, p in model.named_parameters() if p.requires_grad][:4], "...")

# %% [markdown]
# The formula of Sec. 4.2 counts Θ: |Θ| = 2 × L̂ × d_model × r, with L̂ the number of adapted
# matrices (here Wq and Wv in every block). Note what "all params" counts: the adapted model
# holds the base's parameters *and* the new A and B, so it grew by exactly |Θ|. The fraction
# LoRA trains can be read against either total; the cell computes both:

# %%
c = model.config
L_hat = len(config.target_modules) * c.n_layer
theta = 2 * L_hat * c.d_model * config.r
print(f"|Θ| = 2 × L̂ × d_model × r = 2 × {L_hat} × {c.d_model} × {config.r} = {theta:,}  "
      f"(the summary counts {lora.trainable_summary(model)['lora']:,})")
print(f"all params = the base's {n_base:,} + the adapters' {theta:,} = {n_base + theta:,}")
print(f"LoRA trains {100 * theta / n_base:.2f} % of the base's parameters "
      f"({100 * theta / (n_base + theta):.4f} % of the adapted model's, as the summary says)")

# %% [markdown]
# B starts at zero, so the adapted model still computes exactly the base model's logits:

# %%
with ml.no_grad():
    after = model(base_logits_idx).data
print("logits unchanged by apply_lora:", np.array_equal(before, after))

# %% [markdown]
# ## 4. The loss of eq. 2: score y, not x
#
# A task example is a pair (x, y): for the `e2e` task, x is a meaning representation and y the
# sentence describing it. The model reads one sequence, `[bos] x => y [eos]`, and learns to
# predict each next token. Full fine-tuning (eq. 1) and LoRA (eq. 2) both maximise
#
#     Σ_{(x,y)} Σ_{t=1}^{|y|} log P(y_t | x, y_<t)
#
# so the loss sums over the **y** tokens only. The prompt is context, not something to learn to
# write. `collate` builds the batch and a `mask` that is 1 exactly where the loss counts:

# %%
tokenizer = Tokenizer.default()
examples = load_task("e2e", "train", 4)
batch = collate(examples, tokenizer)
print("idx", batch.idx.shape, "targets", batch.targets.shape, "mask", batch.mask.shape)
print("\nexample 0:", examples[0].prompt, "=>", examples[0].target)
first_y = int(np.argmax(batch.mask[0]))          # the first counted position
last_y = int(np.nonzero(batch.mask[0])[0][-1])    # the last one (its target is <eos>)
shown = [0, 1, 2, None, first_y - 2, first_y - 1, first_y, first_y + 1, first_y + 2, None, last_y - 1, last_y]
print(f"\n{'t':>3}  {'input token':<16} {'target (next) token':<20} mask")
for t in shown:
    if t is None:
        print("  ...")
        continue
    print(f"{t:>3}  {tokenizer.decode([batch.idx[0, t]]):<16} {tokenizer.decode([batch.targets[0, t]]):<20} "
          f"{int(batch.mask[0, t])}")

# %% [markdown]
# Decoding the targets where mask = 1 gives back y and the end-of-sequence token — nothing of
# the prompt:

# %%
counted = batch.targets[0][batch.mask[0] == 1]
print("counted tokens:", tokenizer.decode(counted))
print("y            :", examples[0].target)

# %% [markdown]
# The loss is the mean negative log-likelihood over the counted positions
# (`F.cross_entropy(logits, targets, mask=mask)`, which `model.loss` calls). Compare it with the
# loss over every real token, prompt included:

# %%
loss_y = model.loss(batch.idx, batch.targets, batch.mask)
with ml.no_grad():
    logits = model(batch.idx)
    real = (batch.targets != tokenizer.pad_id).astype(np.float32)  # every real token, prompt included
    loss_all = F.cross_entropy(logits, batch.targets, mask=real)
print(f"eq. 2 loss (y tokens only): {loss_y.item():.3f}    loss over all real tokens: {loss_all.item():.3f}")

# %% [markdown]
# The base model has never seen `=>` (no pretraining line contains it), although it knows how
# descriptions and facts relate. Fine-tuning lowers the first number (tutorial 04). The second
# would also reward learning to write prompts, which is not the task. One backward pass shows
# where the gradients go: into A and B, nowhere else.

# %%
loss_y.backward()
q = model.blocks[0].attn.q
print("lora_A.grad:", q.lora_A["default"].grad.shape, " lora_B.grad:", q.lora_B["default"].grad.shape)
print("W0.grad:", q.weight.grad, "  (frozen: never computed, no memory spent on it)")

# %% [markdown]
# ### A picture of the batch
#
# Each column below is one example of a `classify` batch (a description and a question, then a
# one-word answer), and each row a position t, written as the token the model must predict there
# (seq[t + 1]). The colour says whether the loss counts it.

# %%
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

short = collate(load_task("classify", "train", 3), tokenizer)
kind = np.where(short.mask == 1, 2, np.where(short.targets != tokenizer.pad_id, 1, 0))  # 0 pad, 1 prompt, 2 counted
T = min(kind.shape[1], int((kind > 0).any(axis=0).nonzero()[0][-1]) + 2)  # the real positions (+ 1 padded)
colours = ["#eeeeee", "#9ecae1", "#fd8d3c"]
fig = Figure(figsize=(7.6, 0.24 * T + 1.2))
ax = fig.add_subplot(1, 1, 1)
ax.imshow(kind[:, :T].T, cmap=ListedColormap(colours), vmin=0, vmax=2, aspect="auto")
for b in range(kind.shape[0]):
    for t in range(T):
        if kind[b, t]:
            ax.text(b, t, tokenizer.decode([short.targets[b, t]]), ha="center", va="center", fontsize=8)
ax.set_xticks(range(kind.shape[0]))
ax.set_xticklabels([f"example {b}" for b in range(kind.shape[0])])
ax.xaxis.tick_top()
ax.set_ylabel("position t (cell: the target token seq[t + 1])")
ax.legend(handles=[Patch(facecolor=c, edgecolor="#666666", label=label) for c, label in
                   zip(colours, ["padding (no loss)", "prompt x (no loss)", "y and <eos> (loss counts: mask = 1)"])],
          loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=3, fontsize=8, frameon=False)
ax.set_title("The loss mask of eq. 2 on a classify batch", fontsize=10, pad=22)
save_figure(fig, "03_loss_mask.png")

# %% [markdown]
# ## Exercises
#
# **Exercise 1 — the mask.** A sequence `[bos] x => y [eos]` has `n_tokens` tokens; its first
# `n_prompt` are `[bos] x =>`. The model reads positions 0 … n_tokens − 2 and at position t
# predicts token t + 1. The batch is padded to `width` positions. Write `my_mask(n_prompt,
# n_tokens, width)` returning the loss mask of that row (length `width`). `check_loss_mask`
# compares it with `collate` on real examples.

# %%
def my_mask(n_prompt, n_tokens, width):
    raise NotImplementedError  # your code here


check_loss_mask(my_mask)

# %% [markdown]
# **Exercise 2 — the masked loss.** Write the loss of eq. 2 with minilora ops:
# `my_loss(logits, targets, mask)` gets logits (a Tensor of shape (B, T, V)), integer targets
# (B, T) and the mask (B, T), and returns the mean negative log-likelihood over the positions
# where mask = 1, as a Tensor that backward can go through. `F.log_softmax` is allowed;
# `F.cross_entropy` would be cheating. `check_masked_loss` compares the value *and* the gradient.

# %%
def my_loss(logits, targets, mask):
    raise NotImplementedError  # your code here


check_masked_loss(my_loss)

# %% [markdown]
# ## Solutions
#
# Not in this file: try first. `show_hint("03.1")` gives a hint (call it again with 2 for the
# formula), `show_solution("03.1")` and `show_solution("03.2")` print solutions.

# %% [markdown]
# **Next:** [`04_finetune.py`](04_finetune.py) — train it: full fine-tuning against LoRA on the shipped base.
