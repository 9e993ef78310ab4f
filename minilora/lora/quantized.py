"""A 4-bit frozen W₀ under LoRA adapters, as in QLoRA (Dettmers et al. 2023): the layers on an NF4 weight.

``nf4_linear`` (the op y = x Ŵ₀ᵀ + b) and ``NF4Linear`` (a plain Linear on it) compute with a
``quant.QuantizedWeight``, the NF4 W₀ that ``LoRALinear`` computes with too; the NF4 format, the
weight and its chunked dequantization are all in ``minilora/quant.py``. ``lora.quantize_base``
(``qlora.py``) puts them into a model.

QLoRA's point: the frozen W₀ is only *read*, so it may be stored in 4 bits and dequantized on
the fly, while the adapters (and all gradients) stay in the compute dtype. For a Linear layer

    h = Ŵ₀x + b (+ s·B·A·x),    Ŵ₀ = dequantize(NF4(W₀))     (Ŵ₀ ≠ W₀: a 4-bit rounding)
    ∂L/∂x = g·Ŵ₀ (+ the LoRA terms),   no ∂L/∂W₀ (W₀ is a constant, not a Parameter)

Forward and backward each dequantize Ŵ₀ again, a chunk of rows at a time (``QuantizedWeight``):
the full-precision Ŵ₀ never exists for more than one chunk at a time, which is where the memory
goes. The price is compute: two dequantizations per layer per step (QLoRA pays the same).

A quantized weight is no longer a Parameter: it leaves ``state_dict()`` and ``named_parameters()``
(the adapters, which are what you save, are unchanged), ``model.to(...)`` does not move it
(quantize after ``model.to``), and it cannot be merged into (W₀ + ΔW would need re-quantizing,
which loses the adapter's precision; serve unmerged, or merge into a float copy of the model).
"""

from __future__ import annotations

from ..function import Function
from ..nn import Linear, Module
from ..quant import DequantBuffer, QuantizedWeight, check_not_quantized, quantized_layers  # noqa: F401

__all__ = ["DequantBuffer", "NF4Linear", "NF4LinearFn", "QuantizedWeight", "check_not_quantized", "nf4_linear",
           "quantized_layers"]


class NF4LinearFn(Function):
    """y = x Ŵ₀ᵀ + b with Ŵ₀ = dequantize(q).   dx = g Ŵ₀,   db = Σ_rows g,   and nothing for Ŵ₀."""

    def forward(self, x, bias, weight=None):
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(f"nf4_linear: input has {x.shape[-1]} features (shape {tuple(x.shape)}) but the NF4 weight "
                             f"{weight.shape} expects {weight.shape[1]}")
        x2 = x.reshape(-1, x.shape[-1])
        y = weight.matmul_t(x2)
        if bias is not None:
            y += bias
        self.weight, self.in_shape = weight, x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])

    def backward(self, grad):
        need_x, need_b = self.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        dx = self.weight.matmul(g).reshape(self.in_shape) if need_x else None
        db = g.sum(axis=0) if need_b else None
        return dx, db


def nf4_linear(x, weight: QuantizedWeight, bias=None):
    """y = x Ŵᵀ + b for an NF4 weight (no weight gradient: it is frozen by construction)."""
    return NF4LinearFn.apply(x, bias, weight=weight)


class NF4Linear(Module):
    """A frozen nn.Linear whose weight is stored in NF4; the bias stays a Parameter."""

    def __init__(self, base: Linear, weight: QuantizedWeight):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.qweight = weight  # not a Parameter: no gradient, not in state_dict()
        self.bias = base.bias
        deltas = getattr(base, "lora_bias", None)
        if deltas is not None:  # adapters' bias deltas (lora.bias) move with the layer, and so does their hook
            self.lora_bias = deltas
            self.register_forward_hook(deltas)

    def forward(self, x):
        return nf4_linear(x, self.qweight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 block_size={self.qweight.q.block_size}{', double quant' if self.qweight.q.double_quant else ''}")
