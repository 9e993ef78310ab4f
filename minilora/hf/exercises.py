"""Check functions for the exercises of tutorial 08 ("from minilora to PEFT").

    check_pack_c_attn(my_pack_c_attn)     # q, k, v weights (out, in) -> Hugging Face's c_attn (in, 3·out)
    check_block_B(my_block_B)             # B_q, B_v -> the block-structured c_attn B of rank 2r

They work as those of ``minilora.exercises``: ✓ and True for a right answer, a reminder and
False while the function still raises NotImplementedError, ExerciseError with a hint otherwise.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from safetensors.numpy import load_file

from .. import lora
from ..exercises import ExerciseError, _array, _call, _close, _exercise, _rng
from ..models.gpt import GPT, GPTConfig
from .checkpoint import to_hf_state
from .peft import PREFIX, save_peft_adapter

__all__ = ["check_block_B", "check_pack_c_attn"]


@_exercise("pack q, k, v into c_attn")
def check_pack_c_attn(fn) -> str:
    """fn(W_q, W_k, W_v) -> c_attn weight: three (d, d) Linear weights (out, in) -> one (d, 3d) Conv1D weight."""
    rng = _rng(8)
    model = GPT(GPTConfig(vocab_size=11, block_size=4, n_layer=1, n_head=2, d_model=6))
    for p in model.parameters():
        p.data[...] = rng.standard_normal(p.shape).astype(p.dtype)
    attn = model.blocks[0].attn
    weights = [np.asarray(layer.weight.data, dtype=np.float64) for layer in (attn.q, attn.k, attn.v)]
    got = _array(_call(fn, *[w.copy() for w in weights]), "c_attn weight", shape=(6, 18),
                 hint="Hint: Conv1D stores (in, out), so each Linear weight is transposed, then the three are put "
                      "side by side along the output axis (axis=1).")
    expected = to_hf_state(model)["transformer.h.0.attn.c_attn.weight"].astype(np.float64)
    _close(got, expected, "c_attn weight", "Hint: columns 0:d are q, d:2d are k, 2d:3d are v — each W.T, not W.")
    return "the same (d, 3d) tensor that save_gpt2 writes"


@_exercise("the block-structured B")
def check_block_B(fn) -> str:
    """fn(B_q, B_v) -> (3d, 2r): c_attn's LoRA B for LoRA on q and v of rank r each (A = [A_q; A_v])."""
    rng = _rng(9)
    model = GPT(GPTConfig(vocab_size=11, block_size=4, n_layer=1, n_head=2, d_model=6))
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4.0, target_modules=("q", "v")))
    layers = dict(lora.lora_layers(model))
    for layer in layers.values():
        layer.lora_B["default"].data[...] = rng.standard_normal(layer.lora_B["default"].shape)
    b_q = np.asarray(layers["blocks.0.attn.q"].lora_B["default"].data, dtype=np.float64)
    b_v = np.asarray(layers["blocks.0.attn.v"].lora_B["default"].data, dtype=np.float64)
    got = _array(_call(fn, b_q.copy(), b_v.copy()), "B", shape=(18, 4),
                 hint="Hint: B has one row per output of c_attn (3d) and one column per row of the stacked A (2r).")
    with tempfile.TemporaryDirectory() as folder:
        save_peft_adapter(folder, model)
        expected = load_file(os.path.join(folder, "adapter_model.safetensors"))[
            f"{PREFIX}transformer.h.0.attn.c_attn.lora_B.weight"].astype(np.float64)
    if np.any(got[6:12]):
        raise ExerciseError("B: rows d:2d (the k outputs) must be zero — k is not adapted. Hint: start from "
                            "np.zeros((3 * d, 2 * r)) and fill two blocks.")
    _close(got, expected, "B", "Hint: rows 0:d take B_q in columns 0:r (they read A_q), rows 2d:3d take B_v in "
                               "columns r:2r (they read A_v); everything else is 0.")
    return "the B that save_peft_adapter writes: [B_q 0; 0 0; 0 B_v]"
