"""``quantize_base``: the frozen Linear weights of a model in 4-bit NF4 under its LoRA adapters (QLoRA).

    lora.apply_lora(model, cfg); lora.mark_only_lora_as_trainable(model)
    report = lora.quantize_base(model, "nf4", block_size=64)   # every frozen Linear weight -> NF4
    report.original_bytes, report.nf4_bytes, report.nf4_double_quant_bytes
    loss = model.loss(idx, targets); loss.backward()          # A and B learn; W0 stays 4-bit

The NF4 format and the weight that computes from it (``QuantizedWeight``) are in ``minilora/quant.py``,
the layers on it in ``quantized.py`` (below ``layer.py``, which computes with a ``QuantizedWeight``
too); this module walks a model and swaps them in, so it imports both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import quant
from ..nn import Linear, Module, Parameter
from ..quant import DequantBuffer, QuantizedWeight
from .layer import LoRALinear
from .quantized import NF4Linear

__all__ = ["QUANT_METHODS", "QuantizationReport", "quantize_base"]

QUANT_METHODS = ("nf4",)


@dataclass
class QuantizationReport:
    """What ``quantize_base`` did, and the bytes of the quantized weights in each storage."""

    layers: list = field(default_factory=list)  # paths of the quantized Linear weights
    skipped: dict = field(default_factory=dict)  # path -> why it was left alone
    values: int = 0  # number of quantized weight values
    original_bytes: int = 0  # in their dtype before (float32: 4 per value)
    nf4_bytes: int = 0  # codes + float32 absmax per block
    nf4_double_quant_bytes: int = 0  # codes + 8-bit absmax + float32 per 256 blocks
    buffer_bytes: int = 0  # the shared dequantization buffer (grows to the largest chunk used)

    def __str__(self) -> str:
        mib = 1 / 2**20
        return (f"{len(self.layers)} Linear weights, {self.values:,} values: {self.original_bytes * mib:.3f} MiB -> NF4 "
                f"{self.nf4_bytes * mib:.3f} MiB ({8 * self.nf4_bytes / max(1, self.values):.3f} bits/value), "
                f"with double quantization {self.nf4_double_quant_bytes * mib:.3f} MiB "
                f"({8 * self.nf4_double_quant_bytes / max(1, self.values):.3f} bits/value)")


def quantize_base(model: Module, method: str = "nf4", block_size: int = 64, double_quant: bool = False,
                  chunk_values: int = 1 << 16) -> QuantizationReport:
    """Store every frozen Linear weight of ``model`` in NF4 (QLoRA); returns a QuantizationReport.

    Frozen means ``requires_grad=False``: call ``lora.mark_only_lora_as_trainable(model)`` first.
    Plain ``nn.Linear`` layers become ``NF4Linear``; a ``LoRALinear``'s W₀ becomes a
    ``QuantizedWeight`` under its adapters. A weight shared by several modules is left alone
    (listed in ``report.skipped``). All checks run before anything changes.
    """
    if method not in QUANT_METHODS:
        raise ValueError(f"quantize_base: unknown quantization {method!r}; the methods are {QUANT_METHODS} "
                         "(4-bit NormalFloat, QLoRA)")
    quant.check_block_size(block_size)
    buffer = DequantBuffer(chunk_values)
    users: dict[int, int] = {}
    for _, module in model.named_modules():
        for p in module._parameters.values():
            if p is not None:
                users[id(p)] = users.get(id(p), 0) + 1
    report, plan = QuantizationReport(), []
    for path, module in model.named_modules():
        if not isinstance(module, (Linear, LoRALinear)) or not isinstance(module.weight, Parameter):
            continue
        weight = module.weight
        if weight.requires_grad:
            report.skipped[path] = "trainable (requires_grad=True)"
        elif users[id(weight)] > 1:
            report.skipped[path] = "shared with another module (tied weight)"
        elif not path and not isinstance(module, LoRALinear):
            raise ValueError("quantize_base: the model itself is an nn.Linear; put it inside a Module to quantize it")
        elif isinstance(module, LoRALinear) and module.merged:
            raise RuntimeError(f"quantize_base: {path} has merged adapters {module.merged_adapters}; "
                               "call lora.unmerge(model) first (quantizing W0 + BA would bake the adapter in)")
        else:
            plan.append((path, module))
    if not plan:
        raise ValueError(
            f"quantize_base: {type(model).__name__} has no frozen Linear weight to quantize "
            f"(skipped: {report.skipped or 'no Linear layers'}); call lora.mark_only_lora_as_trainable(model) first"
        )
    quantized = [(path, module, quant.quantize_nf4(module.weight.data, block_size, double_quant=double_quant))
                 for path, module in plan]
    # All checked and quantized: now change the model.
    weights = []
    for path, module, q in quantized:
        weight = QuantizedWeight(q, buffer)
        weights.append(weight)
        if isinstance(module, LoRALinear):
            module.weight = weight  # Module.__setattr__ drops the Parameter "weight"
        else:
            model.replace_submodule(path, NF4Linear(module, weight))
        report.layers.append(path)
        report.values += q.size
        report.original_bytes += q.size * q.dtype.itemsize
        report.nf4_bytes += quant.nf4_nbytes(q.size, block_size, False)
        report.nf4_double_quant_bytes += quant.nf4_nbytes(q.size, block_size, True)
    report.buffer_bytes = max(min(w.shape[0], w.chunk_rows) * w.shape[1] * w.dtype.itemsize for w in weights)
    return report

