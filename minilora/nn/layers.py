"""The layers a GPT needs: Linear, Embedding, LayerNorm, Dropout (each a thin shell over functional)."""

from __future__ import annotations

import functools
import math

import numpy as np

from .. import backend as bk
from .. import functional as F
from .module import Module, Parameter

__all__ = ["Linear", "Embedding", "LayerNorm", "Dropout", "ModuleList"]

DEFAULT_DTYPE = np.float32


def _zeros(shape, dtype):
    return bk.xp().zeros(shape, dtype=dtype)


class Linear(Module):
    """y = x Wᵀ + b, W of shape (out_features, in_features) — W₀ ∈ R^{d×k} in the paper."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=DEFAULT_DTYPE, init: bool = True):
        """init=False: zeros and no random draws, for a layer whose weights are loaded right after."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)  # PyTorch's default (kaiming-uniform with a = √5)
        draw = functools.partial(bk.random_uniform, low=-bound, high=bound) if init else _zeros
        self.weight = Parameter(draw((out_features, in_features), dtype))
        self.bias = Parameter(draw((out_features,), dtype)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=DEFAULT_DTYPE, init: bool = True):
        """init=False: zeros and no random draws, for a table that is loaded right after."""
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter((bk.random_normal if init else _zeros)((num_embeddings, embedding_dim), dtype))

    def forward(self, ids):
        return F.embedding(ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    def __init__(self, dim: int, eps: float = 1e-5, dtype=DEFAULT_DTYPE):
        super().__init__()
        self.dim, self.eps = dim, eps
        xp = bk.xp()
        self.weight = Parameter(xp.ones(dim, dtype=dtype))
        self.bias = Parameter(xp.zeros(dim, dtype=dtype))

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class Dropout(Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ModuleList(Module):
    """A list of modules named 0, 1, 2, ... (``blocks.0.attn...``)."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> None:
        setattr(self, str(len(self._modules)), module)

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]
