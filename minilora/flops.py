"""Matmul FLOPs of minilora's GPT, counted analytically: one forward pass, one training step (full or LoRA).

    forward_flops(cfg, batch)                      # F = L·(24·N·d² + 4·N·T·d) + 2·N·d·V
    step_flops(cfg, batch)                         # full fine-tuning: 3·F
    step_flops(cfg, batch, ("q", "v"), r=8)        # LoRA: only what the frozen W0 still needs

The benchmark (``benchmarks/``) divides these by measured step times for achieved FLOP/s and MFU.
"""

from __future__ import annotations

from .models import GPTConfig

__all__ = ["forward_flops", "step_flops"]

_LAYER_LINEARS = (("q", 1, 1), ("k", 1, 1), ("v", 1, 1), ("o", 1, 1), ("fc", 1, 4), ("proj", 4, 1))  # (name, in/d, out/d)


def forward_flops(cfg: GPTConfig, batch: int, lora_targets=(), r: int = 0, seq_len: int | None = None) -> int:
    """Matmul FLOPs of one forward pass (2·m·n·k per (m×k)@(k×n) product), with N = batch·T tokens.

        per layer:  q, k, v, o            4 · 2·N·d·d
                    fc (d→4d), proj        2 · 2·N·d·4d            (together 24·N·d²)
                    q kᵀ and P v           2 · 2·N·T·d             (all T×T scores: the causal mask
                                                                    is added, not skipped)
        LM head:    2·N·d·V
        LoRA:       2·N·r·(d_in + d_out) per adapted matrix        (x Aᵀ, then u Bᵀ; 4·N·d·r for q, v)

        F = L·(24·N·d² + 4·N·T·d) + 2·N·d·V  [+ L·|targets|·4·N·d·r]

    The embedding lookups, LayerNorm, GELU, softmax and the loss are not matmuls and are not counted.
    A mixed batch (each row through its own adapter) and the loop over adapters count the same: every
    row goes through W0 and through one adapter.
    """
    T = seq_len or cfg.block_size
    N, d, V, L = batch * T, cfg.d_model, cfg.vocab_size, cfg.n_layer
    per_layer = 24 * N * d * d + 4 * N * T * d
    lora = sum(2 * N * r * (i + o) * d for name, i, o in _LAYER_LINEARS if name in lora_targets)
    return L * (per_layer + lora) + 2 * N * d * V


def _linear_flops(name: str, i: int, o: int, input_grad: bool, N: int, d: int, r: int, targets) -> tuple[int, bool]:
    """One Linear (d_in = i·d → d_out = o·d) of a LoRA step: forward + dx (if its input needs a
    gradient) + the adapter's products; returns (flops, output needs grad)."""
    base = 2 * N * (i * d) * (o * d)
    flops = base * (2 if input_grad else 1)
    adapted = name in targets
    if adapted:
        low = 2 * N * r * d  # one of the thin products, for d_in = i·d, d_out = o·d
        xa, ub = low * i, low * o
        flops += xa + ub  # forward
        flops += ub + ub + xa  # g B (N×d_out @ d_out×r), dB = gᵀ u, dA = (gB)ᵀ x
        if input_grad:
            flops += xa  # (g B) A for dx
    return flops, input_grad or adapted


def _lora_block_flops(x_grad: bool, N: int, T: int, d: int, r: int, targets) -> tuple[int, bool]:
    """One transformer block of a LoRA step, its input needing a gradient or not (``x_grad``):
    returns (flops, the residual stream leaving the block needs grad)."""
    att = 2 * N * T * d  # one attention product (q kᵀ, P v, or one of their gradients)

    def linear(name, i, o, input_grad):
        return _linear_flops(name, i, o, input_grad, N, d, r, targets)

    fl_q, q_g = linear("q", 1, 1, x_grad)
    fl_k, k_g = linear("k", 1, 1, x_grad)
    fl_v, v_g = linear("v", 1, 1, x_grad)
    total = fl_q + fl_k + fl_v
    total += 2 * att  # forward: scores and P v
    total += att * (int(q_g or k_g) + int(v_g) + int(q_g) + int(k_g))  # dP, dv, dq, dk
    y_g = q_g or k_g or v_g
    fl_o, o_g = linear("o", 1, 1, y_g)
    x_grad = x_grad or o_g
    fl_fc, fc_g = linear("fc", 1, 4, x_grad)
    fl_proj, proj_g = linear("proj", 4, 1, fc_g)
    total += fl_o + fl_fc + fl_proj
    return total, x_grad or proj_g


def step_flops(cfg: GPTConfig, batch: int, lora_targets=None, r: int = 0, seq_len: int | None = None) -> int:
    """Matmul FLOPs of one training step: forward + backward (the AdamW update is elementwise: 0).

    Full fine-tuning (``lora_targets=None``): every product y = x W has two gradients of its own cost,
    dx = g W and dW = gᵀ x, and each attention product two input gradients (dq, dk; dP, dv):

        full = 3 · F

    LoRA (W0, embeddings and LayerNorms frozen; only A, B train) skips every dW0 and every gradient
    nobody needs. With N = batch·T and a LoRA'd matrix (d_in → d_out):

        base Linear:   forward + dx                        = 2 × its forward
                       (forward only where its input needs no gradient: in layer 0 the input of
                       q, k, v is LayerNorm(frozen embeddings))
        LM head:       forward + dx (wte is frozen)        = 2 × 2·N·d·V
        attention:     forward q kᵀ and P v, then dP, dv, dq, dk (2·N·T·d each); dk only if k needs a
                       gradient (not in layer 0 when k is not adapted), dv / dq likewise
        adapter:       forward x Aᵀ, u Bᵀ; backward g B, dA = (g B)ᵀ x, dB = gᵀ u (2·N·r·d each, for
                       d_in = d_out = d), and (g B) A for dx where the input needs a gradient

    For r=8 on q, v (the ``lora`` mode) this is

        lora = 2·L·24·N·d² − 3·2·N·d²           (layer 0: no dx for q, k, v)
             + 2·2·N·d·V
             + L·6·2·N·T·d − 2·N·T·d            (layer 0: no dk)
             + 2·(L·12·N·d·r − 2·N·d·r)         (layer 0: no low-rank dx)

    Computed here by walking the layers and tracking which activations need a gradient — what both
    autograd engines (minilora's ``needs_input_grad``, PyTorch's) actually compute. minilora's
    embedding backward (a one-hot matmul, ``F.embedding``) is an implementation detail, not counted.
    """
    T = seq_len or cfg.block_size
    N, d, V, L = batch * T, cfg.d_model, cfg.vocab_size, cfg.n_layer
    if lora_targets is None:
        return 3 * forward_flops(cfg, batch, seq_len=T)
    targets = set(lora_targets)
    unknown = targets - {name for name, _, _ in _LAYER_LINEARS}
    if unknown:
        raise ValueError(f"step_flops: unknown LoRA targets {sorted(unknown)}")
    total = 0
    x_grad = False  # does the residual stream entering this layer need a gradient? (embeddings frozen)
    for _ in range(L):
        flops, x_grad = _lora_block_flops(x_grad, N, T, d, r, targets)
        total += flops
    total += 2 * N * d * V * (2 if x_grad else 1)  # tied head: dx only (wte frozen)
    return total
