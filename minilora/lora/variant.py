"""The adapter variant interface: what a ``LoRALinear`` asks of each adapter, and plain LoRA's answers.

A layer holds adapters of several kinds side by side (LoRA, DoRA, ...). It never asks which
kind an adapter is: it asks the adapter's variant for the parts that differ, and a variant
(``dora.DoRAVariant``) overrides those it changes:

    add_parts(layer, name, config, A, B)   extra Parameters of a new adapter (DoRA: the magnitude m)
    part_shapes(layer, config)             {part: shape} of those extra Parameters, for files to check
    at_init(layer, name)                   True while the extra Parameters hold their initial values
    merges_as_sum                          True when a merged weight is W₀ + s·B·A (DoRA's is rescaled)
    linear(layer, x, name)                 the fused op of one adapter on every row
    mixed_parts(layer, name)               what the mixed-batch op needs beyond A, B: (m or None, detach_norm)
    check_merge(layer, names)              raise if ``names`` cannot be merged into the layer now
    merged_weight(layer, names, V)         the weight a merge writes, from V = W₀ + ΔW (float64)
    unmerge_state(layer, names)            what undoing the merge needs when no copy of W₀ is kept
    unmerged_weight(layer, names, state)   W₀ again (float64), from the merged weight and that state

Adapters merged together share one variant: a variant with a merge of its own merges alone.
(``variants.py`` holds the PiSSA conversion, a function on whole models.)
"""

from __future__ import annotations

import numpy as np

from .function import lora_linear

__all__ = ["LoRAVariant", "LORA"]


class LoRAVariant:
    """Plain LoRA (eq. 3): h = W₀x + b + s·B·A·drop(x), merged as W₀ + s·B·A."""

    def applies(self, config) -> bool:
        return True

    merges_as_sum = True

    def add_parts(self, layer, name, config, lora_A, lora_B) -> None:
        """A and B are all a LoRA adapter has."""

    def part_shapes(self, layer, config) -> dict:
        return {}

    def at_init(self, layer, name) -> bool:
        return True

    def linear(self, layer, x, name):
        cfg = layer.lora_config[name]
        return lora_linear(x, layer.weight, layer.bias, layer.lora_A[name], layer.lora_B[name],
                           cfg.scaling, dropout=cfg.dropout, training=layer.training)

    def mixed_parts(self, layer, name):
        return None, False

    def check_merge(self, layer, names) -> None:
        """Any number of LoRA adapters merge together: their ΔW add up."""

    def merged_weight(self, layer, names, V):
        return V

    def unmerge_state(self, layer, names):
        return None

    def unmerged_weight(self, layer, names, state):
        return layer.weight.data.astype(np.float64) - layer.delta_weight(names)


LORA = LoRAVariant()
