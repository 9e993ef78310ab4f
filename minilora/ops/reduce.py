"""Reductions: sum, mean, max over an axis (or all), with keepdims."""

from __future__ import annotations

from ..backend import get_array_module
from ..function import Function
from ._util import expand_to


def _normalize_axis(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of bounds for a tensor of {ndim} dimensions")
    return tuple(a % ndim for a in axes)


def _keepdims_shape(shape, axes):
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


class Sum(Function):
    def forward(self, x, axis=None, keepdims=False):
        self.in_shape = x.shape
        self.axes = _normalize_axis(axis, x.ndim)
        return get_array_module(x).asarray(x.sum(axis=self.axes, keepdims=keepdims))

    def backward(self, grad):
        # every input element contributed once: broadcast the gradient back over the summed axes
        return expand_to(grad.reshape(_keepdims_shape(self.in_shape, self.axes)), self.in_shape)


class Mean(Function):
    def forward(self, x, axis=None, keepdims=False):
        self.in_shape = x.shape
        self.axes = _normalize_axis(axis, x.ndim)
        self.count = 1
        for a in self.axes:
            self.count *= x.shape[a]
        return get_array_module(x).asarray(x.mean(axis=self.axes, keepdims=keepdims))

    def backward(self, grad):
        return expand_to(grad.reshape(_keepdims_shape(self.in_shape, self.axes)) / self.count, self.in_shape)


class Max(Function):
    """Max over axes; the gradient goes to the maximal elements, split evenly at ties."""

    def forward(self, x, axis=None, keepdims=False):
        self.axes = _normalize_axis(axis, x.ndim)
        m = x.max(axis=self.axes, keepdims=True)
        winners = (x == m).astype(x.dtype)
        self.share = winners / winners.sum(axis=self.axes, keepdims=True)
        out = m if keepdims else m.reshape([n for i, n in enumerate(x.shape) if i not in self.axes])
        return get_array_module(x).asarray(out)

    def backward(self, grad):
        return self.share * grad.reshape(_keepdims_shape(self.share.shape, self.axes))


def sum(x, axis=None, keepdims=False):  # noqa: A001
    return Sum.apply(x, axis=axis, keepdims=keepdims)


def mean(x, axis=None, keepdims=False):
    return Mean.apply(x, axis=axis, keepdims=keepdims)


def max(x, axis=None, keepdims=False):  # noqa: A001
    return Max.apply(x, axis=axis, keepdims=keepdims)
