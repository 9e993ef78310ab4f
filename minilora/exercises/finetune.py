"""Exercises of tutorial 04 (fine-tuning): AdamW's state memory, and |Θ| of a GPT before training."""

from __future__ import annotations

import numpy as np

from .. import backend as bk
from .. import lora, optim
from ..models import GPT, GPTConfig
from .harness import Wrong, as_number, call, exercise, known_mistake, num, register, side

__all__ = ["check_optimizer_state_bytes", "check_trainable_params"]

register(
    "04.1", "optimizer-state memory", "check_optimizer_state_bytes",
    paper="Sec. 4.2: optimizer state only for Θ (VRAM 1.2 TB → 350 GB on GPT-3)",
    hints=("how many running averages does Adam keep per trained value (look at its update rule), and of which "
           "dtype? A frozen W₀ gets none.",
           "AdamW keeps two running averages per trained value (m, the first moment, and v, the second), each of "
           "the parameter's dtype: 2 · n_trainable · bytes_per_value."),
    solution='''
    def solution_state_bytes(n_trainable, bytes_per_value):
        return 2 * n_trainable * bytes_per_value   # m and v, one value each per trained parameter

    # GPT-3 full fine-tuning, fp16: 2 × 175e9 × 2 bytes = 700 GB of AdamW state alone; with the fp16
    # weights (350 GB) and their gradients that is the paper's 1.2 TB of VRAM. With LoRA (r = 4 on
    # Wq, Wv: 18M values) the state is ~75 MB, and the 350 GB left is about the frozen weights.
    ''')

register(
    "04.2", "counting a model's LoRA parameters", "check_trainable_params",
    paper="Sec. 4.2 and Table 5: |Θ| for the adapted matrices",
    hints=("each adapted matrix of shape d_out × d_in adds B (d_out × r) and A (r × d_in), in every one of the "
           "n_layer blocks. Not all targets are d_model × d_model.",
           "|Θ| = n_layer · Σ_targets r·(d_in + d_out), with q, k, v, o: d_model → d_model, fc: d_model → "
           "4·d_model, proj: 4·d_model → d_model."),
    solution='''
    def solution_trainable(config, r, targets):
        d = config.d_model
        shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "fc": (4 * d, d), "proj": (d, 4 * d)}
        return config.n_layer * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)   # B: out × r, A: r × in
    ''')


def tiny_gpt(dtype="float32", seed=0):
    bk.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, d_model=16))
    return model.to(dtype=dtype)


@exercise("04.1")
def check_optimizer_state_bytes(fn) -> str:
    """fn(n_trainable, bytes_per_value) -> bytes of AdamW's state for n_trainable parameters.

    Compared with ``optim.AdamW(...).state_bytes()`` for full fine-tuning and for LoRA, in
    float32 and float64.
    """
    for dtype in ("float32", "float64"):
        for method in ("full", "lora"):
            model = tiny_gpt(dtype)
            if method == "lora":
                lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v")))
                lora.mark_only_lora_as_trainable(model)
            n = model.num_parameters(trainable_only=True)
            itemsize = np.dtype(dtype).itemsize
            expected = optim.AdamW(model.parameters(), lr=1e-3).state_bytes()
            got = as_number(call(fn, {"n_trainable": n, "bytes_per_value": itemsize}), "the state's bytes")
            if got != expected:
                mistakes = [(f * expected, f"Yours is {num(f)}× AdamW's: how many arrays of state per value?")
                            for f in (0.5, 1.5, 2.0)]
                if dtype == "float64":  # first: in float64 this one is also the 0.5× case
                    mistakes.insert(0, (2 * n * 4, "Right for float32 but not here: use bytes_per_value, not 4."))
                why = known_mistake(got, mistakes)
                raise Wrong(f"{method} fine-tuning in {dtype}: {num(n)} trainable values of {itemsize} bytes; you give "
                            f"{num(got)} bytes, {side(got, expected)} than AdamW holds.{why}")
    return "matches AdamW.state_bytes() for full fine-tuning and LoRA, float32 and float64"


@exercise("04.2")
def check_trainable_params(fn) -> str:
    """fn(config, r, targets) -> |Θ| of LoRA with rank r on ``targets`` of a GPT with GPTConfig ``config``.

    targets: names among "q", "k", "v", "o" (d → d) and "fc" (d → 4d), "proj" (4d → d).
    Compared with ``apply_lora`` + ``mark_only_lora_as_trainable`` on a real model.
    """
    cases = [(4, ("q", "v")), (2, ("q", "k", "v", "o")), (3, ("fc",)), (1, ("q", "fc", "proj"))]
    for cfg in (GPTConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, d_model=16),
                GPTConfig(vocab_size=20, block_size=8, n_layer=3, n_head=2, d_model=24)):
        for r, targets in cases:
            model = GPT(cfg)
            lora.apply_lora(model, lora.LoRAConfig(r=r, alpha=2 * r, target_modules=targets))
            lora.mark_only_lora_as_trainable(model)
            expected = model.num_parameters(trainable_only=True)
            got = call(fn, {"config": cfg, "r": r, "targets": tuple(targets)})
            if got != expected:
                mlp = [t for t in targets if t in ("fc", "proj")]
                why = (f" The attention-only sets were right, so look at {', '.join(mlp)}: fc is d_model → 4·d_model "
                       "and proj is 4·d_model → d_model.") if mlp else ""
                raise Wrong(f"n_layer={cfg.n_layer}, d_model={cfg.d_model}, r={r}, targets={targets}: you give "
                            f"{num(got)}, {side(got, expected)} than the model's trainable parameters.{why}")
    return "matches apply_lora on two model sizes and four target sets"
