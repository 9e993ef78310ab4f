"""The Function base class: one node of the autograd graph.

An op is a subclass with ``forward`` and ``backward`` side by side; ``Exp`` in
``ops/elementwise.py`` is the shortest (forward saves y = eˣ, backward returns grad · y).
``forward`` receives raw arrays (and keyword parameters) and returns one array;
``backward`` receives the gradient of the output and returns one gradient per
positional input (or ``None`` where no gradient is needed). Both work on raw
arrays only: the graph is built by ``Function.apply``, never inside an op.
"""

from __future__ import annotations

import numpy as np

from .tensor import Tensor, is_grad_enabled

__all__ = ["Function", "unbroadcast"]


class Function:
    inputs: tuple = ()
    needs_input_grad: tuple = ()
    saved: tuple = ()
    # True where every array ``backward`` returns is new and referenced by nothing else (a matmul's
    # output, say): the autograd may then add a later gradient into it in place.
    fresh_grads: bool = False

    @classmethod
    def apply(cls, *inputs, **params):
        """Run ``forward`` on the inputs' arrays and link the result into the graph.

        Positional inputs are Tensors (or None / plain arrays, which get no gradient);
        keyword ``params`` are passed to ``forward`` unchanged.
        """
        fn = cls()
        needs = tuple(isinstance(x, Tensor) and x.requires_grad for x in inputs)
        record = is_grad_enabled() and any(needs)
        fn.needs_input_grad = needs if record else (False,) * len(inputs)
        out = fn.forward(*[x.data if isinstance(x, Tensor) else x for x in inputs], **params)
        if isinstance(out, np.generic):  # NumPy reductions of 0-d arrays return scalars; keep arrays
            out = np.asarray(out)
        result = Tensor._from_op(out, record)
        if record:
            fn.inputs = inputs
            result.creator = fn
        else:
            fn.saved = ()  # nothing will call backward: drop what forward saved
        return result

    def save_for_backward(self, *arrays) -> None:
        self.saved = arrays

    def forward(self, *arrays, **params):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} has no forward")

    def backward(self, grad):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} has no backward")

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


def unbroadcast(grad, shape):
    """Sum ``grad`` back to ``shape``: the backward of NumPy broadcasting.

    Broadcasting prepends axes and stretches axes of length 1; their gradients are
    the sums over those axes. Every binary op's backward goes through here.
    """
    shape = tuple(shape)
    if grad.shape == shape:
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and grad.shape[lead + i] != 1
    )
    return grad.sum(axis=axes, keepdims=True).reshape(shape)
