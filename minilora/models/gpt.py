"""A tiny GPT-2, in one readable file.

GPT-2 exactly, at a small size: token + learned position embeddings, pre-LayerNorm
blocks (eps 1e-5) of causal multi-head self-attention (separate q, k, v, o
projections, scores scaled by 1/√head_dim) and a GELU-tanh MLP (fc: d → 4d,
proj: 4d → d), biases on every Linear, a final LayerNorm, and an LM head tied to
the token embedding. Parameter names follow GPT-2 (``blocks.0.attn.q.weight``),
so checkpoints and the PyTorch oracle line up. This file knows nothing of LoRA:
``minilora.lora.apply_lora`` swaps the Linears it adapts for ``LoRALinear`` from outside, and
``lora.mixed_batch`` routes rows to adapters inside those layers. Generation is the free
function ``minilora.generate.generate(model, prompts, ...)``.

Shapes: B batch, T time (tokens), C = d_model channels, H heads, D = C / H, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .. import backend as bk
from .. import functional as F
from .. import nn
from ..tensor import Tensor, is_grad_enabled

__all__ = ["GPTConfig", "GPT", "KVCache"]


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 96
    block_size: int = 64  # the longest sequence (positions 0..block_size-1)
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0  # on embeddings and on each residual branch
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"GPTConfig: d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class KVCache:
    """Keys and values of the positions seen so far, per layer: generation without recomputation.

    Each layer stores arrays of shape (B, H, T_past, D); a forward pass with a cache feeds
    only the new tokens, attends to past + new keys, and appends the new ones.
    """

    def __init__(self, n_layer: int):
        self.keys = [None] * n_layer
        self.values = [None] * n_layer
        self.length = 0  # positions stored (the same in every layer)

    def update(self, layer: int, k, v):
        """Append this step's (B, H, T_new, D) arrays; return all keys and values so far."""
        if self.keys[layer] is not None:
            xp = bk.get_array_module(k)
            k = xp.concatenate([self.keys[layer], k], axis=2)
            v = xp.concatenate([self.values[layer], v], axis=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def reorder(self, rows) -> None:
        """Keep/duplicate batch rows (beam search): every layer's arrays are indexed by ``rows``."""
        for i, k in enumerate(self.keys):
            if k is not None:
                self.keys[i], self.values[i] = k[rows], self.values[i][rows]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int, init: bool = True):
        super().__init__()
        d = cfg.d_model
        self.n_head, self.layer = cfg.n_head, layer
        self.q = nn.Linear(d, d, init=init)
        self.k = nn.Linear(d, d, init=init)
        self.v = nn.Linear(d, d, init=init)
        self.o = nn.Linear(d, d, init=init)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def _heads(self, x, Bsz, T):
        # (B, T, C) -> (B, H, T, D)
        return x.reshape(Bsz, T, self.n_head, -1).transpose(0, 2, 1, 3)

    def forward(self, x, cache: KVCache | None = None):
        Bsz, T, C = x.shape
        q = self._heads(self.q(x), Bsz, T)  # (B, H, T, D)
        k = self._heads(self.k(x), Bsz, T)  # (B, H, T, D)
        v = self._heads(self.v(x), Bsz, T)  # (B, H, T, D)
        if cache is not None:  # generation: attend to the cached past as well (no graph is built)
            k_all, v_all = cache.update(self.layer, k.data, v.data)
            k, v = Tensor._from_op(k_all, False), Tensor._from_op(v_all, False)
        y = F.scaled_dot_product_attention(q, k, v, causal=True)  # (B, H, T, D)
        y = y.transpose(0, 2, 1, 3).reshape(Bsz, T, C)  # (B, T, C): heads side by side
        return self.resid_drop(self.o(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, init: bool = True):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, init=init)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, init=init)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = F.gelu(self.fc(x))  # (B, T, 4C)
        return self.drop(self.proj(h))  # (B, T, C)


class Block(nn.Module):
    """x + attn(ln1(x)), then x + mlp(ln2(x)): the pre-LayerNorm residual block of GPT-2."""

    def __init__(self, cfg: GPTConfig, layer: int, init: bool = True):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg, layer, init)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg, init)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln1(x), cache)  # (B, T, C)
        return x + self.mlp(self.ln2(x))  # (B, T, C)


class GPT(nn.Module):
    """The language model: ``model(idx)`` -> logits (B, T, V); ``model.loss(idx, targets, mask)``.

    ``GPT(cfg)`` starts from GPT-2's random init. ``GPT(cfg, init_weights=False)`` allocates
    zeros (LayerNorm gains 1) and draws no random numbers, for a model whose weights are loaded
    right after (``models.load_model``, ``hf.load_gpt2``): at GPT-2 small the init costs far more
    than reading the file.
    """

    def __init__(self, cfg: GPTConfig, init_weights: bool = True):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model, init=init_weights)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model, init=init_weights)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i, init_weights) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        if init_weights:
            self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's init: N(0, 0.02) weights, zero biases, residual projections scaled by 1/√(2L)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                p.data[...] = 0.0
            elif name.endswith("ln1.weight") or name.endswith("ln2.weight") or name == "ln_f.weight":
                p.data[...] = 1.0
            else:
                std = residual_std if name.endswith(("attn.o.weight", "mlp.proj.weight")) else 0.02
                p.data[...] = bk.random_normal(p.shape, p.dtype, std=std)

    def forward(self, idx, cache: KVCache | None = None) -> Tensor:
        """Token ids (B, T) -> logits (B, T, V).

        cache: a KVCache for generation; ``idx`` then holds only the new tokens.
        """
        idx = idx.data if isinstance(idx, Tensor) else idx
        idx = bk.asarray(idx, backend=self.wte.weight.backend)
        if idx.ndim != 2:
            raise ValueError(f"GPT expects token ids of shape (batch, time), got {tuple(idx.shape)}")
        if not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"GPT expects integer token ids, got dtype {idx.dtype}")
        Bsz, T = idx.shape
        if Bsz == 0 or T == 0:
            raise ValueError(f"GPT needs at least one row and one token, got token ids of shape {tuple(idx.shape)} "
                             "(an empty batch or empty prompts?)")
        return self.forward_embeddings(self.wte(idx), cache)  # (B, T, C) token vectors in

    def forward_embeddings(self, x, cache: KVCache | None = None) -> Tensor:
        """Input vectors (B, T, C), before positions are added -> logits (B, T, V).

        What ``forward`` does after the token lookup; PreEmbed (``minilora.methods``) calls it
        with its trained vectors inserted among the token embeddings.
        """
        T = x.shape[1]  # (B, T, C)
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(
                f"sequence of {past + T} tokens is longer than block_size={self.config.block_size}; "
                "shorten the input or build the model with a larger GPTConfig.block_size"
            )
        if cache is not None and is_grad_enabled():
            raise RuntimeError("a KVCache is for generation: run it under ml.no_grad()")
        xp = bk.get_array_module(x.data)
        positions = xp.arange(past, past + T)
        x = x + self.wpe(positions)  # (B, T, C) + (T, C)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, cache)  # (B, T, C)
        if cache is not None:
            cache.length += T
        x = self.ln_f(x)
        return F.linear(x, self.wte.weight)  # (B, T, V): the head is tied to the token embedding

    def loss(self, idx, targets, mask=None) -> Tensor:
        """Mean next-token NLL over the positions where mask == 1 (all positions without a mask).

        With mask = 1 on the y tokens only this is the objective of eq. 2 (LoRA) or eq. 1
        (full fine-tuning): Σ_t log P(y_t | x, y_<t), the prompt x itself is not scored.
        """
        logits = self(idx)
        return F.cross_entropy(logits, targets, mask=mask)
