"""Exercises of tutorial 08 (from minilora to PEFT): pack q, k, v into c_attn; the block-structured B."""

from __future__ import annotations

import os
import tempfile

import numpy as np
from safetensors.numpy import load_file

from .. import lora
from ..hf.checkpoint import to_hf_state
from ..hf.peft import PREFIX, save_peft_adapter
from ..models.gpt import GPT, GPTConfig
from .harness import Wrong, as_array, call, compare, exercise, register, rng

__all__ = ["check_block_B", "check_pack_c_attn"]

register(
    "08.1", "pack q, k, v into c_attn", "check_pack_c_attn",
    paper="Sec. 4.2 on GPT-2: Wq, Wk, Wv fused in one c_attn",
    hints=("Conv1D stores its weight as (in, out), a Linear as (out, in); and c_attn computes q, k and v in one "
           "product, side by side along its output axis.",
           "np.concatenate([W_q.T, W_k.T, W_v.T], axis=1): columns 0:d are q, d:2d are k, 2d:3d are v."),
    solution='''
    def solution_pack_c_attn(W_q, W_k, W_v):
        return np.concatenate([W_q.T, W_k.T, W_v.T], axis=1)   # Conv1D (in, out): transpose, then side by side
    ''')

register(
    "08.2", "the block-structured B", "check_block_B",
    paper="Sec. 4.2 (LoRA on Wq and Wv) in GPT-2's fused c_attn",
    hints=("B has one row per output of c_attn (3d) and one column per row of the stacked A = [A_q; A_v] (2r). "
           "Which outputs read A_q, which read A_v, and which (k) read nothing?",
           "B = [[B_q, 0], [0, 0], [0, B_v]]: rows 0:d take B_q in columns 0:r, rows 2d:3d take B_v in columns "
           "r:2r, everything else is 0."),
    solution='''
    def solution_block_B(B_q, B_v):
        d, r = B_q.shape
        B = np.zeros((3 * d, 2 * r))
        B[:d, :r] = B_q            # the q outputs read A_q
        B[2 * d:, r:] = B_v        # the v outputs read A_v; the k rows stay 0
        return B
    ''')


@exercise("08.1")
def check_pack_c_attn(fn) -> str:
    """fn(W_q, W_k, W_v) -> c_attn weight: three (d, d) Linear weights (out, in) -> one (d, 3d) Conv1D weight."""
    g = rng(8)
    model = GPT(GPTConfig(vocab_size=11, block_size=4, n_layer=1, n_head=2, d_model=6))
    for p in model.parameters():
        p.data[...] = g.standard_normal(p.shape).astype(p.dtype)
    attn = model.blocks[0].attn
    weights = [np.asarray(layer.weight.data, dtype=np.float64) for layer in (attn.q, attn.k, attn.v)]
    got = as_array(call(fn, dict(zip(("W_q", "W_k", "W_v"), (w.copy() for w in weights)))), "c_attn weight", (6, 18))
    expected = to_hf_state(model)["transformer.h.0.attn.c_attn.weight"].astype(np.float64)
    for n, name in enumerate("qkv"):
        block = got[:, 6 * n:6 * (n + 1)]
        if np.allclose(block, weights[n]) and not np.allclose(weights[n], weights[n].T):
            raise Wrong(f"c_attn weight: columns {6 * n}:{6 * (n + 1)} hold W_{name} as a Linear stores it (out, in); "
                        "Conv1D wants (in, out)")
    compare(got, expected, "c_attn weight")
    return "the same (d, 3d) tensor that save_gpt2 writes"


@exercise("08.2")
def check_block_B(fn) -> str:
    """fn(B_q, B_v) -> (3d, 2r): c_attn's LoRA B for LoRA on q and v of rank r each (A = [A_q; A_v])."""
    g = rng(9)
    model = GPT(GPTConfig(vocab_size=11, block_size=4, n_layer=1, n_head=2, d_model=6))
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4.0, target_modules=("q", "v")))
    layers = dict(lora.lora_layers(model))
    for layer in layers.values():
        layer.lora_B["default"].data[...] = g.standard_normal(layer.lora_B["default"].shape)
    b_q = np.asarray(layers["blocks.0.attn.q"].lora_B["default"].data, dtype=np.float64)
    b_v = np.asarray(layers["blocks.0.attn.v"].lora_B["default"].data, dtype=np.float64)
    got = as_array(call(fn, {"B_q": b_q.copy(), "B_v": b_v.copy()}), "B", (18, 4))
    with tempfile.TemporaryDirectory() as folder:
        save_peft_adapter(folder, model)
        expected = load_file(os.path.join(folder, "adapter_model.safetensors"))[
            f"{PREFIX}transformer.h.0.attn.c_attn.lora_B.weight"].astype(np.float64)
    if np.any(got[6:12]):
        raise Wrong("B: rows d:2d (the k outputs) must be zero — k is not adapted")
    if np.allclose(got[0:6], expected[12:18]) and np.allclose(got[12:18], expected[0:6]):
        raise Wrong("B: the q rows hold B_v (q and v swapped): the first d outputs of c_attn are q's, "
                    "and they read the first r rows of A = [A_q; A_v]")
    for rows, name in ((slice(0, 6), "q"), (slice(12, 18), "v")):
        compare(got[rows], expected[rows], f"B: the rows of the {name} outputs")
    return "the B that save_peft_adapter writes: [B_q 0; 0 0; 0 B_v]"
