"""4-bit NormalFloat (NF4) quantization of a frozen weight, as in QLoRA (Dettmers et al. 2023, arXiv 2305.14314).

    from minilora import quant
    q = quant.quantize_nf4(W, block_size=64)           # codes: uint8, two 4-bit codes per byte
    W_hat = quant.dequantize(q)                        # absmax_b · NF4_LEVELS[code], same shape and dtype as W
    q.nbytes, W.nbytes                                 # 0.5 + 4/64 bytes per value against 4 (float32)
    q2 = quant.quantize_nf4(W, double_quant=True)      # the absmax values themselves in 8 bits (Sec. 3)

The recipe (QLoRA, Sec. 3 "4-bit NormalFloat Quantization" and "Double Quantization"):

1. Flatten W (row-major) and cut it into blocks of ``block_size`` values (64 in the paper).
   The last block is padded with zeros when the size is not a multiple of the block size.
2. Per block b, the scale is the absolute maximum c_b = max |W_i| over the block, so every
   W_i / c_b lies in [-1, 1].
3. Each normalised value is replaced by the index of the NEAREST of the 16 NF4 levels
   (``NF4_LEVELS``: quantiles of N(0, 1) rescaled to [-1, 1], with an exact 0 and 8 levels on the
   positive side, 7 on the negative one). Two 4-bit indices are packed into one byte.
4. Dequantization is the table lookup times the block's scale: Ŵ_i = c_b · NF4_LEVELS[code_i].

Memory per value: 4 bits of code + 32/64 = 0.5 bits of float32 scale = 4.5 bits.
Double quantization stores the scales in 8 bits instead: the mean of the c_b is subtracted (they
are all positive), and the centred values are quantized per block of 256 scales with their own
float32 absmax, giving 8/64 + 32/(64·256) ≈ 0.127 bits per value instead of 0.5 (≈ 4.127 bits in
all). The paper quantizes c_b to 8-bit *floats*; here the 8-bit codes are linear (round to one of
the 255 integers −127..127 times absmax/127), which is simpler to read and has the same storage.

The frozen W₀ of a QLoRA layer is only *read*, so it is stored in 4 bits and dequantized on
the fly: ``QuantizedWeight`` computes x Ŵ₀ᵀ and g Ŵ₀ a chunk of rows at a time, in ONE buffer
(``DequantBuffer``) shared by all the quantized layers of a model, so the full-precision Ŵ₀ never
exists for more than one chunk at a time. ``lora.quantize_base`` puts such weights into a model;
``check_not_quantized`` refuses to write a model holding one (its W₀ is in no state_dict).

Everything runs on NumPy or CuPy (``bk.get_array_module``); the quantized weight lives on the
backend of the weight it came from.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from . import backend as bk
from .tensor import Tensor

__all__ = ["NF4_LEVELS", "DequantBuffer", "NF4Tensor", "QuantizationError", "QuantizedWeight", "check_block_size",
           "check_not_quantized", "dequantize", "dequantize_range", "nf4_nbytes", "quantize_nf4", "quantized_layers"]

# The 16 NF4 values, exactly as published (QLoRA, Appendix E; the float32 table of bitsandbytes).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
ZERO_CODE = NF4_LEVELS.index(0.0)  # 7: the code of the zero padding
_DQ_LEVELS = 127  # double quantization: centred scales become integers in [-127, 127]


class QuantizationError(ValueError):
    """A weight or a setting that NF4 quantization cannot take (the message says why and what to do)."""


@dataclass
class NF4Tensor:
    """A weight in NF4: packed codes plus per-block scales (or their 8-bit double quantization).

    codes: uint8, shape (ceil(n / block_size) · block_size / 2,): element 2j in the high nibble
        of byte j, element 2j+1 in the low nibble.
    absmax: float32 (n_blocks,), the block scales c_b; None when double quantized, where
        absmax_codes (int8, (n_blocks,)), absmax_scales (float32, one per ``dq_block_size``
        scales) and absmax_offset (the subtracted mean) hold them instead.
    shape, dtype: those of the original weight; block_size: values per block.
    """

    codes: object
    absmax: object
    shape: tuple
    dtype: np.dtype
    block_size: int
    absmax_codes: object = None
    absmax_scales: object = None
    absmax_offset: float = 0.0
    dq_block_size: int = 256

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.size // self.block_size)

    @property
    def double_quant(self) -> bool:
        return self.absmax_codes is not None

    @property
    def backend(self) -> str:
        return bk.backend_of(self.codes)

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed codes plus the scales (8-bit codes + their float32 scales when double quantized)."""
        return nf4_nbytes(self.size, self.block_size, self.double_quant, self.dq_block_size)

    def block_scales(self):
        """The c_b used to dequantize: ``absmax``, or its reconstruction from the 8-bit codes (float32)."""
        if not self.double_quant:
            return self.absmax
        xp = bk.get_array_module(self.absmax_codes)
        per_scale = xp.repeat(self.absmax_scales, self.dq_block_size)[: self.n_blocks]
        scales = self.absmax_codes.astype(np.float32) * (per_scale / np.float32(_DQ_LEVELS))
        scales += np.float32(self.absmax_offset)
        return scales

    def to(self, backend: str) -> NF4Tensor:
        """A copy on another backend ('numpy' or 'cupy')."""
        def move(a):
            return None if a is None else bk.asarray(bk.to_numpy(a), backend=backend)

        return NF4Tensor(move(self.codes), move(self.absmax), self.shape, self.dtype, self.block_size,
                         move(self.absmax_codes), move(self.absmax_scales), self.absmax_offset, self.dq_block_size)

    def __repr__(self) -> str:
        dq = f", double_quant (blocks of {self.dq_block_size})" if self.double_quant else ""
        return (f"NF4Tensor(shape={self.shape}, dtype={self.dtype}, block_size={self.block_size}{dq}, "
                f"{self.nbytes:,} bytes)")


def nf4_nbytes(size: int, block_size: int = 64, double_quant: bool = False, dq_block_size: int = 256) -> int:
    """Bytes of ``size`` values in NF4, as ``quantize_nf4`` stores them (``NF4Tensor.nbytes``).

    4-bit codes, padded to whole blocks, plus a float32 absmax per block; double quantized, an
    8-bit absmax per block, a float32 scale per ``dq_block_size`` blocks and the float32 offset.
    """
    n_blocks = -(-size // block_size)
    codes = n_blocks * block_size // 2
    if double_quant:
        return codes + n_blocks + 4 * -(-n_blocks // dq_block_size) + 4
    return codes + 4 * n_blocks


def check_block_size(block_size, what: str = "block_size") -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or block_size < 2 or block_size % 2:
        raise QuantizationError(
            f"quantize_nf4: {what} must be an even integer >= 2 (two 4-bit codes share a byte, and a block "
            f"never splits a byte), got {block_size!r}; QLoRA uses 64"
        )
    return int(block_size)


def _levels(xp, dtype):
    return xp.asarray(np.asarray(NF4_LEVELS, dtype=dtype))


def nearest_level(normalised):
    """Index of the nearest NF4 level for each value in [-1, 1] (ties go to the lower level)."""
    xp = bk.get_array_module(normalised)
    levels = np.asarray(NF4_LEVELS, dtype=np.float64)
    midpoints = xp.asarray((levels[1:] + levels[:-1]) / 2.0)
    return xp.searchsorted(midpoints, normalised, side="left").astype(np.uint8)


def quantize_nf4(W, block_size: int = 64, double_quant: bool = False, dq_block_size: int = 256) -> NF4Tensor:
    """Quantize ``W`` (an array or Tensor of floats, any shape) to NF4 with per-block absmax scales.

    The normalised value W_i / c_b is compared with the levels in float64, so the chosen code is
    the nearest level to the exact ratio; c_b is stored in float32, as in QLoRA.
    """
    data = W.data if isinstance(W, Tensor) else W
    xp = bk.get_array_module(data)
    data = xp.asarray(data)
    if not np.issubdtype(data.dtype, np.floating):
        raise QuantizationError(f"quantize_nf4: the weight must hold floats, got dtype {data.dtype}")
    if data.size == 0:
        raise QuantizationError(f"quantize_nf4: the weight of shape {tuple(data.shape)} is empty; nothing to quantize")
    block_size = check_block_size(block_size)
    if double_quant:
        dq_block_size = check_block_size(dq_block_size, "dq_block_size")
    if not bool(xp.isfinite(data).all()):
        bad = int((~xp.isfinite(data)).sum())
        raise QuantizationError(f"quantize_nf4: the weight of shape {tuple(data.shape)} has {bad} NaN/inf values; "
                                "a block's absmax would be inf or NaN")
    n = data.size
    n_blocks = -(-n // block_size)
    flat = xp.zeros(n_blocks * block_size, dtype=np.float64)
    flat[:n] = data.reshape(-1)
    blocks = flat.reshape(n_blocks, block_size)
    absmax = xp.abs(blocks).max(axis=1).astype(np.float32)  # (n_blocks,)
    safe = xp.where(absmax > 0, absmax, np.float32(1.0)).astype(np.float64)  # an all-zero block: codes of 0
    codes = nearest_level(blocks / safe[:, None]).reshape(-1)
    packed = (codes[0::2] << 4) | codes[1::2]
    q = NF4Tensor(packed.astype(np.uint8), absmax, tuple(data.shape), np.dtype(data.dtype), block_size)
    if double_quant:
        q = _double_quantize(q, dq_block_size)
    return q


def _double_quantize(q: NF4Tensor, dq_block_size: int) -> NF4Tensor:
    """Store the block scales in 8 bits: subtract their mean, then absmax-quantize per ``dq_block_size`` scales."""
    xp = bk.get_array_module(q.absmax)
    absmax = q.absmax.astype(np.float64)
    offset = float(np.float32(float(absmax.mean())))  # a host float (CuPy: no implicit conversion)
    n_groups = -(-absmax.size // dq_block_size)
    centred = xp.zeros(n_groups * dq_block_size, dtype=np.float64)
    centred[: absmax.size] = absmax - offset
    groups = centred.reshape(n_groups, dq_block_size)
    scales = xp.abs(groups).max(axis=1).astype(np.float32)  # (n_groups,)
    safe = xp.where(scales > 0, scales, np.float32(1.0)).astype(np.float64)
    codes8 = xp.rint(groups / safe[:, None] * _DQ_LEVELS).reshape(-1)[: absmax.size].astype(np.int8)
    return NF4Tensor(q.codes, None, q.shape, q.dtype, q.block_size, codes8, scales, offset, dq_block_size)


def _unpack(codes, lo: int, hi: int):
    """The 4-bit codes of flat elements lo..hi-1 (uint8, one per element)."""
    xp = bk.get_array_module(codes)
    packed = codes[lo // 2: (hi + 1) // 2]
    both = xp.empty((packed.size, 2), dtype=np.uint8)
    both[:, 0] = packed >> 4
    both[:, 1] = packed & 0x0F
    start = lo % 2
    return both.reshape(-1)[start: start + (hi - lo)]


def dequantize_range(q: NF4Tensor, lo: int, hi: int, out=None, scales=None):
    """Flat elements lo..hi-1 of Ŵ = c_b · NF4_LEVELS[code] (in the weight's dtype), written into ``out`` if given.

    ``scales`` may pass ``q.block_scales()`` computed once (it costs a pass when double quantized).
    """
    if not 0 <= lo <= hi <= q.size:
        raise IndexError(f"dequantize_range: [{lo}, {hi}) is outside the {q.size} values of the weight {q.shape}")
    xp = bk.get_array_module(q.codes)
    scales = q.block_scales() if scales is None else scales
    b0, b1 = lo // q.block_size, -(-hi // q.block_size)
    per_value = xp.repeat(scales[b0:b1].astype(q.dtype), q.block_size)[lo - b0 * q.block_size: hi - b0 * q.block_size]
    levels = _levels(xp, q.dtype)[_unpack(q.codes, lo, hi)]
    if out is None:
        out = xp.empty(hi - lo, dtype=q.dtype)
    elif out.size != hi - lo or out.dtype != q.dtype:
        raise ValueError(f"dequantize_range: out must hold {hi - lo} values of {q.dtype}, got {out.size} of {out.dtype}")
    xp.multiply(levels, per_value, out=out.reshape(-1))
    return out


def dequantize(q: NF4Tensor, out=None):
    """Ŵ = c_b · NF4_LEVELS[code] for every value: an array of the original shape and dtype."""
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"dequantize takes what quantize_nf4 returned (an NF4Tensor), got {type(q).__name__}")
    xp = bk.get_array_module(q.codes)
    if out is None:
        out = xp.empty(q.shape, dtype=q.dtype)
    elif tuple(out.shape) != q.shape:
        raise ValueError(f"dequantize: out has shape {tuple(out.shape)}, the weight {q.shape}")
    dequantize_range(q, 0, q.size, out=out)
    return out


# ----------------------------------------------------------------------------- an NF4 W₀ that computes
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

    @property
    def chunk_rows(self) -> int:
        """Rows of Ŵ₀ dequantized at a time: as many as ``chunk_values`` holds, at least one."""
        return max(1, self.buffer.chunk_values // self.shape[1])

    def _chunks(self):
        """(first row, last row + 1, Ŵ[rows] in the shared buffer) for consecutive chunks of rows."""
        d, k = self.shape
        step = self.chunk_rows
        for r0 in range(0, d, step):
            r1 = min(d, r0 + step)
            rows = self.buffer.rows(r1 - r0, k, self.dtype, self.backend)
            dequantize_range(self.q, r0 * k, r1 * k, out=rows, scales=self._scales)
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
        return dequantize(self.q)

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


def quantized_layers(model) -> list:
    """Paths of the modules of ``model`` that hold a ``QuantizedWeight`` (their W₀, after ``lora.quantize_base``)."""
    return [p for p, m in model.named_modules() if any(isinstance(v, QuantizedWeight) for v in vars(m).values())]


def check_not_quantized(model, what: str) -> None:
    """Raise before ``what`` writes a model whose base is NF4: its W₀ is no Parameter, so it is in no state_dict."""
    paths = quantized_layers(model)
    if paths:
        raise ValueError(f"{what}: the base is NF4-quantized ({paths[0]} and {len(paths) - 1} more layers store W0 in "
                         "4 bits, outside state_dict()), so the file would lack their weights: save the model before "
                         "lora.quantize_base(model), or save the adapters alone (lora.save_adapter)")
