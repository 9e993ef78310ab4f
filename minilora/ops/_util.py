"""Helpers shared by the primitive ops: turning Python numbers and arrays into operands."""

from __future__ import annotations

import numpy as np

from .. import backend as bk
from ..tensor import Tensor, is_float_dtype


def operands(a, b):
    """Make a binary op's inputs agree: constants take the tensor's dtype, float dtypes must match.

    ``x * 2.0`` keeps x's float32 (a NumPy float64 scalar would upcast it), and an integer
    or boolean mask multiplied into a float tensor is cast to that float dtype. Two float
    tensors of different precision are an error rather than a silent upcast.
    """
    ref = a if isinstance(a, Tensor) else b
    a, b = _operand(a, ref), _operand(b, ref)
    da, db = _dtype(a), _dtype(b)
    if da != db:
        if is_float_dtype(da) and is_float_dtype(db):
            raise TypeError(
                f"dtype mismatch: {da} and {db}; minilora never upcasts silently, convert one side "
                "first (tensor.astype(...) or model.to(dtype=...))"
            )
        if is_float_dtype(da):
            b = _data(b).astype(da)
        elif is_float_dtype(db):
            a = _data(a).astype(db)
    bk.get_array_module(_data(a), _data(b))  # raises BackendMismatchError for host + device operands
    return a, b


def _dtype(x):
    return x.dtype


def _data(x):
    return x.data if isinstance(x, Tensor) else x


def _operand(x, ref: Tensor):
    if isinstance(x, np.generic):  # a NumPy scalar (np.float64(0.5)) counts as a plain number
        x = x.item()
    if isinstance(x, Tensor) or hasattr(x, "shape"):
        return x  # tensors and arrays as they are (mixing backends is caught by the op)
    xp = bk.module_for(ref.backend)
    if isinstance(x, (bool, int, float)) and is_float_dtype(ref.dtype):
        return xp.asarray(x, dtype=ref.dtype)  # a Python number takes the tensor's float dtype
    return xp.asarray(x)


def expand_to(grad, shape):
    """A fresh writable array of ``shape`` filled by broadcasting ``grad``."""
    xp = bk.get_array_module(grad)
    out = xp.empty(shape, dtype=grad.dtype)
    out[...] = grad
    return out
