"""Exercises of tutorial 08 ("from minilora to PEFT"): Hugging Face's c_attn packing and the block-structured B.

    from minilora.hf.exercises import check_pack_c_attn, check_block_B
    check_pack_c_attn(my_pack_c_attn)     # q, k, v weights (out, in) -> Hugging Face's c_attn (in, 3·out)
    check_block_B(my_block_B)             # B_q, B_v -> the block-structured c_attn B of rank 2r

    id    tutorial     check
    08.1  08_to_peft   check_pack_c_attn
    08.2               check_block_B

They are registered with the harness of ``minilora.exercises`` when this module is imported, so
``show_hint("08.1")`` and ``show_solution("08.1")`` work as for the other tutorials.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from safetensors.numpy import load_file

from .. import lora
from ..exercises.harness import Wrong, as_array, call, compare, exercise, register, rng
from ..models.gpt import GPT, GPTConfig
from .checkpoint import to_hf_state
from .peft import PREFIX, save_peft_adapter

__all__ = ["check_block_B", "check_pack_c_attn"]

register(
    "08.1", "pack q, k, v into c_attn", "check_pack_c_attn",
    hints=("Conv1D stores its weight as (in, out) and computes x W; minilora's Linear stores (out, in) and computes "
           "x Wᵀ. c_attn puts q, k and v side by side along its output axis.",
           "c_attn = np.concatenate([W_q.T, W_k.T, W_v.T], axis=1): columns 0:d are q, d:2d are k, 2d:3d are v."),
    solution='''
    def solution_pack_c_attn(W_q, W_k, W_v):
        return np.concatenate([W_q.T, W_k.T, W_v.T], axis=1)   # Conv1D (in, out): transpose, then side by side
    ''')

register(
    "08.2", "the block-structured B", "check_block_B",
    hints=("B has one row per output of c_attn (3d: the q, k and v outputs) and one column per row of the stacked "
           "A = [A_q; A_v] (2r). Which outputs may read which rows of A?",
           "B = [B_q 0; 0 0; 0 B_v]: rows 0:d take B_q in columns 0:r, rows 2d:3d take B_v in columns r:2r, "
           "everything else (the k rows too) is 0."),
    solution='''
    def solution_block_B(B_q, B_v):
        d, r = B_q.shape
        B = np.zeros((3 * d, 2 * r))
        B[:d, :r] = B_q            # the q outputs read A_q
        B[2 * d:, r:] = B_v        # the v outputs read A_v; the k rows stay 0
        return B
    ''')


def _tiny_gpt(seed: int) -> GPT:
    model = GPT(GPTConfig(vocab_size=11, block_size=4, n_layer=1, n_head=2, d_model=6))
    r = rng(seed)
    for p in model.parameters():
        p.data[...] = r.standard_normal(p.shape).astype(p.dtype)
    return model


@exercise("08.1")
def check_pack_c_attn(fn) -> str:
    """fn(W_q, W_k, W_v) -> c_attn weight: three (d, d) Linear weights (out, in) -> one (d, 3d) Conv1D weight."""
    model = _tiny_gpt(8)
    attn = model.blocks[0].attn
    weights = {name: np.asarray(layer.weight.data, dtype=np.float64)
               for name, layer in (("W_q", attn.q), ("W_k", attn.k), ("W_v", attn.v))}
    got = as_array(call(fn, {k: w.copy() for k, w in weights.items()}), "c_attn weight", shape=(6, 18))
    expected = to_hf_state(model)["transformer.h.0.attn.c_attn.weight"].astype(np.float64)
    untransposed = np.concatenate(list(weights.values()), axis=1)
    if np.allclose(got, untransposed):
        raise Wrong("c_attn weight: you put W_q, W_k, W_v side by side without transposing them; Conv1D "
                    "stores (in, out), so each block is W.T")
    compare(got, expected, "c_attn weight")
    return "the same (d, 3d) tensor that save_gpt2 writes"


@exercise("08.2")
def check_block_B(fn) -> str:
    """fn(B_q, B_v) -> (3d, 2r): c_attn's LoRA B for LoRA on q and v of rank r each (A = [A_q; A_v])."""
    model = _tiny_gpt(9)
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4.0, target_modules=("q", "v")))
    layers = dict(lora.lora_layers(model))
    r = rng(10)
    for layer in layers.values():
        layer.lora_B["default"].data[...] = r.standard_normal(layer.lora_B["default"].shape)
    b_q = np.asarray(layers["blocks.0.attn.q"].lora_B["default"].data, dtype=np.float64)
    b_v = np.asarray(layers["blocks.0.attn.v"].lora_B["default"].data, dtype=np.float64)
    got = as_array(call(fn, {"B_q": b_q.copy(), "B_v": b_v.copy()}), "B", shape=(18, 4))
    with tempfile.TemporaryDirectory() as folder:
        save_peft_adapter(folder, model)
        expected = load_file(os.path.join(folder, "adapter_model.safetensors"))[
            f"{PREFIX}transformer.h.0.attn.c_attn.lora_B.weight"].astype(np.float64)
    if np.any(got[6:12]):
        raise Wrong("B: rows d:2d (the k outputs) must be zero — k is not adapted, so no column of A may reach them")
    if np.allclose(got[:6, 2:], b_v) or np.allclose(got[12:, :2], b_q):
        raise Wrong("B: the q rows must read A_q (columns 0:r) and the v rows A_v (columns r:2r); yours are swapped")
    compare(got, expected, "B")
    return "the B that save_peft_adapter writes: [B_q 0; 0 0; 0 B_v]"
