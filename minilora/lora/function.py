"""The LoRA layer's equation and its hand-written backward (Hu et al. 2021, eq. 3 / Sec. 4.1).

    h = W₀x + b + s·B·A·drop(x),    s = α/r,    W₀ ∈ R^{d×k} frozen,  A ∈ R^{r×k},  B ∈ R^{d×r}

Rows are tokens: x is (N, k) (any leading axes are folded into N), h is (N, d). Forward keeps
the rank-r bottleneck u = drop(x)·Aᵀ (N × r) and multiplies s into it while it is thin, so the
(N × d) product is never scaled. With g = ∂L/∂h (N × d) and gB = s·g·B (N × r), the chain rule
gives

    ∂L/∂x  = g·W₀ + (gB·A) ⊙ mask       (mask: the dropout mask, 1 without dropout)
    ∂L/∂A  = gBᵀ·drop(x)                 (r × k)
    ∂L/∂B  = s·gᵀ·u                      (d × r)
    ∂L/∂W₀ = gᵀ·x,   ∂L/∂b = Σ_rows g    only when W₀ / b require grad (full fine-tuning)

For a frozen W₀ (the point of LoRA) the d × k product gᵀx is never formed: the backward costs
O(N·r·(d + k)) on top of the ∂L/∂x product, not O(N·d·k) more.

The pieces, each written once: ``base_forward`` / ``base_backward`` (W₀x + b), ``low_rank_forward``
/ ``low_rank_backward`` (one adapter's s·B·A·drop(x) on its rows), and ``delta_weight`` (ΔW = s·B·A,
what a merge adds to W₀). ``LoRALinearFn`` puts them together; ``lora_linear`` is the function
users call (``F.lora_linear``). W₀ is an array, or a weight that computes its own products
(``matmul_t`` / ``matmul``: the NF4 ``QuantizedWeight`` of ``lora.quantize_base``).

Built on the same pieces: DoRA in ``dora.py``, and the mixed-task batch (one adapter per row,
Sec. 4.2's limitation) in ``mixed_op.py``.
"""

from __future__ import annotations

import importlib

import numpy as np

from .. import backend as bk
from ..function import Function

__all__ = [
    "LoRALinearFn", "base_backward", "base_forward", "check_lora_shapes", "computes_own_products", "delta_weight", "lora_linear",
    "low_rank_backward", "low_rank_forward", "weight_matmul", "weight_matmul_t",
]


def check_lora_shapes(where, x, weight, bias, lora_As, lora_Bs):
    """Raise, naming ``where`` and every shape, unless x (..., k), W₀ (d, k), b (d,), A_j (r, k), B_j (d, r)."""
    d, k = weight.shape
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(
            f"{where}: input has {x.shape[-1] if x.ndim else 0} features (shape {tuple(x.shape)}) but the weight of "
            f"shape {tuple(weight.shape)} expects {k} (in_features); weights are (out_features, in_features)"
        )
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"{where}: bias of shape {tuple(bias.shape)} does not fit a weight of shape "
                         f"{tuple(weight.shape)}; it must be ({d},) (out_features)")
    for j, (lora_A, lora_B) in enumerate(zip(lora_As, lora_Bs)):
        r = lora_A.shape[0]
        if lora_A.shape != (r, k) or lora_B.shape != (d, r):
            which = f" adapter {j}:" if len(lora_As) > 1 else ""
            raise ValueError(
                f"{where}:{which} for a weight of shape {(d, k)} (d, k) lora_A must be (r, k) and lora_B (d, r), "
                f"got lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)}"
            )


# ----------------------------------------------------------------------------- the pieces
def computes_own_products(weight) -> bool:
    """The weight protocol: W₀ is an array, or an object with ``matmul_t(x)`` = x·W₀ᵀ and ``matmul(g)`` = g·W₀
    (and, for DoRA, ``row_norms_sq()`` = ‖W₀_i‖² per row)."""
    return hasattr(weight, "matmul_t")


def weight_matmul_t(x, weight):
    """x·W₀ᵀ (N, k) -> (N, d), for any W₀ of the weight protocol."""
    return weight.matmul_t(x) if computes_own_products(weight) else x @ weight.T


def weight_matmul(g, weight):
    """g·W₀ (N, d) -> (N, k), for any W₀ of the weight protocol."""
    return weight.matmul(g) if computes_own_products(weight) else g @ weight


def base_forward(x, weight, bias):
    """W₀x + b for rows x (N, k) -> (N, d): the frozen path."""
    h = weight_matmul_t(x, weight)
    if bias is not None:
        h += bias
    return h


def base_backward(g, x, weight, need_x, need_w, need_b):
    """(∂L/∂x, ∂L/∂W₀, ∂L/∂b) of W₀x + b; each None where it is not needed."""
    dx = weight_matmul(g, weight) if need_x else None
    dw = g.T @ x if need_w else None  # (d, k): only for a trainable W₀
    db = g.sum(axis=0) if need_b else None
    return dx, dw, db


def low_rank_forward(x, lora_A, lora_B, scaling, dropout=0.0, training=False):
    """s·B·A·drop(x) for rows x (N, k) -> ((N, d) update, what the backward needs)."""
    mask = None
    if training and dropout > 0.0:
        mask = bk.dropout_mask(x.shape, dropout, x.dtype, backend=bk.backend_of(x))
        x = x * mask
    u_s = x @ lora_A.T  # (N, r): the low-rank bottleneck
    u_s *= scaling  # s multiplies the thin (N, r) factor, never an (N, d) product
    return u_s @ lora_B.T, (x, mask, u_s)


def low_rank_backward(g, saved, lora_A, lora_B, scaling, need_x, need_A, need_B):
    """(∂L/∂x part, ∂L/∂A, ∂L/∂B) of s·B·A·drop(x) for upstream g (N, d); None where not needed."""
    x_dropped, mask, u_s = saved
    dx = dA = dB = None
    if need_x or need_A:
        g_Bs = g @ lora_B  # (N, r)
        g_Bs *= scaling  # gB = s·g·B, scaled while it is thin
        if need_A:
            dA = g_Bs.T @ x_dropped  # (r, k)
        if need_x:
            dx = g_Bs @ lora_A  # (N, k)
            if mask is not None:
                dx *= mask
    if need_B:
        dB = g.T @ u_s  # (d, r): s·gᵀu
    return dx, dA, dB


def delta_weight(lora_A, lora_B, scaling):
    """ΔW = s·B·A (d, k), formed in float64 from the arrays: what a merge adds to W₀."""
    return (lora_B.astype(np.float64) @ lora_A.astype(np.float64)) * scaling


# ----------------------------------------------------------------------------- one adapter
class LoRALinearFn(Function):
    """h = W₀x + b + s·B·A·drop(x): one adapter on every row (the derivation: module docstring)."""

    def forward(self, x, weight, bias, lora_A, lora_B, scaling=1.0, dropout=0.0, training=False):
        check_lora_shapes("lora_linear", x, weight, bias, (lora_A,), (lora_B,))
        x2 = x.reshape(-1, x.shape[-1])  # (N, k)
        h = base_forward(x2, weight, bias)  # (N, d)
        update, self.low_rank = low_rank_forward(x2, lora_A, lora_B, scaling, dropout, training)
        h += update
        self.scaling, self.in_shape = float(scaling), x.shape
        self.save_for_backward(x2, weight, lora_A, lora_B)
        return h.reshape(*x.shape[:-1], weight.shape[0])

    def backward(self, grad):
        x2, weight, lora_A, lora_B = self.saved
        need_x, need_w, need_b, need_A, need_B = self.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])  # (N, d)
        dx, dw, db = base_backward(g, x2, weight, need_x, need_w, need_b)
        dx_low, dA, dB = low_rank_backward(g, self.low_rank, lora_A, lora_B, self.scaling, need_x, need_A, need_B)
        if need_x:
            dx += dx_low
            dx = dx.reshape(self.in_shape)
        return dx, dw, db, dA, dB


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout=0.0, training=False):
    """h = x W₀ᵀ + b + scaling · drop(x) Aᵀ Bᵀ — the LoRA layer in one fused op (eq. 3)."""
    return LoRALinearFn.apply(x, weight, bias, lora_A, lora_B, scaling=scaling, dropout=dropout, training=training)


# The ops built on these pieces live in modules that import this one; their names are importable
# from here too (``from minilora.lora.function import dora_linear``), resolved on first use.
_BUILT_ON_THIS = {
    "dora": ("DoRALinearFn", "dora_backward", "dora_forward", "dora_linear", "dora_norms", "dora_weight"),
    "mixed_op": ("MixedLoRALinearFn", "mixed_lora_linear"),
}
_HOME = {name: module for module, names in _BUILT_ON_THIS.items() for name in names}


def __getattr__(name):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__package__}.{_HOME[name]}"), name)
