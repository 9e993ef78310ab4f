"""The mixed-task LoRA op: adapter j on the rows R_j of one batch, W₀x shared (``lora.mixed_batch``).

A batch that mixes tasks (Sec. 4.2's limitation once W₀ + BA is merged) uses the equation of
``function.py`` per row: row i with adapter a(i) gets h_i = W₀x_i + b + s_a·B_a·A_a·drop_a(x_i),
and a base row gets W₀x_i + b. Rows do not interact, so the backward is the fused op's,
restricted, per adapter, to that adapter's rows: only its own rows reach A_a and B_a; W₀x and
its gradient are shared by every row. Several adapters active on every row are the same op
with every group = all rows: their updates add up. A DoRA group uses DoRA's pieces
(``dora.py``) in place of the low-rank ones.
"""

from __future__ import annotations

from ..function import Function
from .dora import check_magnitude, dora_backward, dora_forward
from .function import base_backward, base_forward, check_lora_shapes, low_rank_backward, low_rank_forward

__all__ = ["MixedLoRALinearFn", "mixed_lora_linear"]


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
        check_lora_shapes("mixed_lora_linear", x, weight, bias, lora_As, lora_Bs)
        for m in magnitudes:
            if m is not None:
                check_magnitude("mixed_lora_linear", weight, m)
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
