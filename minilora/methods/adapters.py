"""The bottleneck adapter of Adapter^H (Houlsby et al. 2019) and Adapter^L (Lin et al. 2020).

``bottleneck_adapter`` is one fused ``Function`` (down-projection, ReLU, up-projection,
residual) with its hand-written backward beside its forward; ``Adapter`` holds its weights
and ``AdaptedLinear`` puts one after a Linear, keeping the Linear's parameter names.
"""

from __future__ import annotations

import numpy as np

from .. import functional as F
from .. import nn
from ..function import Function

__all__ = ["AdaptedLinear", "Adapter", "BottleneckAdapter", "bottleneck_adapter"]


def _as_rows(a):
    """View (..., n) as (N, n): one matrix product instead of a batch of small ones."""
    return a.reshape(-1, a.shape[-1])


class BottleneckAdapter(Function):
    """y = res + up(relu(down(x))) = res + relu(x W_dᵀ + b_d) W_uᵀ + b_u   (res = x unless given).

    The adapter of Houlsby et al. (2019) and Lin et al. (2020): a bottleneck of width r with
    a skip connection. With z = x W_dᵀ + b_d (N × r), a = relu(z) and g = ∂L/∂y (N × d):

        ∂L/∂W_u = gᵀ a,   ∂L/∂b_u = Σ g,   ∂L/∂a = g W_u,   ∂L/∂z = ∂L/∂a ⊙ [z > 0]
        ∂L/∂W_d = (∂L/∂z)ᵀ x,   ∂L/∂b_d = Σ ∂L/∂z,   ∂L/∂x = (∂L/∂z) W_d  (+ g when res = x)
        ∂L/∂res = g.
    """

    def forward(self, x, down_weight, down_bias, up_weight, up_bias, residual=None):
        r, k = down_weight.shape
        if x.shape[-1] != k or up_weight.shape != (k if residual is None else residual.shape[-1], r):
            raise ValueError(
                f"bottleneck_adapter: input {tuple(x.shape)}, down {tuple(down_weight.shape)} (r, d) and up "
                f"{tuple(up_weight.shape)} (d, r) do not fit together"
            )
        x2 = _as_rows(x)
        z = x2 @ down_weight.T  # (N, r): the bottleneck
        z += down_bias
        a = z * (z > 0)  # relu
        y = a @ up_weight.T  # (N, d)
        y += up_bias
        y = y.reshape(*x.shape[:-1], up_weight.shape[0])
        y += x if residual is None else residual
        self.save_for_backward(x2, z, a, down_weight, up_weight)
        self.in_shape, self.own_residual = x.shape, residual is None
        return y

    def backward(self, grad):
        x2, z, a, down_weight, up_weight = self.saved
        need_x, need_dw, need_db, need_uw, need_ub, need_res = self.needs_input_grad
        g = _as_rows(grad)  # (N, d)
        d_up_w = g.T @ a if need_uw else None  # (d, r)
        d_up_b = g.sum(axis=0) if need_ub else None
        dx = d_down_w = d_down_b = None
        if need_x or need_dw or need_db:
            dz = g @ up_weight  # (N, r)
            dz *= z > 0
            if need_dw:
                d_down_w = dz.T @ x2  # (r, k)
            if need_db:
                d_down_b = dz.sum(axis=0)
            if need_x:
                dx = (dz @ down_weight).reshape(self.in_shape)
                if self.own_residual:
                    dx += grad
        d_res = grad if need_res else None
        return dx, d_down_w, d_down_b, d_up_w, d_up_b, d_res


def bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, residual=None):
    """res + relu(x W_dᵀ + b_d) W_uᵀ + b_u, with res = x when ``residual`` is None (one fused op)."""
    return BottleneckAdapter.apply(x, down_weight, down_bias, up_weight, up_bias, residual)


class Adapter(nn.Module):
    """A bottleneck adapter d → r → d with a skip connection; optionally behind its own LayerNorm.

    Houlsby (``layer_norm=False``): h + up(relu(down(h))).
    Lin et al. (``layer_norm=True``): h + up(relu(down(LN(h)))).
    ``up`` starts at 0 (weight and bias), so the adapter starts as the identity.
    """

    def __init__(self, d: int, r: int, layer_norm: bool = False, eps: float = 1e-5, dtype=np.float32):
        super().__init__()
        if not 1 <= r:
            raise ValueError(f"Adapter: the bottleneck width r must be >= 1, got {r}")
        self.d, self.r = d, r
        self.ln = nn.LayerNorm(d, eps=eps, dtype=dtype) if layer_norm else None
        self.down = nn.Linear(d, r, dtype=dtype)  # (r, d): PyTorch's default init
        self.up = nn.Linear(r, d, dtype=dtype)  # (d, r): zeros, below
        self.up.weight.data[...] = 0.0
        self.up.bias.data[...] = 0.0

    def forward(self, h):
        if self.ln is None:
            return bottleneck_adapter(h, self.down.weight, self.down.bias, self.up.weight, self.up.bias)
        return bottleneck_adapter(self.ln(h), self.down.weight, self.down.bias, self.up.weight, self.up.bias,
                                  residual=h)

    def extra_repr(self) -> str:
        return f"d={self.d}, r={self.r}, layer_norm={self.ln is not None}"


class AdaptedLinear(nn.Module):
    """A Linear followed by an adapter: adapter(x Wᵀ + b).

    It owns the Linear's own ``weight`` and ``bias`` Parameters, so their names
    (``blocks.0.attn.o.weight``) do not change and a base checkpoint still loads. Placed on
    ``attn.o`` and ``mlp.proj`` the adapter acts on a sub-layer's output before the residual
    addition, where Houlsby et al. put it.
    """

    def __init__(self, linear: nn.Linear, adapter: Adapter):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.adapter = adapter

    def forward(self, x):
        return self.adapter(F.linear(x, self.weight, self.bias))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
