"""The PyTorch side of ``minilora bench --compare-torch``: minilora's GPT, written the way a
PyTorch user would write it in eager mode, so that the two can be timed against each other.

Same model as ``minilora.models.GPT`` (GPT-2: token + learned position embeddings, pre-LayerNorm
blocks with eps 1e-5, causal multi-head attention scaled by 1/√head_dim, GELU-tanh MLP, biases on
every Linear, final LayerNorm, LM head tied to ``wte``), same parameter names, float32, weights
copied from a minilora model. Nothing here imports minilora: the benchmark passes plain NumPy
arrays in, so this file also serves as an independent reference.

LoRA variants (Hu et al. 2021, eq. 3: h = W0 x + b + s·B A x):
- ``lora``     — ``TorchLoRALinear``: W0 and b frozen (``requires_grad=False``), A and B trainable
                 ``nn.Parameter``s; the low-rank path is computed as (x Aᵀ) Bᵀ.
- ``merged``   — a plain ``nn.Linear`` holding W0 + s·B A (computed here, in float64, from the
                 unmerged weights: an independent check of minilora's ``lora.merge``).
- ``mixed``    — many adapters in one module; ``set_row_adapters(ids)`` gives each batch row an
                 adapter index and the forward gathers that row's A and B (BGMV, as in Punica /
                 S-LoRA): delta = s · bmm(bmm(x, A[ids]ᵀ), B[ids]ᵀ).
- looping over adapters (the reference a mixed batch is compared with) selects one adapter with
  ``set_active_adapter(i)`` and runs a forward on that adapter's rows only.

Attention: ``attention="math"`` (default) spells out softmax(q kᵀ / √d + M) v with a precomputed
additive causal mask M — the same algorithm, and the same FLOPs, as minilora. ``attention="sdpa"``
uses ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` (a fused kernel: faster,
but no longer the same computation).

Used only by ``minilora/bench.py`` (lazily, under ``--compare-torch``); the minilora package never
imports torch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "TorchGPT",
    "TorchLoRALinear",
    "build_model",
    "lora_modules",
    "optimizer_state_bytes",
    "set_active_adapter",
    "set_row_adapters",
]


def _cfg(cfg, name, default=None):
    """A field of a GPTConfig-like object or of a dict holding its fields."""
    value = cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)
    if value is None:
        raise ValueError(f"torch_reference: the config has no {name!r}")
    return value


class TorchLoRALinear(nn.Module):
    """h = x W0ᵀ + b + s · (x Aᵀ) Bᵀ, with one or more adapters (A_i, B_i).

    One adapter is active at a time (``active``), unless ``row_adapter`` (a LongTensor with one
    adapter index per batch row) is set: then each row uses its own adapter (gathered BGMV form).
    W0 and b are frozen; each A_i (r, in) and B_i (out, r) is a trainable ``nn.Parameter``.
    """

    def __init__(self, base: nn.Linear, adapters: list, scaling: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dtype, device = base.weight.dtype, base.weight.device
        as_param = lambda a: nn.Parameter(torch.as_tensor(np.asarray(a), dtype=dtype, device=device).clone())
        self.lora_A = nn.ParameterList([as_param(A) for A, _ in adapters])
        self.lora_B = nn.ParameterList([as_param(B) for _, B in adapters])
        self.scaling = float(scaling)
        self.active = 0
        self.row_adapter = None  # (Bsz,) adapter index per row: a mixed-task batch
        self._stacked = None  # (A (n, r, in), B (n, out, r)) for the gathered forward; inference only

    def forward(self, x):
        h = F.linear(x, self.weight, self.bias)
        if self.row_adapter is None:
            A, B = self.lora_A[self.active], self.lora_B[self.active]
            return h + self.scaling * ((x @ A.T) @ B.T)
        if self._stacked is None:
            self._stacked = (torch.stack(list(self.lora_A)).detach(), torch.stack(list(self.lora_B)).detach())
        A_all, B_all = self._stacked
        A_rows, B_rows = A_all[self.row_adapter], B_all[self.row_adapter]  # (Bsz, r, in), (Bsz, out, r)
        u = torch.bmm(x, A_rows.transpose(1, 2))  # (Bsz, T, r): each row through its own A
        return h + self.scaling * torch.bmm(u, B_rows.transpose(1, 2))  # (Bsz, T, out)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int, block_size: int, attention: str):
        super().__init__()
        self.n_head, self.attention = n_head, attention
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))
        future = torch.triu(torch.ones(block_size, block_size, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", torch.zeros(block_size, block_size).masked_fill(future, float("-inf")),
                             persistent=False)

    def forward(self, x):
        Bsz, T, C = x.shape
        heads = lambda t: t.view(Bsz, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(C // self.n_head)) + self.mask[:T, :T]
            y = torch.softmax(scores, dim=-1) @ v  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(Bsz, T, C))


class MLP(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d_model, n_head, block_size, eps, attention):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, eps=eps)
        self.attn = Attention(d_model, n_head, block_size, attention)
        self.ln2 = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLP(d_model)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TorchGPT(nn.Module):
    """GPT-2 (pre-LN, learned positions, GELU-tanh, biases, head tied to wte), no dropout."""

    def __init__(self, cfg, attention: str = "math"):
        super().__init__()
        if attention not in ("math", "sdpa"):
            raise ValueError(f"attention must be 'math' or 'sdpa', got {attention!r}")
        V, T, d = _cfg(cfg, "vocab_size"), _cfg(cfg, "block_size"), _cfg(cfg, "d_model")
        eps = _cfg(cfg, "layer_norm_eps", 1e-5)
        self.wte = nn.Embedding(V, d)
        self.wpe = nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block(d, _cfg(cfg, "n_head"), T, eps, attention) for _ in range(_cfg(cfg, "n_layer")))
        self.ln_f = nn.LayerNorm(d, eps=eps)
        self.register_buffer("positions", torch.arange(T), persistent=False)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(self.positions[:T])  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # (B, T, V): tied head

    def loss(self, idx, targets):
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def build_model(cfg, state_dict: dict, lora: dict | None = None, scaling: float = 1.0, mode: str = "base",
                attention: str = "math", device: str = "cpu") -> TorchGPT:
    """A float32 TorchGPT holding a copy of minilora's weights.

    state_dict: {name: NumPy array} with minilora's (GPT-2) base names — no LoRA entries.
    lora: {module path (e.g. "blocks.0.attn.q"): [(A, B), ...]}, one (A, B) pair per adapter.
    mode: "base"    — the plain model (``lora`` ignored); every parameter trainable;
          "lora"    — TorchLoRALinear on the named modules, every other parameter frozen;
          "merged"  — plain Linears holding W0 + scaling·B A of the FIRST adapter (frozen model).
    """
    if mode not in ("base", "lora", "merged"):
        raise ValueError(f"mode must be 'base', 'lora' or 'merged', got {mode!r}")
    model = TorchGPT(cfg, attention=attention)
    own = dict(model.named_parameters())
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(f"build_model: state dict names differ: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, p in own.items():
            value = torch.as_tensor(np.asarray(state_dict[name]), dtype=torch.float32)
            if value.shape != p.shape:
                raise ValueError(f"build_model: {name} has shape {tuple(value.shape)}, expected {tuple(p.shape)}")
            p.copy_(value)
    if mode == "merged":
        with torch.no_grad():
            for path, adapters in (lora or {}).items():
                A, B = (np.asarray(a, dtype=np.float64) for a in adapters[0])
                W0 = np.asarray(state_dict[f"{path}.weight"], dtype=np.float64)
                model.get_submodule(path).weight.copy_(torch.as_tensor(W0 + scaling * (B @ A), dtype=torch.float32))
        model.requires_grad_(False)  # an inference model
    if mode == "lora":
        model.requires_grad_(False)  # everything frozen; only the adapters' A and B train
        for path, adapters in (lora or {}).items():
            parent_name, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, child)
            if not isinstance(base, nn.Linear):
                raise TypeError(f"build_model: {path} is a {type(base).__name__}, not an nn.Linear")
            setattr(parent, child, TorchLoRALinear(base, adapters, scaling))
    return model.to(device)


def lora_modules(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, TorchLoRALinear)]


def set_row_adapters(model: nn.Module, row_adapter) -> None:
    """Give batch row i the adapter ``row_adapter[i]`` (an index) in every LoRA module; None: one adapter for all rows."""
    ids = None
    if row_adapter is not None:
        device = next(model.parameters()).device
        ids = torch.as_tensor(np.asarray(row_adapter), dtype=torch.long, device=device)
    for m in lora_modules(model):
        m.row_adapter = ids
        m._stacked = None


def set_active_adapter(model: nn.Module, index: int) -> None:
    """Use adapter ``index`` for every row (the loop-over-adapters reference)."""
    for m in lora_modules(model):
        m.row_adapter, m.active = None, int(index)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (AdamW: exp_avg, exp_avg_sq, and a step counter)."""
    return int(sum(v.numel() * v.element_size() for state in optimizer.state.values()
                   for v in state.values() if torch.is_tensor(v)))
