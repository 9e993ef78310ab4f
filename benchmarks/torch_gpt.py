"""minilora's GPT written independently in PyTorch: the oracle of tests/oracle and the twin the benchmark times.

The model a PyTorch user would write in eager mode, plain ``torch.nn`` modules, with the SAME
parameter names as ``minilora.models.GPT``, so a minilora state dict loads into it directly:

    wte.weight, wpe.weight, blocks.{i}.ln1.{weight,bias}, blocks.{i}.attn.{q,k,v,o}.{weight,bias},
    blocks.{i}.ln2.{weight,bias}, blocks.{i}.mlp.{fc,proj}.{weight,bias}, ln_f.{weight,bias}

GPT-2: token + learned position embeddings, pre-LayerNorm blocks (eps 1e-5), causal multi-head
attention scaled by 1/√head_dim, GELU-tanh MLP, biases on every Linear, final LayerNorm, LM head
tied to ``wte``. Attention: ``attention="math"`` (default) spells out softmax(q kᵀ / √d + M) v
with an additive causal mask M — the same algorithm, and the same FLOPs, as minilora;
``attention="sdpa"`` uses ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``
(a fused kernel: faster, but no longer the same computation).

LoRA (Hu et al. 2021, eq. 3: h = W0 x + b + s·B A x) plugs in per Linear: ``build_torch_gpt(...,
lora={"blocks.0.attn.q": (A, B, scaling)})`` replaces that Linear by ``TorchLoRALinear``, A (r, in)
and B (out, r) trainable parameters ``<module>.lora_A.0`` and ``<module>.lora_B.0``. A list of
such triples gives a module several adapters: one is active at a time (``set_active_adapter``),
or each batch row gets its own (``set_row_adapters``: the gathered BGMV form of Punica / S-LoRA,
delta = s · bmm(bmm(x, A[ids]ᵀ), B[ids]ᵀ)). ``merge=True`` writes W0 + s·B A (computed here in
float64: an independent check of ``lora.merge``) into plain Linears instead.

Nothing here imports minilora: arrays come in as NumPy (CuPy arrays and minilora Tensors are
converted). Used by tests/oracle and by the benchmark harness (benchmarks/bench.py, only under
``--compare-torch``); the minilora package never imports torch.
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
    "build_torch_gpt",
    "lora_modules",
    "optimizer_state_bytes",
    "set_active_adapter",
    "set_row_adapters",
    "torch_loss",
]


def _cfg(cfg, name, default=None):
    """A field of a GPTConfig-like object or of a dict holding its fields."""
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
    """h = x W0ᵀ + b + s · (x Aᵀ) Bᵀ, with one or more adapters (A_i, B_i, s_i).

    One adapter is active at a time (``active``), unless ``row_adapter`` (a LongTensor with one
    adapter index per batch row) is set: then each row uses its own adapter (gathered BGMV form,
    inference only). No dropout.
    """

    def __init__(self, base: nn.Linear, adapters: list):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        dtype, device = base.weight.dtype, base.weight.device
        as_param = lambda a: nn.Parameter(torch.as_tensor(_host(a), dtype=dtype, device=device).clone())
        self.lora_A = nn.ParameterList([as_param(A) for A, _, _ in adapters])
        self.lora_B = nn.ParameterList([as_param(B) for _, B, _ in adapters])
        self.scalings = [float(s) for _, _, s in adapters]
        self.active = 0
        self.row_adapter = None  # (Bsz,) adapter index per row: a mixed-task batch
        self._stacked = None  # (A (n, r, in), B (n, out, r) pre-scaled) for the gathered forward

    def forward(self, x):
        h = F.linear(x, self.weight, self.bias)
        if self.row_adapter is None:
            A, B = self.lora_A[self.active], self.lora_B[self.active]
            return h + self.scalings[self.active] * ((x @ A.T) @ B.T)
        if self._stacked is None:
            scaled_B = [s * B for s, B in zip(self.scalings, self.lora_B)]
            self._stacked = (torch.stack(list(self.lora_A)).detach(), torch.stack(scaled_B).detach())
        A_all, B_all = self._stacked
        A_rows, B_rows = A_all[self.row_adapter], B_all[self.row_adapter]  # (Bsz, r, in), (Bsz, out, r)
        u = torch.bmm(x, A_rows.transpose(1, 2))  # (Bsz, T, r): each row through its own A
        return h + torch.bmm(u, B_rows.transpose(1, 2))  # (Bsz, T, out)


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
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(C // self.n_head) + self.mask[:T, :T]  # (B, H, T, T)
            y = torch.softmax(scores, dim=-1) @ v  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(Bsz, T, C))  # (B, T, C)


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
        if not torch.is_tensor(idx):
            idx = torch.as_tensor(_host(idx), dtype=torch.long, device=self.wte.weight.device)
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(self.positions[:T])  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # (B, T, V): tied head

    def loss(self, idx, targets, mask=None):
        return torch_loss(self(idx), targets, mask)


def torch_loss(logits, targets, mask=None):
    """Mean token NLL over positions where mask == 1 (all positions without a mask)."""
    if not torch.is_tensor(targets):
        targets = torch.as_tensor(_host(targets), dtype=torch.long, device=logits.device)
    if mask is None:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    weights = torch.as_tensor(_host(mask), dtype=logits.dtype, device=logits.device).reshape(-1)
    return (nll * weights).sum() / weights.sum()


def build_torch_gpt(cfg, state_dict, lora=None, *, merge: bool = False, dtype=torch.float64, device="cpu",
                    attention: str = "math") -> TorchGPT:
    """A TorchGPT holding a copy of ``state_dict`` (minilora's base names -> arrays), optionally with LoRA.

    cfg: a minilora GPTConfig (or a dict with its fields). Every name must match exactly.
    lora: {module path: (A, B, scaling)}, or a list of such triples per path for several adapters.
      Without ``merge`` those Linears become ``TorchLoRALinear`` and only A and B train (eq. 2);
      with ``merge`` they hold W0 + scaling·B A of their first adapter and nothing trains.
    Without ``lora`` every parameter trains (eq. 1).
    """
    model = TorchGPT(cfg, attention=attention).to(dtype=dtype)
    own = dict(model.named_parameters())
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(f"build_torch_gpt: state dict names differ: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, p in own.items():
            value = torch.as_tensor(_host(state_dict[name]), dtype=dtype)
            if value.shape != p.shape:
                raise ValueError(f"build_torch_gpt: {name} has shape {tuple(value.shape)}, expected {tuple(p.shape)}")
            p.copy_(value)
    if lora:
        model.requires_grad_(False)  # W0, embeddings, LayerNorms frozen
        for path, adapters in lora.items():
            adapters = list(adapters) if isinstance(adapters, list) else [adapters]
            parent_name, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, child)
            if not isinstance(base, nn.Linear):
                raise TypeError(f"build_torch_gpt: {path} is a {type(base).__name__}, not an nn.Linear")
            if merge:
                A, B, scaling = adapters[0]
                W0 = _host(state_dict[f"{path}.weight"]).astype(np.float64)
                delta = float(scaling) * (_host(B).astype(np.float64) @ _host(A).astype(np.float64))
                with torch.no_grad():
                    base.weight.copy_(torch.as_tensor(W0 + delta, dtype=dtype))
            else:
                setattr(parent, child, TorchLoRALinear(base, adapters))
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
