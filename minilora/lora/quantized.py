"""A 4-bit frozen base under LoRA adapters, as in QLoRA (Dettmers et al. 2023): ``lora.quantize_base``.

    lora.apply_lora(model, cfg); lora.mark_only_lora_as_trainable(model)
    report = lora.quantize_base(model, "nf4", block_size=64)   # every frozen Linear weight -> NF4
    report.original_bytes, report.nf4_bytes, report.nf4_double_quant_bytes
    loss = model.loss(idx, targets); loss.backward()          # A and B learn; W0 stays 4-bit

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
from dataclasses import dataclass, field

import numpy as np

from .. import backend as bk
from .. import quant
from ..function import Function
from ..nn import Linear, Module, Parameter
from ..quant import NF4Tensor

__all__ = ["NF4Linear", "NF4LinearFn", "QuantizationReport", "QuantizedWeight", "nf4_linear", "quantize_base"]

METHODS = ("nf4",)


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
    and ``add_adapter`` keep working; it has no ``data`` and no gradient.
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


def _nf4_nbytes(size: int, block_size: int, double_quant: bool, dq_block_size: int = 256) -> int:
    n_blocks = -(-size // block_size)
    codes = n_blocks * block_size // 2
    if double_quant:
        return codes + n_blocks + 4 * -(-n_blocks // dq_block_size) + 4
    return codes + 4 * n_blocks


def quantize_base(model: Module, method: str = "nf4", block_size: int = 64, double_quant: bool = False,
                  chunk_values: int = 1 << 16) -> QuantizationReport:
    """Store every frozen Linear weight of ``model`` in NF4 (QLoRA); returns a QuantizationReport.

    Frozen means ``requires_grad=False``: call ``lora.mark_only_lora_as_trainable(model)`` first.
    Plain ``nn.Linear`` layers become ``NF4Linear``; a ``LoRALinear``'s W₀ becomes a
    ``QuantizedWeight`` under its adapters. A weight shared by several modules is left alone
    (listed in ``report.skipped``). All checks run before anything changes.
    """
    from .layer import LoRALinear  # noqa: PLC0415 - layer.py imports this module for the quantized path

    if method not in METHODS:
        raise ValueError(f"quantize_base: unknown quantization {method!r}; the methods are {METHODS} "
                         "(4-bit NormalFloat, QLoRA)")
    quant._check_block_size(block_size)
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
    for path, module, q in quantized:
        weight = QuantizedWeight(q, buffer)
        if isinstance(module, LoRALinear):
            module.weight = weight  # Module.__setattr__ drops the Parameter "weight"
        else:
            _replace(model, path, NF4Linear(module, weight))
        report.layers.append(path)
        report.values += q.size
        report.original_bytes += q.size * q.dtype.itemsize
        report.nf4_bytes += _nf4_nbytes(q.size, block_size, False)
        report.nf4_double_quant_bytes += _nf4_nbytes(q.size, block_size, True)
    report.buffer_bytes = max(min(q.shape[0], max(1, buffer.chunk_values // q.shape[1])) * q.shape[1]
                              * q.dtype.itemsize for _, _, q in quantized)
    return report


def _replace(model: Module, path: str, new: Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = dict(model.named_modules())[parent_path] if parent_path else model
    parent._modules[attr] = new  # an existing key keeps its place: parameter order is unchanged
    object.__setattr__(parent, attr, new)
