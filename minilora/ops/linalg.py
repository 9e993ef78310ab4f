"""Matrix multiplication with batch dimensions that broadcast, as ``numpy.matmul``."""

from __future__ import annotations

from ..backend import get_array_module
from ..function import Function, unbroadcast
from ._util import operands


def _mm(a, b):
    """a @ b, folding a's leading dims into one when b is a plain matrix.

    BLAS gets one (N, k) @ (k, n) call instead of a loop over a batch of
    small products (docs/performance.md has the figure).
    """
    if b.ndim == 2 and a.ndim > 2:
        return (a.reshape(-1, a.shape[-1]) @ b).reshape(*a.shape[:-1], b.shape[-1])
    return a @ b


class MatMul(Function):
    """C = A @ B; dA = dC @ Bᵀ, dB = Aᵀ @ dC (summed over broadcast batch dims)."""

    def forward(self, a, b):
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError(f"matmul needs arrays of at least one dimension, got shapes {a.shape} and {b.shape}")
        k_a = a.shape[-1]
        k_b = b.shape[-2] if b.ndim > 1 else b.shape[0]
        if k_a != k_b:
            raise ValueError(
                f"matmul shape mismatch: {tuple(a.shape)} @ {tuple(b.shape)}; the last dimension of the "
                f"left operand ({k_a}) must equal the {'second-to-last' if b.ndim > 1 else 'only'} dimension "
                f"of the right operand ({k_b})"
            )
        batch_a, batch_b = a.shape[:-2], b.shape[:-2]
        for n_a, n_b in zip(reversed(batch_a), reversed(batch_b)):
            if n_a != n_b and 1 not in (n_a, n_b):
                raise ValueError(
                    f"matmul shape mismatch: {tuple(a.shape)} @ {tuple(b.shape)}; the batch dimensions "
                    f"{tuple(batch_a)} and {tuple(batch_b)} do not broadcast together"
                )
        self.shapes = (a.shape, b.shape)
        # 1-D operands behave as in NumPy: a vector is a (1, k) row on the left, a (k, 1) column on the right.
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        self.save_for_backward(a2, b2)
        return get_array_module(a, b).matmul(a, b) if (a.ndim == 1 or b.ndim == 1) else _mm(a2, b2)

    def backward(self, grad):
        a, b = self.saved
        shape_a, shape_b = self.shapes
        need_a, need_b = self.needs_input_grad
        # restore the axes the 1-D operands dropped: b's column axis (last) first, then a's row
        # axis (second to last), so vector @ vector (a 0-d output) becomes (1, 1)
        if len(shape_b) == 1:
            grad = grad[..., None]
        if len(shape_a) == 1:
            grad = grad[..., None, :]
        grad_a = grad_b = None
        if need_a:
            grad_a = unbroadcast(_mm(grad, b.swapaxes(-1, -2)), a.shape).reshape(shape_a)
        if need_b:
            if a.ndim > 2 and b.ndim == 2:  # fold the batch: (N, k)ᵀ @ (N, n) in one BLAS call
                grad_b = a.reshape(-1, a.shape[-1]).T @ grad.reshape(-1, grad.shape[-1])
            else:
                grad_b = unbroadcast(a.swapaxes(-1, -2) @ grad, b.shape)
            grad_b = grad_b.reshape(shape_b)
        return grad_a, grad_b


def matmul(a, b):
    return MatMul.apply(*operands(a, b))
