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

A batch that mixes tasks (Sec. 4.2's limitation once W₀ + BA is merged) uses the same equation
per row: row i with adapter a(i) gets h_i = W₀x_i + b + s_a·B_a·A_a·drop_a(x_i), and a base row
gets W₀x_i + b. Rows do not interact, so the backward is the one above restricted, per adapter,
to that adapter's rows: only its own rows reach A_a and B_a; W₀x and its gradient are shared by
every row. Several adapters active on every row are the same op with every group = all rows:
their updates add up.

The pieces, each written once: ``base_forward`` / ``base_backward`` (W₀x + b), ``low_rank_forward``
/ ``low_rank_backward`` (one adapter's s·B·A·drop(x) on its rows), and ``delta_weight`` (ΔW = s·B·A,
what a merge adds to W₀). ``LoRALinearFn`` (one adapter, every row) and ``MixedLoRALinearFn``
(adapter j on the rows ``selectors[j]``) are built from them; ``lora_linear`` and
``mixed_lora_linear`` are the functions users call (``F.lora_linear`` is the first).
"""

from __future__ import annotations

import numpy as np

from .. import backend as bk
from ..function import Function
from ..functional import dropout_mask

__all__ = [
    "LoRALinearFn", "MixedLoRALinearFn", "base_backward", "base_forward", "delta_weight", "lora_linear",
    "low_rank_backward", "low_rank_forward", "mixed_lora_linear",
]


def _check_shapes(where, x, weight, bias, lora_As, lora_Bs):
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
def base_forward(x, weight, bias):
    """W₀x + b for rows x (N, k) -> (N, d): the frozen path."""
    h = x @ weight.T
    if bias is not None:
        h += bias
    return h


def base_backward(g, x, weight, need_x, need_w, need_b):
    """(∂L/∂x, ∂L/∂W₀, ∂L/∂b) of W₀x + b; each None where it is not needed."""
    dx = g @ weight if need_x else None
    dw = g.T @ x if need_w else None  # (d, k): only for a trainable W₀
    db = g.sum(axis=0) if need_b else None
    return dx, dw, db


def low_rank_forward(x, lora_A, lora_B, scaling, dropout=0.0, training=False):
    """s·B·A·drop(x) for rows x (N, k) -> ((N, d) update, what the backward needs)."""
    mask = None
    if training and dropout > 0.0:
        mask = dropout_mask(x.shape, dropout, x.dtype, backend=bk.backend_of(x))
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
        _check_shapes("lora_linear", x, weight, bias, (lora_A,), (lora_B,))
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


# ----------------------------------------------------------------------------- adapter j on rows R_j
class MixedLoRALinearFn(Function):
    """h_i = W₀x_i + b + s_j·B_j·A_j·drop_j(x_i) for every row i of group j (W₀x_i + b for rows in none).

    Inputs: x (rows, ..., k), weight (d, k), bias, then A_1..A_n, then B_1..B_n. A "row" is an
    index of the first axis (a sequence of a (B, T, k) batch); ``selectors[j]`` (a slice or an
    index array) are group j's rows. Groups may overlap (several adapters active on the same
    rows: their updates add up). Backward: ``base_backward`` for every row, then
    ``low_rank_backward`` of each group on its own rows.
    """

    def forward(self, x, weight, bias, *lora, selectors=(), scalings=(), dropouts=(), training=False):
        n = len(selectors)
        lora_As, lora_Bs = lora[:n], lora[n:]
        _check_shapes("mixed_lora_linear", x, weight, bias, lora_As, lora_Bs)
        if x.ndim < 2:
            raise ValueError(f"mixed_lora_linear: x must be (rows, ..., k) with a row axis first, got {tuple(x.shape)}")
        rows, k, d = x.shape[0], x.shape[-1], weight.shape[0]
        x3 = x.reshape(rows, -1, k)  # (rows, T, k): T = the product of the middle axes (1 for 2-D x)
        T = x3.shape[1]
        h = base_forward(x3.reshape(-1, k), weight, bias)  # (rows·T, d): the base product, once for every row
        h3 = h.reshape(rows, T, d)
        self.low_rank = []
        for sel, lora_A, lora_B, s, p in zip(selectors, lora_As, lora_Bs, scalings, dropouts):
            x_g = x3[sel].reshape(-1, k)  # (n_j·T, k): a view when sel is a slice
            update, saved = low_rank_forward(x_g, lora_A, lora_B, s, p, training)
            h3[sel] += update.reshape(-1, T, d)
            self.low_rank.append(saved)
        self.save_for_backward(x3, weight, lora_As, lora_Bs)
        self.selectors, self.scalings, self.in_shape = selectors, scalings, x.shape
        return h.reshape(*x.shape[:-1], d)

    def backward(self, grad):
        x3, weight, lora_As, lora_Bs = self.saved
        n = len(lora_As)
        need_x, need_w, need_b = self.needs_input_grad[:3]
        need_As, need_Bs = self.needs_input_grad[3:3 + n], self.needs_input_grad[3 + n:]
        rows, T, k = x3.shape
        d = weight.shape[0]
        g3 = grad.reshape(rows, T, d)
        dx, dw, db = base_backward(g3.reshape(-1, d), x3.reshape(-1, k), weight, need_x, need_w, need_b)
        dx3 = dx.reshape(rows, T, k) if need_x else None
        dAs, dBs = [None] * n, [None] * n
        for j, (sel, s, saved) in enumerate(zip(self.selectors, self.scalings, self.low_rank)):
            g_g = g3[sel].reshape(-1, d)  # (n_j·T, d): this adapter's rows only
            dx_low, dAs[j], dBs[j] = low_rank_backward(g_g, saved, lora_As[j], lora_Bs[j], s,
                                                       need_x, need_As[j], need_Bs[j])
            if need_x:
                dx3[sel] += dx_low.reshape(-1, T, k)
        return (dx3.reshape(self.in_shape) if need_x else None, dw, db, *dAs, *dBs)


def mixed_lora_linear(x, weight, bias, lora_As, lora_Bs, scalings, selectors, dropouts=None, training=False):
    """The mixed-task LoRA layer: adapter j (A_j, B_j, scaling_j) acts on the rows ``selectors[j]``.

    ``selectors`` are slices or index arrays over the first axis of ``x`` (``lora.group_rows``
    makes them from one adapter name per row); rows in no group get the base output W₀x + b.
    """
    n = len(selectors)
    if not (len(lora_As) == len(lora_Bs) == len(scalings) == n):
        raise ValueError(
            f"mixed_lora_linear: {n} row groups need as many lora_As, lora_Bs and scalings, got "
            f"{len(lora_As)}, {len(lora_Bs)} and {len(scalings)}"
        )
    dropouts = tuple(dropouts) if dropouts is not None else (0.0,) * n
    return MixedLoRALinearFn.apply(
        x, weight, bias, *lora_As, *lora_Bs, selectors=tuple(selectors), scalings=tuple(float(s) for s in scalings),
        dropouts=dropouts, training=training,
    )
