"""Shape primitives: reshape, transpose, swapaxes, broadcast_to, indexing, concatenate, stack, split."""

from __future__ import annotations

from .. import backend as bk
from ..backend import get_array_module
from ..function import Function, unbroadcast
from ..tensor import Tensor


class Reshape(Function):
    def forward(self, x, shape):
        self.in_shape = x.shape
        try:
            return x.reshape(shape)
        except ValueError:
            raise ValueError(f"cannot reshape a tensor of shape {x.shape} ({x.size} elements) into {tuple(shape)}") from None

    def backward(self, grad):
        return grad.reshape(self.in_shape)


class Transpose(Function):
    def forward(self, x, axes=None):
        self.axes = tuple(reversed(range(x.ndim))) if axes is None else tuple(a % x.ndim for a in axes)
        return x.transpose(self.axes)

    def backward(self, grad):
        inverse = [0] * len(self.axes)
        for i, a in enumerate(self.axes):
            inverse[a] = i
        return grad.transpose(inverse)


class SwapAxes(Function):
    def forward(self, x, axis1, axis2):
        self.pair = (axis1, axis2)
        return x.swapaxes(axis1, axis2)

    def backward(self, grad):
        return grad.swapaxes(*self.pair)


class BroadcastTo(Function):
    def forward(self, x, shape):
        self.in_shape = x.shape
        return get_array_module(x).broadcast_to(x, shape)

    def backward(self, grad):
        return unbroadcast(grad, self.in_shape)


def _is_basic_index(key) -> bool:
    """Slices, integers, None and Ellipsis select each element at most once."""
    parts = key if isinstance(key, tuple) else (key,)
    return all(p is None or p is Ellipsis or isinstance(p, (int, slice)) for p in parts)


class GetItem(Function):
    """x[key]; backward scatters the gradient back, adding up repeated integer indices."""

    def forward(self, x, key):
        self.in_shape, self.key = x.shape, key
        return x[key]

    def backward(self, grad):
        xp = get_array_module(grad)
        out = xp.zeros(self.in_shape, dtype=grad.dtype)
        if _is_basic_index(self.key):
            out[self.key] = grad
        else:
            bk.scatter_add(out, self.key, grad)  # x[[0, 0]] sends both gradients to x[0]
        return out


class Concatenate(Function):
    def forward(self, *xs, axis=0):
        self.axis = axis
        self.sizes = [x.shape[axis] for x in xs]
        return get_array_module(*xs).concatenate(xs, axis=axis)

    def backward(self, grad):
        xp = get_array_module(grad)
        offsets, total = [], 0
        for n in self.sizes[:-1]:
            total += n
            offsets.append(total)
        return tuple(xp.split(grad, offsets, axis=self.axis))


class Stack(Function):
    def forward(self, *xs, axis=0):
        self.axis = axis
        return get_array_module(*xs).stack(xs, axis=axis)

    def backward(self, grad):
        moved = get_array_module(grad).moveaxis(grad, self.axis, 0)
        return tuple(moved[i] for i in range(moved.shape[0]))


# ------------------------------------------------------------------ the functions users call
def reshape(x, shape):
    return Reshape.apply(x, shape=tuple(shape) if not isinstance(shape, int) else (shape,))


def transpose(x, axes=None):
    return Transpose.apply(x, axes=axes)


def swapaxes(x, axis1, axis2):
    return SwapAxes.apply(x, axis1=axis1, axis2=axis2)


def broadcast_to(x, shape):
    return BroadcastTo.apply(x, shape=tuple(shape))


def _raw_key(key, backend):
    """Tensors used as indices become their integer arrays; lists become arrays of the tensor's backend."""
    if isinstance(key, Tensor):
        return key.data
    if isinstance(key, tuple):
        return tuple(k.data if isinstance(k, Tensor) else k for k in key)
    if isinstance(key, list):
        return bk.module_for(backend).asarray(key)
    return key


def getitem(x, key):
    return GetItem.apply(x, key=_raw_key(key, x.backend))


def _same_dtype(op, tensors):
    """Joining float32 with float64 would upcast silently (and break the float32 backward)."""
    dtypes = sorted({str(t.dtype) for t in tensors})
    if len(dtypes) > 1:
        raise TypeError(
            f"{op}: dtype mismatch: {' and '.join(dtypes)}; minilora never upcasts silently, convert "
            "them to one dtype first (tensor.astype(...))"
        )


def _join(op, fn, tensors, axis):
    """``fn`` (Concatenate or Stack) on one or more tensors of one dtype."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{op} needs at least one tensor")
    _same_dtype(op, tensors)
    return fn.apply(*tensors, axis=axis)


def concatenate(tensors, axis=0):
    return _join("concatenate", Concatenate, tensors, axis)


def stack(tensors, axis=0):
    return _join("stack", Stack, tensors, axis)


def split(x, indices_or_sections, axis=0):
    """Split along ``axis`` into equal sections (an int) or at the given indices (a list)."""
    n = x.shape[axis]
    if isinstance(indices_or_sections, int):
        if n % indices_or_sections:
            raise ValueError(f"split: axis {axis} of length {n} does not divide into {indices_or_sections} equal parts")
        step = n // indices_or_sections
        bounds = list(range(0, n + 1, step))
    else:
        bounds = [0, *indices_or_sections, n]
    index = [slice(None)] * x.ndim
    parts = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        index[axis] = slice(start, stop)
        parts.append(getitem(x, tuple(index)))
    return parts
