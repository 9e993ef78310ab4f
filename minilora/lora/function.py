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

DoRA (Liu et al. 2024) normalises each row of the adapted weight and rescales it by a learned
magnitude: h = m ⊙ (W₀ + s·B·A)x / ‖W₀ + s·B·A‖_row + b. Its pieces, ``dora_forward`` /
``dora_backward``, play the part of the low-rank pieces (``DoRALinearFn`` derives the backward);
a mixed batch may hold LoRA and DoRA adapters side by side. W₀ may also be an NF4
``QuantizedWeight`` (``lora.quantize_base``): every product with it goes through ``_times_wt``
and ``_times_w``, which dequantize it a chunk of rows at a time.

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
from .quantized import QuantizedWeight

__all__ = [
    "DoRALinearFn", "LoRALinearFn", "MixedLoRALinearFn", "base_backward", "base_forward", "delta_weight",
    "dora_backward", "dora_forward", "dora_linear", "dora_norms", "lora_linear", "low_rank_backward",
    "low_rank_forward", "mixed_lora_linear",
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
def _times_wt(x, weight):
    """x·W₀ᵀ (N, k) -> (N, d), for an array W₀ or an NF4 ``QuantizedWeight``."""
    return weight.matmul_t(x) if isinstance(weight, QuantizedWeight) else x @ weight.T


def _times_w(g, weight):
    """g·W₀ (N, d) -> (N, k), for an array W₀ or an NF4 ``QuantizedWeight``."""
    return weight.matmul(g) if isinstance(weight, QuantizedWeight) else g @ weight


def base_forward(x, weight, bias):
    """W₀x + b for rows x (N, k) -> (N, d): the frozen path."""
    h = _times_wt(x, weight)
    if bias is not None:
        h += bias
    return h


def base_backward(g, x, weight, need_x, need_w, need_b):
    """(∂L/∂x, ∂L/∂W₀, ∂L/∂b) of W₀x + b; each None where it is not needed."""
    dx = _times_w(g, weight) if need_x else None
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


# ----------------------------------------------------------------------------- DoRA
def dora_weight(V, magnitude):
    """W′ = m ⊙ V / ‖V‖ row by row, in float64: the dense DoRA weight for V = W₀ + s·B·A (merge, analysis)."""
    xp = bk.get_array_module(V)
    return V * (magnitude.astype(np.float64) / xp.sqrt((V * V).sum(axis=1)))[:, None]


def dora_norms(weight, lora_A, lora_B, scaling):
    """n_i = ‖V_i‖ for V = W₀ + s·B·A, row by row, without forming the (d, k) matrix V.

        ‖V_i‖² = ‖W₀_i‖² + 2s·B_i·(W₀Aᵀ)_i + s²·B_i·(A Aᵀ)·B_iᵀ

    Returns (n (d,), W₀Aᵀ (d, r), A Aᵀ (r, r)); the backward reuses the two products.
    """
    w0_At = _times_wt(lora_A, weight).T  # (d, r)
    gram = lora_A @ lora_A.T  # (r, r)
    if isinstance(weight, QuantizedWeight):
        norms_sq = weight.row_norms_sq()  # (d,): ‖Ŵ₀_i‖², a constant kept by the weight
    else:
        norms_sq = (weight * weight).sum(axis=1)  # (d,): ‖W₀_i‖²
    norms_sq += (2.0 * scaling) * (lora_B * w0_At).sum(axis=1)
    norms_sq += (scaling * scaling) * ((lora_B @ gram) * lora_B).sum(axis=1)
    xp = bk.get_array_module(norms_sq)
    return xp.sqrt(xp.maximum(norms_sq, 0.0)), w0_At, gram


def dora_forward(x, x_base, weight, lora_A, lora_B, magnitude, scaling, dropout=0.0, training=False):
    """What DoRA adds to W₀x + b for rows x (N, k): (c − 1)⊙W₀x̃ + c⊙s·B·A·x̃, c = m / ‖W₀ + s·B·A‖_row.

    ``x_base`` = x·W₀ᵀ (N, d), already computed by the base path. Returns (update (N, d), saved).
    """
    norms, w0_At, gram = dora_norms(weight, lora_A, lora_B, scaling)
    update, low_rank = low_rank_forward(x, lora_A, lora_B, scaling, dropout, training)
    x_dropped, mask, _ = low_rank
    base_dropped = x_base if mask is None else _times_wt(x_dropped, weight)  # x̃·W₀ᵀ (N, d)
    direction = base_dropped + update  # P = x̃·Vᵀ (N, d)
    c = magnitude / norms  # (d,)
    update = direction * c
    update -= base_dropped  # (c − 1)⊙x̃W₀ᵀ + c⊙s·x̃AᵀBᵀ
    return update, (low_rank, direction, norms, c, w0_At, gram)


def dora_backward(g, saved, weight, lora_A, lora_B, magnitude, scaling, detach_norm,
                  need_x, need_w, need_A, need_B, need_m):
    """(∂L/∂x part, ∂L/∂W₀ part, ∂L/∂A, ∂L/∂B, ∂L/∂m) of DoRA's update (derivation: ``DoRALinearFn``)."""
    (x_dropped, mask, u_s), direction, norms, c, w0_At, gram = saved
    gamma = (g * direction).sum(axis=0)  # (d,): γ_i = Σ_rows g_i·P_i = ∂L/∂c_i
    dm = gamma / norms if need_m else None
    rho = None
    if not detach_norm:
        rho = -gamma * magnitude / (norms * norms * norms)  # (d,): ρ_i = ∂L/∂n_i / n_i
    g_c = g * c  # (N, d): G̃ = g⊙c
    dx = dw = dA = dB = None
    g_c_B = None
    if need_x or need_A:
        g_c_B = g_c @ lora_B  # (N, r)
        g_c_B *= scaling
    if need_A:
        dA = g_c_B.T @ x_dropped  # s·(G̃B)ᵀ·x̃  (r, k)
        if rho is not None:
            rho_B = lora_B * rho[:, None]  # diag(ρ)·B (d, r)
            dA += scaling * (_times_w(rho_B.T, weight) + scaling * ((rho_B.T @ lora_B) @ lora_A))  # s·Bᵀdiag(ρ)V
    if need_B:
        dB = g_c.T @ u_s  # G̃ᵀ·(s·x̃Aᵀ)  (d, r)
        if rho is not None:
            dB += (scaling * rho)[:, None] * (w0_At + scaling * (lora_B @ gram))  # s·diag(ρ)·V·Aᵀ
    if need_x:
        dx = _times_w(g_c - g, weight)  # (N, k): (G̃ − g)·W₀ ...
        dx += g_c_B @ lora_A  # ... + s·(G̃B)·A
        if mask is not None:
            dx *= mask
    if need_w:
        dw = (g_c - g).T @ x_dropped  # the (c − 1)⊙x̃W₀ᵀ term and the c⊙x̃W₀ᵀ inside P
        if rho is not None:
            dw += rho[:, None] * (weight + scaling * (lora_B @ lora_A))  # diag(ρ)·V
    return dx, dw, dA, dB, dm


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


# ----------------------------------------------------------------------------- DoRA: one adapter
class DoRALinearFn(Function):
    """h = m ⊙ (W₀ + s·B·A)·x / ‖W₀ + s·B·A‖_row + b: DoRA (Liu et al. 2024, eq. 5) on every row.

    Notation (rows are tokens, as above): V = W₀ + s·B·A (d × k), n_i = ‖V_i‖ (the norm of row i,
    one per output feature, as PEFT takes it), c = m / n (d,), x̃ = drop(x). The forward is

        P = x̃·Vᵀ = x̃·W₀ᵀ + s·(x̃·Aᵀ)·Bᵀ                  (N × d: "the direction")
        h = x·W₀ᵀ + b + c ⊙ P − x̃·W₀ᵀ                      (= c ⊙ x·Vᵀ + b without dropout)

    (PEFT's form with dropout: the base path sees x, DoRA's terms see x̃.) The norms never need
    V itself: ‖V_i‖² = ‖W₀_i‖² + 2s·B_i·(W₀Aᵀ)_i + s²·B_i·(AAᵀ)·B_iᵀ (``dora_norms``).

    Backward, with g = ∂L/∂h (N × d) and G̃ = g ⊙ c:
      m:  ∂L/∂c_i = Σ_rows g_i·P_i =: γ_i, and c_i = m_i / n_i, so ∂L/∂m = γ / n.
      n:  ∂L/∂n_i = −γ_i·m_i / n_i², and ∂n_i/∂V_i = V_i / n_i, so the norm sends
          ∂L/∂V ∋ diag(ρ)·V with ρ_i = −γ_i·m_i / n_i³.
      P:  P = x̃·Vᵀ sends ∂L/∂V ∋ G̃ᵀ·x̃. Together ∂L/∂V = G̃ᵀ·x̃ + diag(ρ)·V, and V = W₀ + s·B·A:
          ∂L/∂A = s·Bᵀ·∂L/∂V = s·(G̃B)ᵀ·x̃ + s·(ρ⊙B)ᵀ·(W₀ + s·B·A)                (r × k)
          ∂L/∂B = s·∂L/∂V·Aᵀ = G̃ᵀ·(s·x̃Aᵀ) + s·diag(ρ)·(W₀Aᵀ + s·B·(AAᵀ))     (d × r)
      x:  ∂L/∂x = g·W₀ + mask ⊙ ((G̃ − g)·W₀ + s·(G̃B)·A)        (= G̃·V without dropout)
      W₀: ∂L/∂W₀ = gᵀ·x + (G̃ − g)ᵀ·x̃ + diag(ρ)·V               only when W₀ requires grad
      b:  ∂L/∂b = Σ_rows g.
    Every product is thin (N × r, d × r, r × k) except the two that any Linear pays (g·W₀, x·W₀ᵀ).

    ``detach_norm=True`` treats n as a constant (ρ = 0), as the DoRA paper's Sec. 4.3 suggests
    to save memory and as PEFT does; the forward is the same, the gradients of A, B (and W₀)
    lose the norm's term. The default is the exact gradient. A fresh adapter (B = 0, m = ‖W₀‖)
    has c = 1 exactly, so h is bit-equal to the base layer's.
    """

    def forward(self, x, weight, bias, lora_A, lora_B, magnitude, scaling=1.0, dropout=0.0, training=False,
                detach_norm=False):
        _check_shapes("dora_linear", x, weight, bias, (lora_A,), (lora_B,))
        _check_magnitude("dora_linear", weight, magnitude)
        x2 = x.reshape(-1, x.shape[-1])  # (N, k)
        x_base = base_forward(x2, weight, None)  # (N, d): x·W₀ᵀ
        update, self.dora = dora_forward(x2, x_base, weight, lora_A, lora_B, magnitude, scaling, dropout, training)
        h = x_base + update
        if bias is not None:
            h += bias
        self.scaling, self.detach_norm, self.in_shape = float(scaling), bool(detach_norm), x.shape
        self.save_for_backward(x2, weight, lora_A, lora_B, magnitude)
        return h.reshape(*x.shape[:-1], weight.shape[0])

    def backward(self, grad):
        x2, weight, lora_A, lora_B, magnitude = self.saved
        need_x, need_w, need_b, need_A, need_B, need_m = self.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])  # (N, d)
        dx, dw, db = base_backward(g, x2, weight, need_x, need_w, need_b)
        dx_dora, dw_dora, dA, dB, dm = dora_backward(g, self.dora, weight, lora_A, lora_B, magnitude, self.scaling,
                                                     self.detach_norm, need_x, need_w, need_A, need_B, need_m)
        if need_x:
            dx += dx_dora
            dx = dx.reshape(self.in_shape)
        if need_w:
            dw += dw_dora
        return dx, dw, db, dA, dB, dm


def _check_magnitude(where, weight, magnitude):
    if tuple(magnitude.shape) != (weight.shape[0],):
        raise ValueError(f"{where}: the DoRA magnitude has shape {tuple(magnitude.shape)}; a weight of shape "
                         f"{tuple(weight.shape)} needs ({weight.shape[0]},) (one per output feature)")


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout=0.0, training=False, detach_norm=False):
    """h = m ⊙ (W₀ + s·B·A)·x / ‖W₀ + s·B·A‖_row + b — the DoRA layer in one fused op."""
    return DoRALinearFn.apply(x, weight, bias, lora_A, lora_B, magnitude, scaling=scaling, dropout=dropout,
                              training=training, detach_norm=detach_norm)


# ----------------------------------------------------------------------------- adapter j on rows R_j
class MixedLoRALinearFn(Function):
    """h_i = W₀x_i + b + s_j·B_j·A_j·drop_j(x_i) for every row i of group j (W₀x_i + b for rows in none).

    Inputs: x (rows, ..., k), weight (d, k), bias, then A_1..A_n, then B_1..B_n, and optionally
    m_1..m_n: DoRA magnitudes, None for a plain LoRA group. A "row" is an index of the first axis
    (a sequence of a (B, T, k) batch); ``selectors[j]`` (a slice or an index array) are group j's
    rows. Groups may overlap (several adapters active on the same rows: their updates add up).
    Backward: ``base_backward`` for every row, then ``low_rank_backward`` (or ``dora_backward``
    for a DoRA group) of each group on its own rows.
    """

    def forward(self, x, weight, bias, *lora, selectors=(), scalings=(), dropouts=(), training=False,
                detach_norms=()):
        n = len(selectors)
        lora_As, lora_Bs, magnitudes = lora[:n], lora[n:2 * n], lora[2 * n:] or (None,) * n
        _check_shapes("mixed_lora_linear", x, weight, bias, lora_As, lora_Bs)
        for m in magnitudes:
            if m is not None:
                _check_magnitude("mixed_lora_linear", weight, m)
        if x.ndim < 2:
            raise ValueError(f"mixed_lora_linear: x must be (rows, ..., k) with a row axis first, got {tuple(x.shape)}")
        rows, k, d = x.shape[0], x.shape[-1], weight.shape[0]
        x3 = x.reshape(rows, -1, k)  # (rows, T, k): T = the product of the middle axes (1 for 2-D x)
        T = x3.shape[1]
        if all(m is None for m in magnitudes):
            h = base_forward(x3.reshape(-1, k), weight, bias)  # (rows·T, d): the base product, once for every row
            base3 = None
        else:  # DoRA groups read x·W₀ᵀ without the bias and without the other groups' updates
            x_base = base_forward(x3.reshape(-1, k), weight, None)
            h = x_base.copy()
            if bias is not None:
                h += bias
            base3 = x_base.reshape(rows, T, d)
        h3 = h.reshape(rows, T, d)
        self.low_rank = []
        for sel, lora_A, lora_B, m, s, p in zip(selectors, lora_As, lora_Bs, magnitudes, scalings, dropouts):
            x_g = x3[sel].reshape(-1, k)  # (n_j·T, k): a view when sel is a slice
            if m is None:
                update, saved = low_rank_forward(x_g, lora_A, lora_B, s, p, training)
            else:
                update, saved = dora_forward(x_g, base3[sel].reshape(-1, d), weight, lora_A, lora_B, m, s, p, training)
            h3[sel] += update.reshape(-1, T, d)
            self.low_rank.append(saved)
        self.save_for_backward(x3, weight, lora_As, lora_Bs, magnitudes)
        self.selectors, self.scalings, self.in_shape = selectors, scalings, x.shape
        self.detach_norms, self.n_inputs = tuple(detach_norms) or (False,) * n, 3 + len(lora)
        return h.reshape(*x.shape[:-1], d)

    def backward(self, grad):
        x3, weight, lora_As, lora_Bs, magnitudes = self.saved
        n = len(lora_As)
        need_x, need_w, need_b = self.needs_input_grad[:3]
        need_As, need_Bs = self.needs_input_grad[3:3 + n], self.needs_input_grad[3 + n:3 + 2 * n]
        need_ms = self.needs_input_grad[3 + 2 * n:] or (False,) * n
        rows, T, k = x3.shape
        d = weight.shape[0]
        g3 = grad.reshape(rows, T, d)
        dx, dw, db = base_backward(g3.reshape(-1, d), x3.reshape(-1, k), weight, need_x, need_w, need_b)
        dx3 = dx.reshape(rows, T, k) if need_x else None
        dAs, dBs, dms = [None] * n, [None] * n, [None] * n
        for j, (sel, s, saved) in enumerate(zip(self.selectors, self.scalings, self.low_rank)):
            g_g = g3[sel].reshape(-1, d)  # (n_j·T, d): this adapter's rows only
            if magnitudes[j] is None:
                dx_low, dAs[j], dBs[j] = low_rank_backward(g_g, saved, lora_As[j], lora_Bs[j], s,
                                                           need_x, need_As[j], need_Bs[j])
            else:
                dx_low, dw_dora, dAs[j], dBs[j], dms[j] = dora_backward(
                    g_g, saved, weight, lora_As[j], lora_Bs[j], magnitudes[j], s, self.detach_norms[j],
                    need_x, need_w, need_As[j], need_Bs[j], need_ms[j])
                if need_w:
                    dw += dw_dora
            if need_x:
                dx3[sel] += dx_low.reshape(-1, T, k)
        grads = (dx3.reshape(self.in_shape) if need_x else None, dw, db, *dAs, *dBs, *dms)
        return grads[: self.n_inputs]


def mixed_lora_linear(x, weight, bias, lora_As, lora_Bs, scalings, selectors, dropouts=None, training=False,
                      magnitudes=None, detach_norms=None):
    """The mixed-task LoRA layer: adapter j (A_j, B_j, scaling_j) acts on the rows ``selectors[j]``.

    ``selectors`` are slices or index arrays over the first axis of ``x`` (``lora.group_rows``
    makes them from one adapter name per row); rows in no group get the base output W₀x + b.
    ``magnitudes[j]`` (DoRA's m, or None for a LoRA adapter) and ``detach_norms[j]`` make group
    j a DoRA adapter.
    """
    n = len(selectors)
    if not (len(lora_As) == len(lora_Bs) == len(scalings) == n):
        raise ValueError(
            f"mixed_lora_linear: {n} row groups need as many lora_As, lora_Bs and scalings, got "
            f"{len(lora_As)}, {len(lora_Bs)} and {len(scalings)}"
        )
    dropouts = tuple(dropouts) if dropouts is not None else (0.0,) * n
    extra = ()
    if magnitudes is not None and any(m is not None for m in magnitudes):
        if len(magnitudes) != n:
            raise ValueError(f"mixed_lora_linear: {n} row groups need {n} magnitudes (None for LoRA), got {len(magnitudes)}")
        extra = tuple(magnitudes)
    return MixedLoRALinearFn.apply(
        x, weight, bias, *lora_As, *lora_Bs, *extra, selectors=tuple(selectors),
        scalings=tuple(float(s) for s in scalings), dropouts=dropouts, training=training,
        detach_norms=tuple(bool(v) for v in (detach_norms or (False,) * n)),
    )
