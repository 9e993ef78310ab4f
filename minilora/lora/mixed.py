"""A batch that mixes tasks: row i goes through W0 and its own adapter, h_i = W0 x_i + b + s_a B_a A_a x_i.

The paper names the limitation (Sec. 4.2): "it is not straightforward to batch inputs to
different tasks with different A and B in a single forward pass" once W0 + BA is merged.
Unmerged, it is easy: the base product W0 x is shared by every row, and each adapter adds
a rank-r correction to its own rows only. Punica (Chen et al. 2023) and S-LoRA (Sheng et
al. 2023) do this on a GPU with gathered kernels: BGMV gathers A and B per row, SGMV runs
one small matmul per *segment* of rows that share an adapter. Here rows are grouped once
per ``adapter_ids`` tuple (the grouping is cached: every LoRA layer of a forward pass, and
every step of a generation, sees the same tuple) and each group costs two thin matmuls —
the SGMV shape. Rows of one adapter that sit next to each other are a slice (a view, no
copy); scattered rows are gathered with an index array.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .. import backend as bk
from ..function import Function
from ..functional import dropout_mask
from .config import BASE_ADAPTER

__all__ = ["MixedLoRALinear", "RowGroups", "group_rows", "mixed_lora_linear"]


class RowGroups:
    """Rows of a batch grouped by adapter name: ``names[j]`` owns rows ``selectors[j]``.

    A selector is a ``slice`` (the rows are contiguous) or an integer index array of the
    backend. Rows named ``BASE_ADAPTER`` belong to no group: they get W0 x + b only.
    """

    __slots__ = ("n_rows", "names", "selectors")

    def __init__(self, names, selectors, n_rows):
        self.names, self.selectors, self.n_rows = tuple(names), tuple(selectors), n_rows

    def __repr__(self) -> str:
        return f"RowGroups({dict(zip(self.names, self.selectors))}, n_rows={self.n_rows})"


_CACHE: OrderedDict[tuple, RowGroups] = OrderedDict()
_CACHE_SIZE = 256


def group_rows(adapter_ids, backend: str = "numpy") -> RowGroups:
    """Group row indices by adapter name, once per distinct ``adapter_ids`` (an LRU cache).

    The Python loop over rows runs on a cache miss only; a forward pass through L LoRA
    layers (and every generation step) reuses the grouping.
    """
    if isinstance(adapter_ids, str):
        raise TypeError(
            f"adapter_ids must hold one adapter name per row, got the single string {adapter_ids!r}; "
            "to use one adapter for every row, call lora.set_adapter(model, name) instead"
        )
    key = (tuple(adapter_ids), backend)
    groups = _CACHE.get(key)
    if groups is not None:
        _CACHE.move_to_end(key)
        return groups
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(key[0]):
        if not isinstance(name, str):
            raise TypeError(f"adapter_ids[{i}] is {name!r}; each entry must be an adapter name (a str) or {BASE_ADAPTER!r}")
        if name != BASE_ADAPTER:
            rows.setdefault(str(name), []).append(i)
    xp = bk.module_for(backend)
    selectors = []
    for members in rows.values():
        if members[-1] - members[0] + 1 == len(members):  # increasing and gap-free: a slice
            selectors.append(slice(members[0], members[-1] + 1))
        else:
            selectors.append(xp.asarray(np.asarray(members, dtype=np.intp)))
    groups = RowGroups(rows.keys(), selectors, len(key[0]))
    _CACHE[key] = groups
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return groups


def _check_shapes(x, weight, lora_As, lora_Bs):
    d, k = weight.shape
    if x.ndim < 2 or x.shape[-1] != k:
        raise ValueError(
            f"mixed_lora_linear: x must be (rows, ..., {k}) for a weight of shape {tuple(weight.shape)}, "
            f"got {tuple(x.shape)}"
        )
    for j, (lora_A, lora_B) in enumerate(zip(lora_As, lora_Bs)):
        r = lora_A.shape[0]
        if lora_A.shape != (r, k) or lora_B.shape != (d, r):
            raise ValueError(
                f"mixed_lora_linear: adapter {j}: for a weight of shape {(d, k)} (d, k) lora_A must be (r, k) and "
                f"lora_B (d, r), got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}"
            )


class MixedLoRALinear(Function):
    """h_i = W₀x_i + b + s_j B_j A_j drop_j(x_i) for every row i of group j (W₀x_i + b for base rows).

    Inputs: x (rows, ..., k), weight (d, k), bias, then A_1..A_n, then B_1..B_n. A "row" is an
    index of the first axis (a sequence of a (bk, T, k) batch). Per group j with rows R_j, the
    backward is the one of ``F.lora_linear`` restricted to R_j (g: ∂L/∂h):

        ∂L/∂x[R_j] += s_j (g[R_j] B_j) A_j ⊙ mask_j        (∂L/∂x = g W₀ for every row first)
        ∂L/∂A_j     = s_j (g[R_j] B_j)ᵀ drop_j(x[R_j])    — only its own rows reach A_j, B_j
        ∂L/∂B_j     = s_j g[R_j]ᵀ u_j,  u_j = drop_j(x[R_j]) A_jᵀ  (s_j multiplies the thin
                                                          (n_j, r) factors, never an (n_j, d) product)
        ∂L/∂W₀ = gᵀ x, ∂L/∂b = Σ g                        — only when they require grad.
    """

    def forward(self, x, weight, bias, *lora, selectors=(), scalings=(), dropouts=(), training=False):
        n = len(selectors)
        lora_As, lora_Bs = lora[:n], lora[n:]
        _check_shapes(x, weight, lora_As, lora_Bs)
        rows, k, d = x.shape[0], x.shape[-1], weight.shape[0]
        x3 = x.reshape(rows, -1, k)  # (rows, T, k): T = the product of the middle axes (1 for 2-D x)
        T = x3.shape[1]
        h = x3.reshape(-1, k) @ weight.T  # (rows·T, d): the base product, once for every row
        if bias is not None:
            h += bias
        h3 = h.reshape(rows, T, d)
        saved = []
        for sel, lora_A, lora_B, s, p in zip(selectors, lora_As, lora_Bs, scalings, dropouts):
            x_g = x3[sel].reshape(-1, k)  # (n_j·T, k): a view when sel is a slice
            mask = None
            if training and p > 0.0:
                mask = dropout_mask(x_g.shape, p, x_g.dtype, backend=bk.backend_of(x_g))
                x_g = x_g * mask
            u_s = x_g @ lora_A.T  # (n_j·T, r)
            u_s *= s  # scale the thin factor, not the (n_j·T, d) product
            h3[sel] += (u_s @ lora_B.T).reshape(-1, T, d)
            saved.append((x_g, mask, u_s))
        self.save_for_backward(x3, weight, lora_As, lora_Bs, saved)
        self.selectors, self.scalings, self.in_shape = selectors, scalings, x.shape
        return h.reshape(*x.shape[:-1], d)

    def backward(self, grad):
        x3, weight, lora_As, lora_Bs, saved = self.saved
        n = len(lora_As)
        need_x, need_w, need_b = self.needs_input_grad[:3]
        need_As, need_Bs = self.needs_input_grad[3:3 + n], self.needs_input_grad[3 + n:]
        rows, T, k = x3.shape
        d = weight.shape[0]
        g3 = grad.reshape(rows, T, d)
        g = g3.reshape(-1, d)
        dx3 = (g @ weight).reshape(rows, T, k) if need_x else None
        dAs, dBs = [None] * n, [None] * n
        for j, (sel, s, (x_g, mask, u_s)) in enumerate(zip(self.selectors, self.scalings, saved)):
            g_g = g3[sel].reshape(-1, d)  # (n_j·T, d): this adapter's rows only
            if need_x or need_As[j]:
                g_Bs = g_g @ lora_Bs[j]  # (n_j·T, r)
                g_Bs *= s
                if need_As[j]:
                    dAs[j] = g_Bs.T @ x_g  # (r, k)
                if need_x:
                    low_rank = g_Bs @ lora_As[j]  # (n_j·T, k)
                    if mask is not None:
                        low_rank *= mask
                    dx3[sel] += low_rank.reshape(-1, T, k)
            if need_Bs[j]:
                dBs[j] = g_g.T @ u_s  # (d, r): s gᵀu with u_s = s·u
        dw = g.T @ x3.reshape(-1, k) if need_w else None  # (d, k): full fine-tuning only
        db = g.sum(axis=0) if need_b else None
        dx = dx3.reshape(self.in_shape) if need_x else None
        return (dx, dw, db, *dAs, *dBs)


def mixed_lora_linear(x, weight, bias, lora_As, lora_Bs, scalings, selectors, dropouts=None, training=False):
    """The mixed-task LoRA layer: adapter j (A_j, B_j, scaling_j) acts on the rows ``selectors[j]``.

    ``selectors`` come from ``group_rows(adapter_ids).selectors``: slices or index arrays over
    the first axis of ``x``; rows in no group get the base output W₀x + b.
    """
    n = len(selectors)
    if not (len(lora_As) == len(lora_Bs) == len(scalings) == n):
        raise ValueError(
            f"mixed_lora_linear: {n} row groups need as many lora_As, lora_Bs and scalings, got "
            f"{len(lora_As)}, {len(lora_Bs)} and {len(scalings)}"
        )
    dropouts = tuple(dropouts) if dropouts is not None else (0.0,) * n
    return MixedLoRALinear.apply(
        x, weight, bias, *lora_As, *lora_Bs, selectors=tuple(selectors), scalings=tuple(float(s) for s in scalings),
        dropouts=dropouts, training=training,
    )
