# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 08 · From minilora to PEFT: Hugging Face GPT-2 checkpoints and PEFT adapters, in and out
#
# Everything so far ran on minilora's own tiny GPT-2. The arithmetic was GPT-2's: pre-LayerNorm
# blocks, causal attention scaled by 1/√head_dim, a GELU-tanh MLP, a head tied to the token
# embedding. So a model trained here *is* a GPT-2, and a LoRA adapter trained here *is* a PEFT
# LoRA adapter. Only the packaging differs. This tutorial crosses that bridge in both directions:
#
# 1. how Hugging Face packs the same weights (Conv1D, and one fused `c_attn` for q, k and v);
# 2. export the course's adapter to PEFT, and check with PEFT itself (when installed) that the
#    logits are the same;
# 3. import a Hugging Face GPT-2 folder: a tiny random one built here, offline, and your real
#    `gpt2` if it is in your Hugging Face cache;
# 4. analyse a PEFT adapter with the paper's tools from Sec. 7.
#
# `minilora.hf` needs only NumPy, safetensors and json. PyTorch, transformers and PEFT are used
# below only to *check* the results, and the tutorial skips those cells when they are missing.

# %%
import importlib.util
import json
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny matrices: one BLAS thread is fastest

import numpy as np

import minilora as ml
from minilora import hf, lora
from minilora.analysis import amplification_factor, low_rank_svd, subspace_similarity_grid
from minilora.exercises import check_block_B, check_pack_c_attn, output_dir, save_figure, show_hint, show_solution
from minilora.generate import generate
from minilora.hf.commands import adapter_updates
from minilora.models import GPT, GPTConfig, load_base
from minilora.recipes import FAST, finetune

OUT = output_dir()
STEPS = 3 if FAST else 60
HAVE_PEFT = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "peft"))
print(f"PEFT check {'on' if HAVE_PEFT else 'off (pip install torch transformers peft to run it)'}"
      f"{'; FAST mode: the numbers mean nothing' if FAST else ''}")

# %% [markdown]
# ## 1. The same weights, packed differently
#
# minilora's `nn.Linear` stores W ∈ R^{out×in} and computes y = x Wᵀ + b, so W₀ ∈ R^{d×k} as in the
# paper. Hugging Face's GPT-2 uses `Conv1D`, which stores the transpose (in, out) and computes
# y = x W + b. And it computes q, k and v with *one* layer `c_attn` of shape (d, 3d): its columns
# 0:d are q, d:2d are k, 2d:3d are v. `hf.save_gpt2` and `hf.load_gpt2` do this packing:

# %%
base = load_base()
hf_tensors = hf.checkpoint.to_hf_state(base)
for ours, theirs in (("blocks.0.attn.q.weight", "transformer.h.0.attn.c_attn.weight"),
                     ("blocks.0.attn.o.weight", "transformer.h.0.attn.c_proj.weight"),
                     ("blocks.0.mlp.fc.weight", "transformer.h.0.mlp.c_fc.weight"),
                     ("blocks.0.mlp.proj.weight", "transformer.h.0.mlp.c_proj.weight")):
    print(f"{ours:<26} {str(base.state_dict()[ours].shape):>11}  ->  {theirs:<38} {hf_tensors[theirs].shape}")

# %% [markdown]
# ## 2. Export the course's adapter to PEFT
#
# A short LoRA run on the `e2e` task (r = 4 on Wq and Wv, as in tutorial 04), then two files:
# the base model as a Hugging Face GPT-2 folder, and the adapter as a PEFT adapter folder.
#
# The adapter is where the packing matters. LoRA on q and v of rank r is exactly one LoRA on
# `c_attn` of rank 2r: A stacks A_q over A_v, and B is block-structured, so that
#
#     B A = [B_q 0; 0 0; 0 B_v] [A_q; A_v] = [B_q A_q; 0; B_v A_v]
#
# (the k rows stay 0). PEFT scales by lora_alpha / (2r), so the export sets lora_alpha = 2α to keep
# minilora's α/r. We export in float64 so that the comparison below is exact, not float32-close.

# %%
run = finetune("e2e", "lora", base=base, r=4, alpha=8.0, targets=("q", "v"), steps=STEPS, n_eval=3 if FAST else 20,
               progress=not FAST, measure_memory=False)
course = run.model
course.to(dtype="float64")
base_dir, peft_dir = os.path.join(OUT, "08_base_hf"), os.path.join(OUT, "08_e2e_peft")
hf.save_gpt2(base_dir, load_base(dtype="float64"))
hf.save_peft_adapter(peft_dir, course, adapter_name="e2e", base_model_name_or_path=base_dir)
with open(os.path.join(peft_dir, "adapter_config.json")) as f:
    peft_config = json.load(f)
print({k: peft_config[k] for k in ("target_modules", "r", "lora_alpha", "fan_in_fan_out", "rank_pattern")})
print(f"e2e {run.metric_name} after {STEPS} steps: {run.metric:.2f}")

# %% [markdown]
# Now load both with the stock libraries, exactly as a PEFT user would, and compare the logits with
# minilora's on the same token ids. (Skipped without torch, transformers and peft.)

# %%
idx = np.random.default_rng(0).integers(0, base.config.vocab_size, (2, 24))
course.eval()
with ml.no_grad():
    ours = np.asarray(course(idx).data)
if HAVE_PEFT:
    import warnings

    import torch
    from peft import PeftModel
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # no loading bars, and no notices about config fields
    transformers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # PEFT calls a deprecated helper

    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base_dir, dtype=torch.float64),
                                           peft_dir).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor(idx)).logits.numpy()
    print(f"PEFT vs minilora logits: max |difference| = {np.max(np.abs(theirs - ours)):.2e} "
          f"(logits up to {np.max(np.abs(ours)):.1f})")
else:
    print("skipped: torch, transformers or peft is not installed")

# %% [markdown]
# The difference printed above is float64 rounding, many orders of magnitude below the logits.
# (`tests/oracle/test_hf.py` checks the same for q, k, v, o, the MLP, rsLoRA and mixed ranks,
# and after PEFT's `merge_and_unload`.)
#
# One caveat, stated in `save_peft_adapter`'s docstring: the export is exact for inference and for
# merging. If you keep training it inside PEFT, PEFT trains the whole `c_attn` block — the zero
# blocks of B and the k rows too — which is a superset of the structure you trained here.
#
# ## 3. Import a Hugging Face GPT-2
#
# The other direction: `hf.load_gpt2(folder)` reads `config.json` and `model.safetensors` (or a
# sharded index) and gives a GPT like any other, every parameter trainable. We build a tiny random
# GPT-2 folder offline: with transformers' own `save_pretrained` when it is installed, else with
# `hf.save_gpt2` (the same layout). Then LoRA on it is the code of tutorial 03, unchanged.

# %%
tiny_dir = os.path.join(OUT, "08_tiny_gpt2")
if HAVE_PEFT:
    from transformers import GPT2Config

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(tiny_dir)
else:
    ml.manual_seed(0)
    hf.save_gpt2(tiny_dir, GPT(GPTConfig(vocab_size=100, block_size=32, n_layer=2, n_head=4, d_model=32)))
tiny = hf.load_gpt2(tiny_dir)
print(tiny.config)
if HAVE_PEFT:  # the same model in transformers gives the same logits
    with torch.no_grad():
        theirs = GPT2LMHeadModel.from_pretrained(tiny_dir).eval()(torch.tensor(idx % 100)).logits.numpy()
    with ml.no_grad():
        print(f"transformers vs minilora on the tiny GPT-2 (float32): max |Δ logits| = "
              f"{np.max(np.abs(theirs - np.asarray(tiny(idx % 100).data))):.1e}")
lora.apply_lora(tiny, lora.LoRAConfig(r=2, alpha=4.0, target_modules=("q", "v")))
lora.mark_only_lora_as_trainable(tiny)
print(lora.trainable_summary(tiny))

# %% [markdown]
# With a real GPT-2 in your Hugging Face cache (`huggingface-cli download gpt2` once, online),
# `hf.load_gpt2("gpt2")` finds it there; minilora itself never downloads anything. That is the
# paper's own model family (GPT-2 medium and large in Sec. 6), at 124M parameters:

# %%
try:
    if FAST:
        raise FileNotFoundError("not tried in FAST mode")
    gpt2 = hf.load_gpt2("gpt2")
    tokenizer = hf.load_tokenizer("gpt2")
    prompt = tokenizer.encode("LoRA freezes the pre-trained weights and")
    with ml.no_grad():
        gpt2.eval()
        print(tokenizer.decode(prompt + generate(gpt2, [prompt], 12)[0]))
except (FileNotFoundError, ImportError, ValueError) as exc:
    print(f"no real GPT-2 here ({type(exc).__name__}: {str(exc).split(';')[0][:80]}); "
          "the tiny random one above stands in for it")

# %% [markdown]
# ## 4. The paper's analyses on a PEFT adapter
#
# `hf.load_peft_adapter` reads any PEFT LoRA adapter for GPT-2 (`c_attn` of any rank, `c_proj`,
# `c_fc`, rsLoRA, rank and alpha patterns), and `minilora analyze` runs Sec. 7 on it. Here we
# analyse the exported course adapter against a second run of the same task with another seed:
#
# - the singular values of each ΔW = s·B·A (`analysis.low_rank_svd`, which never forms the d×k matrix);
# - the amplification factor ‖ΔW‖_F / ‖UᵀWVᵀ‖_F of Table 7, against the base weights W;
# - the subspace similarity φ of Sec. 7.2 between the two adapters' A matrices (Fig. 4: two seeds).

# %%
second = finetune("e2e", "lora", base=base, r=4, alpha=8.0, targets=("q", "v"), steps=STEPS, seed=1,
                  n_eval=3 if FAST else 20, progress=not FAST, measure_memory=False).model
updates, _ = adapter_updates(peft_dir)       # {matrix: (A, B, scaling)}, c_attn split into q, v
W = {n.removesuffix(".weight"): np.asarray(p.data, dtype=np.float64) for n, p in load_base().named_parameters()}
layers2 = dict(lora.lora_layers(second))
rows = []
for name, (A, B, s) in updates.items():
    _, sv, _ = low_rank_svd(B, A, s)
    amplification = amplification_factor(s * B @ A, W[name], A.shape[0])
    grid = subspace_similarity_grid(A, np.asarray(layers2[name].lora_A["e2e"].data, dtype=np.float64))
    rows.append((name, sv, amplification, grid))
    print(f"{name:<16} σ(ΔW) = {np.array2string(sv, precision=3):<28} amplification {amplification:6.2f}   "
          f"φ(1,1) with seed 1: {grid[0, 0]:.2f}")

# %%
from matplotlib.figure import Figure

fig = Figure(figsize=(10, 3.4), layout="constrained")
ax = fig.add_subplot(1, 3, 1)
for name, sv, _, _ in rows:
    ax.plot(range(1, len(sv) + 1), sv / sv[0], marker=".", alpha=0.7, label=name)
ax.set_xlabel("i")
ax.set_ylabel("σ_i / σ_1")
ax.set_title("spectrum of each ΔW", fontsize=9)
ax.legend(fontsize=6)
ax = fig.add_subplot(1, 3, 2)
ax.bar(range(len(rows)), [a for _, _, a, _ in rows])
ax.set_xticks(range(len(rows)))
ax.set_xticklabels([n.replace("blocks.", "") for n, _, _, _ in rows], rotation=90, fontsize=7)
ax.set_title("amplification factor (Table 7)", fontsize=9)
ax = fig.add_subplot(1, 3, 3)
name, _, _, grid = rows[len(rows) // 2]
image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))
fig.colorbar(image, ax=ax, shrink=0.85)
ax.set_xticks(range(1, grid.shape[1] + 1))
ax.set_yticks(range(1, grid.shape[0] + 1))
ax.set_xlabel("j (seed 1)")
ax.set_ylabel("i (the exported adapter)")
ax.set_title(f"φ(i, j), {name}", fontsize=9)
save_figure(fig, "08_peft_analysis.png")

# %% [markdown]
# ### Any architecture: a Llama-shaped adapter
#
# Section 4 read the adapter into minilora's GPT-2. A PEFT folder for Llama, Mistral, Qwen2, Gemma
# or Phi needs no model at all: each adapted module `M` is a pair `M.lora_A.weight` (r, in),
# `M.lora_B.weight` (out, r) in `adapter_model.safetensors`, and its W₀ is the tensor `M.weight`
# of the base's safetensors. `minilora analyze` (and `hf.analyze_adapter`) reads just that, one
# base matrix at a time. Here PEFT adapts a tiny random `LlamaForCausalLM` (q_proj and v_proj,
# r = 4; B set to random values in place of training, since PEFT starts it at 0), and we analyse it
# next to the course's GPT-2 adapter. (Skipped without torch, transformers and peft.)

# %%
if HAVE_PEFT:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    llama_base, llama_adapter = os.path.join(OUT, "08_tiny_llama"), os.path.join(OUT, "08_llama_lora")
    llama.save_pretrained(llama_base)
    llama_peft = get_peft_model(llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in llama_peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    llama_peft.save_pretrained(llama_adapter)
    import contextlib
    import io

    from minilora.cli import main as minilora_cli

    summaries = {}
    for label, folder, weights in (("GPT-2", peft_dir, base_dir), ("Llama", llama_adapter, llama_base)):
        out = os.path.join(OUT, f"08_analyze_{label.lower()}")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # the table, the means, JSON and PNG
            minilora_cli(["analyze", folder, "--base", weights, "--out", out])
        print(printed.getvalue().replace(OUT, "$MINILORA_OUT"))  # the output folder by its name, not its path
        with open(os.path.join(out, "analyze.json")) as f:
            summaries[label] = json.load(f)["summary"]["by_kind"]
    for label, groups in summaries.items():
        for group in groups:
            print(f"{label:<6} {group['kind']:<17} ‖ΔW‖_F {group['norm_delta_W']:.3f}   top-1 share "
                  f"{group['top1_share']:.2f}   amplification {group['amplification']:6.2f}")
else:
    print("skipped: torch, transformers or peft is not installed")

# %% [markdown]
# One command, two routes. The GPT-2 folder is read into minilora's GPT-2, so its `c_attn` is split
# back into q and v; the Llama folder is read by tensor name alone (`hf.analyze`), and its q_proj
# and v_proj are separate modules already: v_proj has 32 rows, because grouped-query attention
# gives it 2 key/value heads of 16. The columns mean the same in both. Compare the share of ‖ΔW‖²
# in the top direction: a random B spreads ΔW over its r directions, where training concentrates it
# (Sec. 7.2; the numbers mean something only outside FAST mode). The amplification grows with ‖ΔW‖,
# so compare it between adapters of similar size only.
#
# The same from the command line, on any adapter you have — minilora's file or PEFT's folder:
#
#     minilora export --adapter e2e.safetensors --to-peft e2e-peft --base-to-hf base-hf
#     minilora analyze e2e-peft --against e2e-seed1.safetensors --base base-hf
#     minilora import-peft some-peft-adapter --base gpt2-dir --out adapter.safetensors
#
# And back: the PEFT folder comes back into minilora as the adapter it was (A_q and A_v are the
# rows of the stacked A that each block of B reads):

# %%
back = load_base(dtype="float64")
hf.load_peft_adapter(peft_dir, back, adapter_name="from_peft")
print(lora.get_adapter_config(back, "from_peft"))
back.eval()
with ml.no_grad():
    print(f"round trip minilora -> PEFT -> minilora: max |Δ logits| = {np.max(np.abs(np.asarray(back(idx).data) - ours)):.1e}")

# %% [markdown]
# ## Exercises
#
# **Exercise 1 — pack c_attn.** `my_pack_c_attn(W_q, W_k, W_v)` gets three minilora weights of
# shape (d, d), stored (out, in), and returns Hugging Face's `c_attn` weight of shape (d, 3d),
# stored (in, out).

# %%
def my_pack_c_attn(W_q, W_k, W_v):
    raise NotImplementedError  # your code here


check_pack_c_attn(my_pack_c_attn)

# %% [markdown]
# **Exercise 2 — the block-structured B.** LoRA on q and v with rank r each, B_q and B_v of shape
# (d, r). With c_attn's A = [A_q; A_v] of shape (2r, d), return c_attn's B of shape (3d, 2r) so
# that B A = [B_q A_q; 0; B_v A_v].

# %%
def my_block_B(B_q, B_v):
    raise NotImplementedError  # your code here


check_block_B(my_block_B)

# %% [markdown]
# ## Solutions
#
# Not in this file: try first. `show_hint("08.1")` gives a hint (`show_hint("08.1", 2)` the
# formula), and `show_solution("08.1")` prints a solution.

# %% [markdown]
# **Next:** [`09_after_the_paper.py`](09_after_the_paper.py) — what came after the paper: DoRA,
# PiSSA, rsLoRA, LoRA+ and 4-bit NF4 on the same base. ([The paper map](../docs/paper_map.md)
# maps every equation and table of the paper to the code; with `hf.load_gpt2` you can run any of
# it on a real GPT-2.)
