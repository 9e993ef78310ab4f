"""Elementwise primitives: forward and hand-written backward side by side."""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..function import Function, unbroadcast
from ..tensor import Tensor
from ._util import operands


class Add(Function):
    def forward(self, a, b):
        self.shapes = (a.shape, b.shape)
        return a + b

    def backward(self, grad):
        sa, sb = self.shapes
        need_a, need_b = self.needs_input_grad
        return (unbroadcast(grad, sa) if need_a else None, unbroadcast(grad, sb) if need_b else None)


class Sub(Function):
    def forward(self, a, b):
        self.shapes = (a.shape, b.shape)
        return a - b

    def backward(self, grad):
        sa, sb = self.shapes
        need_a, need_b = self.needs_input_grad
        return (unbroadcast(grad, sa) if need_a else None, unbroadcast(-grad, sb) if need_b else None)


class Mul(Function):
    def forward(self, a, b):
        self.save_for_backward(a, b)
        return a * b

    def backward(self, grad):
        a, b = self.saved
        need_a, need_b = self.needs_input_grad
        return (
            unbroadcast(grad * b, a.shape) if need_a else None,
            unbroadcast(grad * a, b.shape) if need_b else None,
        )


class Div(Function):
    def forward(self, a, b):
        self.save_for_backward(a, b)
        return a / b

    def backward(self, grad):
        a, b = self.saved
        need_a, need_b = self.needs_input_grad
        grad_over_b = grad / b
        return (
            unbroadcast(grad_over_b, a.shape) if need_a else None,
            unbroadcast(-grad_over_b * a / b, b.shape) if need_b else None,
        )


class Neg(Function):
    def forward(self, x):
        return -x

    def backward(self, grad):
        return -grad


def _power(x, p):
    """x**p with the cheap spellings for common exponents (``a ** 3`` calls pow per element)."""
    if p == 1:
        return x
    if p == 2:
        return x * x
    if p == 3:
        return x * x * x
    if p == 0.5:
        return get_array_module(x).sqrt(x)
    if p == -1:
        return 1 / x
    return x**p


class Pow(Function):
    """x ** p for a constant (Python number) exponent p: d/dx = p x^(p-1)."""

    def forward(self, x, exponent):
        self.exponent = exponent
        self.save_for_backward(x)
        return _power(x, exponent)

    def backward(self, grad):
        (x,) = self.saved
        p = self.exponent
        if p == 0:  # x ** 0 is constant; 0 * x ** -1 would be NaN at x = 0
            return get_array_module(grad).zeros_like(grad)
        return grad * (p * _power(x, p - 1))


class Exp(Function):
    def forward(self, x):
        y = get_array_module(x).exp(x)
        self.save_for_backward(y)
        return y

    def backward(self, grad):
        (y,) = self.saved
        return grad * y


class Log(Function):
    def forward(self, x):
        self.save_for_backward(x)
        return get_array_module(x).log(x)

    def backward(self, grad):
        (x,) = self.saved
        return grad / x


class Tanh(Function):
    def forward(self, x):
        y = get_array_module(x).tanh(x)
        self.save_for_backward(y)
        return y

    def backward(self, grad):
        (y,) = self.saved
        return grad * (1 - y * y)


class Sqrt(Function):
    def forward(self, x):
        y = get_array_module(x).sqrt(x)
        self.save_for_backward(y)
        return y

    def backward(self, grad):
        (y,) = self.saved
        return grad / (2 * y)


class Maximum(Function):
    """Elementwise max; at ties the gradient is split evenly (as PyTorch does)."""

    def forward(self, a, b):
        self.save_for_backward(a, b)
        return get_array_module(a, b).maximum(a, b)

    def backward(self, grad):
        a, b = self.saved
        share_a = (a > b) + 0.5 * (a == b)  # 1 where a wins, 1/2 at a tie, 0 where b wins
        share_a = share_a.astype(grad.dtype, copy=False)
        need_a, need_b = self.needs_input_grad
        return (
            unbroadcast(grad * share_a, a.shape) if need_a else None,
            unbroadcast(grad * (1 - share_a), b.shape) if need_b else None,
        )


class Relu(Function):
    def forward(self, x):
        self.positive = x > 0
        return x * self.positive

    def backward(self, grad):
        return grad * self.positive


class AsType(Function):
    """Change dtype; the gradient is cast back to the input's dtype."""

    def forward(self, x, dtype):
        self.input_dtype = x.dtype
        return x.astype(dtype)

    def backward(self, grad):
        return grad.astype(self.input_dtype)


class Where(Function):
    """where(condition, a, b): condition is a boolean array and gets no gradient."""

    def forward(self, condition, a, b):
        self.condition = condition
        self.shapes = (a.shape, b.shape)
        return get_array_module(condition, a, b).where(condition, a, b)

    def backward(self, grad):
        xp = get_array_module(grad)
        _, need_a, need_b = self.needs_input_grad
        sa, sb = self.shapes
        return (
            None,
            unbroadcast(xp.where(self.condition, grad, 0), sa) if need_a else None,
            unbroadcast(xp.where(self.condition, 0, grad), sb) if need_b else None,
        )


# ------------------------------------------------------------------ the functions users call
def add(a, b):
    return Add.apply(*operands(a, b))


def sub(a, b):
    return Sub.apply(*operands(a, b))


def mul(a, b):
    return Mul.apply(*operands(a, b))


def div(a, b):
    return Div.apply(*operands(a, b))


def neg(x):
    return Neg.apply(x)


def pow(x, exponent):  # noqa: A001  (NumPy's name)
    if not isinstance(exponent, (int, float)):
        raise TypeError(f"pow takes a constant Python number as exponent, got {type(exponent).__name__}")
    return Pow.apply(x, exponent=exponent)


def exp(x):
    return Exp.apply(x)


def log(x):
    return Log.apply(x)


def tanh(x):
    return Tanh.apply(x)


def sqrt(x):
    return Sqrt.apply(x)


def maximum(a, b):
    return Maximum.apply(*operands(a, b))


def relu(x):
    return Relu.apply(x)


def astype(x, dtype):
    """Cast to ``dtype``; a cast to an integer or boolean dtype leaves the graph (no gradient)."""
    if not np.issubdtype(np.dtype(dtype), np.floating):
        return Tensor._from_op(x.data.astype(dtype), False)
    return AsType.apply(x, dtype=dtype)


def where(condition, a, b):
    """Elementwise ``a`` where ``condition`` else ``b`` (condition: bool array or Tensor)."""
    condition = condition.data if isinstance(condition, Tensor) else condition  # a device array's .data is memory
    a, b = operands(a, b)
    return Where.apply(condition, a, b)


def masked_fill(x, mask, value):
    """``x`` with ``value`` wherever ``mask`` is True (the mask gets no gradient)."""
    return where(mask, value, x)
