"""DoRA (Liu et al. 2024): LoRA's direction, a learned length per row. The op and its backward.

    h = m ⊙ (W₀ + s·B·A)·x / ‖W₀ + s·B·A‖_row + b,     m ∈ R^d, starting at ‖W₀‖_row

The pieces ``dora_forward`` / ``dora_backward`` play the part of ``function.low_rank_forward`` /
``low_rank_backward`` (what is added to W₀x + b, and its gradients), so the fused op
``DoRALinearFn`` and the mixed-batch op (``mixed_op.py``) use them as they use the LoRA pieces;
a mixed batch may hold LoRA and DoRA adapters side by side. ``dora_norms`` gives the row norms
without forming W₀ + s·B·A; ``dora_weight`` is the dense weight a merge writes. W₀ may be any
weight of the protocol in ``function.py`` (an NF4 weight keeps ‖Ŵ₀_i‖² as ``row_norms_sq()``).
``DoRAVariant`` gives a ``LoRALinear`` DoRA's parts (``variant.py``): the layer holds no DoRA code.
"""

from __future__ import annotations

import numpy as np

from .. import backend as bk
from ..function import Function
from ..nn import Parameter
from .function import base_backward, base_forward, check_lora_shapes, low_rank_forward, weight_matmul, weight_matmul_t
from .variant import LoRAVariant

__all__ = ["DORA", "DoRALinearFn", "DoRAVariant", "check_magnitude", "dora_backward", "dora_forward", "dora_linear",
           "dora_norms", "dora_weight"]


def check_magnitude(where, weight, magnitude):
    """Raise unless the DoRA magnitude m is (d,) for a weight (d, k)."""
    if tuple(magnitude.shape) != (weight.shape[0],):
        raise ValueError(f"{where}: the DoRA magnitude has shape {tuple(magnitude.shape)}; a weight of shape "
                         f"{tuple(weight.shape)} needs ({weight.shape[0]},) (one per output feature)")


def dora_weight(V, magnitude):
    """W′ = m ⊙ V / ‖V‖ row by row, in float64: the dense DoRA weight for V = W₀ + s·B·A (merge, analysis)."""
    xp = bk.get_array_module(V)
    return V * (magnitude.astype(np.float64) / xp.sqrt((V * V).sum(axis=1)))[:, None]


def dora_norms(weight, lora_A, lora_B, scaling):
    """n_i = ‖V_i‖ for V = W₀ + s·B·A, row by row, without forming the (d, k) matrix V.

        ‖V_i‖² = ‖W₀_i‖² + 2s·B_i·(W₀Aᵀ)_i + s²·B_i·(A Aᵀ)·B_iᵀ

    Returns (n (d,), W₀Aᵀ (d, r), A Aᵀ (r, r)); the backward reuses the two products.
    """
    w0_At = weight_matmul_t(lora_A, weight).T  # (d, r)
    gram = lora_A @ lora_A.T  # (r, r)
    if hasattr(weight, "row_norms_sq"):
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
    base_dropped = x_base if mask is None else weight_matmul_t(x_dropped, weight)  # x̃·W₀ᵀ (N, d)
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
            dA += scaling * (weight_matmul(rho_B.T, weight) + scaling * ((rho_B.T @ lora_B) @ lora_A))  # s·Bᵀdiag(ρ)V
    if need_B:
        dB = g_c.T @ u_s  # G̃ᵀ·(s·x̃Aᵀ)  (d, r)
        if rho is not None:
            dB += (scaling * rho)[:, None] * (w0_At + scaling * (lora_B @ gram))  # s·diag(ρ)·V·Aᵀ
    if need_x:
        dx = weight_matmul(g_c - g, weight)  # (N, k): (G̃ − g)·W₀ ...
        dx += g_c_B @ lora_A  # ... + s·(G̃B)·A
        if mask is not None:
            dx *= mask
    if need_w:
        dw = (g_c - g).T @ x_dropped  # the (c − 1)⊙x̃W₀ᵀ term and the c⊙x̃W₀ᵀ inside P
        if rho is not None:
            dw += rho[:, None] * (weight + scaling * (lora_B @ lora_A))  # diag(ρ)·V
    return dx, dw, dA, dB, dm



class DoRALinearFn(Function):
    """h = m ⊙ (W₀ + s·B·A)·x / ‖W₀ + s·B·A‖_row + b: DoRA (Liu et al. 2024, eq. 5) on every row.

    Notation (rows are tokens, as in ``function.py``): V = W₀ + s·B·A (d × k), n_i = ‖V_i‖ (the norm of row i,
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
        check_lora_shapes("dora_linear", x, weight, bias, (lora_A,), (lora_B,))
        check_magnitude("dora_linear", weight, magnitude)
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


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout=0.0, training=False, detach_norm=False):
    """h = m ⊙ (W₀ + s·B·A)·x / ‖W₀ + s·B·A‖_row + b — the DoRA layer in one fused op."""
    return DoRALinearFn.apply(x, weight, bias, lora_A, lora_B, magnitude, scaling=scaling, dropout=dropout,
                              training=training, detach_norm=detach_norm)


class DoRAVariant(LoRAVariant):
    """DoRA's parts of a ``LoRALinear``: the magnitude m, the fused op, and the merge m ⊙ V / ‖V‖_row."""

    merges_as_sum = False  # m ⊙ V / ‖V‖_row

    def applies(self, config) -> bool:
        return config.use_dora

    def add_parts(self, layer, name, config, lora_A, lora_B) -> None:
        layer.lora_magnitude[name] = Parameter(self._initial_magnitude(layer, lora_A, lora_B, config.scaling),
                                               backend=layer.weight.backend)

    @staticmethod
    def _initial_magnitude(layer, lora_A, lora_B, scaling):
        # m = ‖W₀ + s·B·A‖ row by row, computed as the forward does: c = m/n = 1 exactly
        weight = layer.weight if layer.quantized else layer.weight.data
        return dora_norms(weight, lora_A, lora_B, scaling)[0]

    def part_shapes(self, layer, config) -> dict:
        return {"lora_magnitude": (layer.weight.shape[0],)}

    def at_init(self, layer, name) -> bool:
        start = self._initial_magnitude(layer, layer.lora_A[name].data, layer.lora_B[name].data,
                                        layer.lora_config[name].scaling)
        return bool(bk.get_array_module(start).array_equal(start, layer.lora_magnitude[name].data))

    def linear(self, layer, x, name):
        cfg = layer.lora_config[name]
        return dora_linear(x, layer.weight, layer.bias, layer.lora_A[name], layer.lora_B[name],
                           layer.lora_magnitude[name], cfg.scaling, dropout=cfg.dropout, training=layer.training,
                           detach_norm=cfg.dora_detach_norm)

    def mixed_parts(self, layer, name):
        return layer.lora_magnitude[name], layer.lora_config[name].dora_detach_norm

    def check_merge(self, layer, names) -> None:
        if len(names) > 1 or layer.merged:
            dora = next(n for n in names if self.applies(layer.lora_config[n]))
            raise RuntimeError(
                f"{layer.layer_name}: the DoRA adapter {dora!r} rescales the rows of W0 + ΔW, so it merges alone "
                f"into an unmerged W0 (asked: {names}, merged already: {layer.merged_adapters})"
            )

    def merged_weight(self, layer, names, V):
        return dora_weight(V, layer.lora_magnitude[names[0]].data)  # c = m / ‖V‖ per row

    def unmerge_state(self, layer, names):
        """‖W₀ + ΔW‖ per row: the merged weight W′ = m ⊙ V / ‖V‖ alone does not hold it."""
        V = layer.weight.data.astype(np.float64) + layer.delta_weight(names)
        return bk.get_array_module(V).sqrt((V * V).sum(axis=1))

    def unmerged_weight(self, layer, names, state):
        scale = state / layer.lora_magnitude[names[0]].data.astype(np.float64)  # V = W′·‖V‖/m
        return layer.weight.data.astype(np.float64) * scale[:, None] - layer.delta_weight(names)


DORA = DoRAVariant()
