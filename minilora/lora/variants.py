"""PiSSA adapters for a model that kept the original W₀: the conversion to a rank-2r LoRA.

    lora.apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=("q", "v"), init="pissa"))
    ...train...
    plain = lora.pissa_to_lora(model, "default")    # a copy: W₀ restored, the adapter a rank-8 LoRA
    lora.save_adapter("adapter.safetensors", plain, "default")   # loads into the untouched base

PiSSA (Meng et al. 2024) starts from W₀ = W_res + s·B₀·A₀ (the top-r singular part) and trains
A and B on top of W_res. The trained layer computes W_res + s·B·A = W₀ + s·(B·A − B₀·A₀), and

    B·A − B₀·A₀ = [B | −B₀] · [A ; A₀]                (d × 2r) · (2r × k)

is a LoRA of rank 2r on the ORIGINAL W₀ (the conversion PEFT documents for
``save_pretrained(..., path_initial_model_for_weight_conversion=...)``). Its scaling must stay s:
α′/(2r) = α/r gives α′ = 2α, and with rsLoRA α′/√(2r) = α/√r gives α′ = √2·α. A DoRA adapter
converts the same way and keeps its magnitude: the rows it normalises are the same matrix.

A PiSSA adapter file saved as is (``save_adapter`` on the PiSSA model) also loads into the
original base: ``load_adapter`` re-runs the (deterministic) SVD, which makes the same W_res.
The conversion is for everything that must not touch W₀: other adapters on the same layers,
mixed batches with them, or PEFT's plain LoRA.
"""

from __future__ import annotations

import copy
import dataclasses
import math

from .. import backend as bk
from ..nn import Module
from .model import check_unmerged, layers_with

__all__ = ["pissa_to_lora"]


def pissa_to_lora(model: Module, adapter_name: str = "default", new_name: str | None = None) -> Module:
    """A copy of ``model`` with W₀ restored and PiSSA adapter ``adapter_name`` as a rank-2r LoRA ``new_name``.

    The copy computes the same outputs, to rounding (W₀ + s·(B·A − B₀·A₀) against W_res + s·B·A).
    """
    layers = layers_with(model, adapter_name)
    config = layers[0][1].lora_config[adapter_name]
    if config.init != "pissa":
        raise ValueError(f"pissa_to_lora: adapter {adapter_name!r} was made with init={config.init!r}, not 'pissa'; "
                         "it already acts on the original W0")
    check_unmerged(model, f"convert the PiSSA adapter {adapter_name!r}")
    missing = [path for path, layer in layers if adapter_name not in layer.pissa_init]
    if missing:
        raise ValueError(f"pissa_to_lora: {missing[0]} has no record of A0, B0 for {adapter_name!r}")
    alpha = config.alpha * (math.sqrt(2.0) if config.use_rslora else 2.0)
    new_config = dataclasses.replace(config, r=2 * config.r, alpha=alpha, init="kaiming")
    new_name = new_name or adapter_name
    out = copy.deepcopy(model)
    for path, layer in layers_with(out, adapter_name):
        d, k = layer.weight.shape
        if 2 * config.r > min(d, k):
            raise ValueError(f"pissa_to_lora: {path} ({d}x{k}) cannot hold the rank-{2 * config.r} LoRA 2r of the "
                             f"conversion (r <= min(d, k) = {min(d, k)})")
        A0, B0, original = layer.pissa_init[adapter_name]
        A, B = layer.lora_A[adapter_name].data, layer.lora_B[adapter_name].data
        magnitude = layer.lora_magnitude[adapter_name].data.copy() if adapter_name in layer.lora_magnitude else None
        active = list(layer.active_adapters)
        trainable = layer.lora_A[adapter_name].requires_grad
        layer.delete_adapter(adapter_name)
        layer.weight.data[...] = original  # W₀ exactly (W_res + s·B₀·A₀ would be W₀ only to rounding)
        layer.add_adapter(new_name, new_config, activate=False)
        xp = bk.get_array_module(A)
        layer.lora_A[new_name].data[...] = xp.concatenate([A, A0], axis=0)  # [A ; A0] (2r, k)
        layer.lora_B[new_name].data[...] = xp.concatenate([B, -B0], axis=1)  # [B | -B0] (d, 2r)
        if magnitude is not None:
            layer.lora_magnitude[new_name].data[...] = magnitude
        for part in ("lora_A", "lora_B", "lora_magnitude"):
            if new_name in getattr(layer, part):
                getattr(layer, part)[new_name].requires_grad = trainable
        layer.active_adapters = [new_name if n == adapter_name else n for n in active]
    return out
