"""A 4-bit frozen W₀ under LoRA adapters, as in QLoRA (Dettmers et al. 2023): the weight and its layer.

``QuantizedWeight`` (an NF4 W₀ that ``LoRALinear`` computes with), ``nf4_linear`` and ``NF4Linear``
(a plain Linear on it). ``lora.quantize_base`` (``qlora.py``) puts them into a model.

QLoRA's point: the frozen W₀ is only *read*, so it may be stored in 4 bits and dequantized on
the fly, while the adapters (and all gradients) stay in the compute dtype. For a Linear layer

    h = Ŵ₀x + b (+ s·B·A·x),    Ŵ₀ = dequantize(NF4(W₀))     (Ŵ₀ ≠ W₀: a 4-bit rounding)
    ∂L/∂x = g·Ŵ₀ (+ the LoRA terms),   no ∂L/∂W₀ (W₀ is a constant, not a Parameter)

Forward and backward each dequantize Ŵ₀ again, a chunk of rows at a time, into ONE buffer shared
by all the quantized layers of the model (``chunk_values`` values): the full-precision Ŵ₀ never
exists for more than one chunk at a time, which is where the memory goes. The price is compute:
two dequantizations per layer per step (QLoRA pays the same).

A quantized weight is no longer a Parameter: it leaves ``state_dict()`` and ``named_parameters()``
(the adapters, which are what you save, are unchanged), ``model.to(...)`` does not move it
(quantize after ``model.to``), and it cannot be merged into (W₀ + ΔW would need re-quantizing,
which loses the adapter's precision; serve unmerged, or merge into a float copy of the model).
"""

from __future__ import annotations

import numbers

import numpy as np

from .. import backend as bk
from .. import quant
from ..function import Function
from ..nn import Linear, Module
from ..quant import NF4Tensor

__all__ = ["DequantBuffer", "NF4Linear", "NF4LinearFn", "QuantizedWeight", "check_not_quantized", "nf4_linear",
           "quantized_layers"]


class DequantBuffer:
    """One scratch array shared by every quantized layer of a model: Ŵ₀ is rebuilt here, chunk by chunk."""

    def __init__(self, chunk_values: int = 1 << 16):
        if isinstance(chunk_values, bool) or not isinstance(chunk_values, numbers.Integral) or chunk_values < 1:
            raise ValueError(f"quantize_base: chunk_values must be an integer >= 1, got {chunk_values!r}")
        self.chunk_values = int(chunk_values)
        self._arrays: dict = {}

    def rows(self, n_rows: int, k: int, dtype, backend: str):
        """A (n_rows, k) view of the shared array (its contents are whatever was written last)."""
        key = (backend, np.dtype(dtype))
        flat = self._arrays.get(key)
        if flat is None or flat.size < n_rows * k:
            flat = bk.module_for(backend).empty(max(n_rows * k, self.chunk_values), dtype=dtype)
            self._arrays[key] = flat
        return flat[: n_rows * k].reshape(n_rows, k)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self._arrays.values()))


class QuantizedWeight:
    """A frozen (d, k) weight stored as NF4; ``x Ŵᵀ`` and ``g Ŵ`` dequantize a chunk of rows at a time.

    Has ``shape``, ``dtype`` and ``backend`` like the Parameter it replaces, so shape checks
    and ``add_adapter`` work on it; it has no ``data`` and no gradient. Its ``matmul_t`` and
    ``matmul`` are the weight protocol of ``lora/function.py``: the LoRA and DoRA ops compute
    with it as with an array W₀, without knowing it is NF4.
    """

    requires_grad = False

    def __init__(self, q: NF4Tensor, buffer: DequantBuffer):
        if len(q.shape) != 2:
            raise ValueError(f"QuantizedWeight holds a (out, in) Linear weight, got shape {q.shape}")
        self.q, self.buffer = q, buffer
        self.shape, self.dtype = q.shape, q.dtype
        self._scales = q.block_scales()  # rebuilt once (double quantization): (n_blocks,) float32

    @property
    def backend(self) -> str:
        return self.q.backend

    @property
    def nbytes(self) -> int:
        return self.q.nbytes

    def _chunks(self):
        """(first row, last row + 1, Ŵ[rows] in the shared buffer) for consecutive chunks of rows."""
        d, k = self.shape
        step = max(1, self.buffer.chunk_values // k)
        for r0 in range(0, d, step):
            r1 = min(d, r0 + step)
            rows = self.buffer.rows(r1 - r0, k, self.dtype, self.backend)
            quant.dequantize_range(self.q, r0 * k, r1 * k, out=rows, scales=self._scales)
            yield r0, r1, rows

    def row_norms_sq(self):
        """‖Ŵ₀_i‖² for every row (d,), computed once: the constant part of DoRA's row norms."""
        if getattr(self, "_row_norms_sq", None) is None:
            xp = bk.module_for(self.backend)
            out = xp.empty(self.shape[0], dtype=self.dtype)
            for r0, r1, rows in self._chunks():
                out[r0:r1] = (rows * rows).sum(axis=1)
            self._row_norms_sq = out
        return self._row_norms_sq

    def dequantize(self):
        """Ŵ₀ as a new (d, k) array (for checks and for merging into a float copy)."""
        return quant.dequantize(self.q)

    def _check(self, x):
        if bk.backend_of(x) != self.backend:
            raise bk.BackendMismatchError(
                f"a {self.backend} NF4 weight {self.shape} got a {bk.backend_of(x)} input; quantize the base after "
                "model.to(backend=...) (model.to does not move quantized weights)"
            )

    def matmul_t(self, x2):
        """x Ŵᵀ for rows x2 (N, k) -> (N, d)."""
        self._check(x2)
        xp = bk.get_array_module(x2)
        d, _ = self.shape
        out = xp.empty((x2.shape[0], d), dtype=np.result_type(x2.dtype, self.dtype))
        for r0, r1, rows in self._chunks():
            out[:, r0:r1] = x2 @ rows.T
        return out

    def matmul(self, g2):
        """g Ŵ for rows g2 (N, d) -> (N, k): the input gradient through the dequantized weight."""
        self._check(g2)
        xp = bk.get_array_module(g2)
        out = xp.zeros((g2.shape[0], self.shape[1]), dtype=np.result_type(g2.dtype, self.dtype))
        for r0, r1, rows in self._chunks():
            out += g2[:, r0:r1] @ rows
        return out

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.q!r})"


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
        if "lora_bias" in base._modules:  # an adapter's bias deltas (lora.bias) and the hook that adds them
            self.lora_bias = base._modules["lora_bias"]
            for hook in base.__dict__.get("_forward_hooks", ()):
                self.register_forward_hook(hook)

    def forward(self, x):
        return nf4_linear(x, self.qweight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 block_size={self.qweight.q.block_size}{', double quant' if self.qweight.q.double_quant else ''}")


def quantized_layers(model: Module) -> list:
    """Paths of the layers whose W₀ is stored in NF4 (after ``lora.quantize_base``)."""
    return [p for p, m in model.named_modules()
            if isinstance(m, NF4Linear) or isinstance(getattr(m, "weight", None), QuantizedWeight)]


def check_not_quantized(model: Module, what: str) -> None:
    """Raise before ``what`` writes a model whose base is NF4: its W₀ is no Parameter, so it is in no state_dict."""
    paths = quantized_layers(model)
    if paths:
        raise ValueError(f"{what}: the base is NF4-quantized ({paths[0]} and {len(paths) - 1} more layers store W0 in "
                         "4 bits, outside state_dict()), so the file would lack their weights: save the model before "
                         "lora.quantize_base(model), or save the adapters alone (lora.save_adapter)")
