"""A reference PyTorch implementation of minilora's GPT (the oracle's model).

Written independently of minilora — plain ``torch.nn`` modules, attention spelled out
with ``softmax(q kᵀ / √d + mask) v`` — with the SAME parameter names, so a minilora
state dict loads into it directly:

    wte.weight, wpe.weight, blocks.{i}.ln1.{weight,bias}, blocks.{i}.attn.{q,k,v,o}.{weight,bias},
    blocks.{i}.ln2.{weight,bias}, blocks.{i}.mlp.{fc,proj}.{weight,bias}, ln_f.{weight,bias}

LoRA plugs in per Linear: ``lora={"blocks.0.attn.q": (A, B, scaling), ...}`` replaces that
Linear by ``W0 x + b + scaling · B A x`` with A (r, in) and B (out, r) as trainable
parameters named ``<module>.lora_A`` and ``<module>.lora_B``.

Used by tests/oracle and by benchmarks; the minilora package never imports it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = ["TorchGPT", "TorchLoRALinear", "build_torch_gpt", "torch_loss"]


def _cfg(cfg, name, default=None):
    """A field of a GPTConfig or of a dict holding its fields."""
    value = cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)
    if value is None:
        raise ValueError(f"torch_gpt: the config has no {name!r}")
    return value


def _host(a) -> np.ndarray:
    """A NumPy array from a NumPy array, a device array (CuPy or strict: ``.get()``) or a minilora Tensor."""
    if type(a).__name__ in ("Tensor", "Parameter") and type(a).__module__.startswith("minilora"):
        a = a.data
    return a.get() if type(a).__module__.startswith(("cupy", "minilora")) else np.asarray(a)


class TorchLoRALinear(nn.Module):
    """h = W0 x + b + scaling · B A x (Hu et al. 2021, eq. 3), no dropout."""

    def __init__(self, base: nn.Linear, lora_A, lora_B, scaling: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_A = nn.Parameter(torch.as_tensor(_host(lora_A), dtype=dtype, device=device).clone())
        self.lora_B = nn.Parameter(torch.as_tensor(_host(lora_B), dtype=dtype, device=device).clone())
        self.scaling = float(scaling)

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias) + self.scaling * (x @ self.lora_A.T @ self.lora_B.T)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x):
        Bsz, T, C = x.shape

        def heads(t):  # (B, T, C) -> (B, H, T, D)
            return t.view(Bsz, T, self.n_head, C // self.n_head).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(C // self.n_head)  # (B, H, T, T)
        future = torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=1)
        attn = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(Bsz, T, C)  # (B, T, C)
        return self.o(y)


class MLP(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x):
        return self.proj(nn.functional.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, eps: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, eps=eps)
        self.attn = Attention(d_model, n_head)
        self.ln2 = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLP(d_model)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TorchGPT(nn.Module):
    """GPT-2 (pre-LN, learned positions, GELU-tanh, biases, head tied to wte), no dropout."""

    def __init__(self, cfg):
        super().__init__()
        V, T, d = _cfg(cfg, "vocab_size"), _cfg(cfg, "block_size"), _cfg(cfg, "d_model")
        eps = _cfg(cfg, "layer_norm_eps", 1e-5)
        self.block_size = T
        self.wte = nn.Embedding(V, d)
        self.wpe = nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block(d, _cfg(cfg, "n_head"), eps) for _ in range(_cfg(cfg, "n_layer")))
        self.ln_f = nn.LayerNorm(d, eps=eps)

    def forward(self, idx):
        idx = torch.as_tensor(_host(idx), dtype=torch.long, device=self.wte.weight.device)
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T  # (B, T, V)

    def loss(self, idx, targets, mask=None):
        return torch_loss(self(idx), targets, mask)

    def plug_lora(self, lora: dict) -> None:
        """Replace the named Linears (e.g. ``blocks.0.attn.q``) by ``TorchLoRALinear``."""
        for name, (lora_A, lora_B, scaling) in lora.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.get_submodule(parent_name)
            base = getattr(parent, child)
            if not isinstance(base, nn.Linear):
                raise TypeError(f"plug_lora: {name} is a {type(base).__name__}, not an nn.Linear")
            setattr(parent, child, TorchLoRALinear(base, lora_A, lora_B, scaling))


def torch_loss(logits, targets, mask=None):
    """Mean token NLL over positions where mask == 1 (all positions without a mask)."""
    targets = torch.as_tensor(_host(targets), dtype=torch.long, device=logits.device)
    nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    if mask is None:
        return nll.mean()
    weights = torch.as_tensor(_host(mask), dtype=logits.dtype, device=logits.device).reshape(-1)
    return (nll * weights).sum() / weights.sum()


def build_torch_gpt(cfg, state_dict, lora=None, dtype=torch.float64, device="cpu") -> TorchGPT:
    """A TorchGPT holding a copy of ``state_dict`` (minilora names -> arrays), optionally with LoRA.

    cfg: a minilora GPTConfig (or a dict with its fields). Every name must match exactly.
    lora: {module_name: (A, B, scaling)} to add ``scaling · B A x`` to those Linears.
    """
    model = TorchGPT(cfg).to(dtype=dtype, device=device)
    own = dict(model.named_parameters())
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(f"build_torch_gpt: state dict names differ: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, p in own.items():
            value = torch.as_tensor(_host(state_dict[name]), dtype=dtype, device=device)
            if value.shape != p.shape:
                raise ValueError(f"build_torch_gpt: {name} has shape {tuple(value.shape)}, expected {tuple(p.shape)}")
            p.copy_(value)
    if lora:
        model.plug_lora(lora)
    return model
