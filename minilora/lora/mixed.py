"""A batch that mixes tasks: row i goes through W0 and its own adapter, h_i = W0 x_i + b + s_a B_a A_a x_i.

    with lora.mixed_batch(model, ["e2e", "parse", "__base__"]):   # one adapter name per row
        logits = model(idx)                                        # idx: (3, T)

The paper names the limitation (Sec. 4.2): "it is not straightforward to batch inputs to
different tasks with different A and B in a single forward pass" once W0 + BA is merged.
Unmerged, it is easy: the base product W0 x is shared by every row, and each adapter adds
a rank-r correction to its own rows only (``lora.mixed_op.MixedLoRALinearFn``). Punica (Chen
et al. 2023) and S-LoRA (Sheng et al. 2023) do this on a GPU with gathered kernels: BGMV
gathers A and B per row, SGMV runs one small matmul per *segment* of rows that share an
adapter. Here rows are grouped once per ``adapter_ids`` tuple (the grouping is cached: every
step of a generation sees the same tuples again) and each group costs two thin matmuls — the
SGMV shape. Rows of one adapter that sit next to each other are a slice (a view, no copy);
scattered rows are gathered with an index array.

How the names reach the layers: the model's code is not involved at all. ``mixed_batch``
finds every ``LoRALinear`` inside the module it is given (any Module: a GPT, a user's own
model, a single layer), checks the names once, and sets each layer's ``row_groups`` for the
duration of the ``with`` block (restoring the previous value afterwards, so blocks nest).
A LoRALinear with ``row_groups`` set routes row i of its input through adapter
``adapter_ids[i]``; "row" means an index of the input's first axis, so the batch axis must
come first and keep its order through the model (true of any model that does not reorder or
mix batch rows, which is what a batch is). Training works the same way: the backward of the
op is hand-written, so one ``loss.backward()`` after the block updates every adapter from its
own rows.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import numpy as np

from .. import backend as bk
from ..nn import Module
from .bias import bias_hosts
from .config import BASE_ADAPTER
from .model import check_unmerged, list_adapters, lora_layers

__all__ = ["RowGroups", "group_rows", "mixed_batch"]


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


@contextlib.contextmanager
def mixed_batch(model: Module, adapter_ids):
    """``with lora.mixed_batch(model, adapter_ids):`` row i of every forward uses adapter ``adapter_ids[i]``.

    ``adapter_ids``: one adapter name per row of the batch (the first axis of the model's input),
    or ``"__base__"`` for the base model's output. Works on any Module containing LoRALinear
    layers; a layer that an adapter does not adapt gives that adapter's rows W0 x + b. Gives
    exactly the rows that running each adapter alone on its rows gives, forward and backward.
    Yields the RowGroups. Raises for an unknown name, or while adapters are merged (a merged
    W0 + BA cannot serve other tasks' rows: call lora.unmerge first).
    """
    layers = [layer for _, layer in lora_layers(model)]
    groups = group_rows(adapter_ids, layers[0].weight.backend if layers else "numpy")
    known = set().union(*(layer.lora_A.keys() for layer in layers))
    unknown = [name for name in groups.names if name not in known]
    if unknown:
        raise ValueError(
            f"unknown adapter {unknown[0]!r} in adapter_ids; the model's adapters are {list_adapters(model)} "
            f"(and {BASE_ADAPTER!r} for the base model)"
        )
    if any(layer.merged for layer in layers):
        check_unmerged(model, "run a mixed-task batch (it needs the unmerged W0)")  # raises, naming a layer
    layers += [deltas for _, _, deltas in bias_hosts(model)]  # per-adapter bias deltas: row i adds its own Δb
    previous = [layer.row_groups for layer in layers]
    for layer in layers:
        object.__setattr__(layer, "row_groups", groups)
    try:
        yield groups
    finally:
        for layer, before in zip(layers, previous):
            object.__setattr__(layer, "row_groups", before)
