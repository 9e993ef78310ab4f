"""gradcheck: compare a backward pass with float64 central differences.

Modelled on Chainer's ``check_backward``: the upstream gradient is random (an
all-ones gradient hides transposed or swapped backward formulas), every element
of every input that requires grad is checked, inputs that do not require grad
must receive no gradient, and a failure names the input, the worst element, the
two values and the tolerances.
"""

from __future__ import annotations

import numpy as np

from . import backend as bk
from .tensor import Tensor, no_grad

__all__ = ["gradcheck", "GradcheckError"]


class GradcheckError(AssertionError):
    """The analytic gradient disagrees with finite differences (or a rule was broken)."""


def _outputs(fn, inputs):
    out = fn(*inputs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    for o in outs:
        if not isinstance(o, Tensor):
            raise GradcheckError(f"gradcheck: fn must return a Tensor or a tuple of Tensors, got {type(o).__name__}")
    return outs


def _checked_inputs(inputs: list) -> list[int]:
    """The indices of the inputs to check (those that require grad); each must be float64."""
    for i, x in enumerate(inputs):
        if isinstance(x, Tensor) and x.requires_grad and x.dtype != np.float64:
            raise GradcheckError(
                f"gradcheck: input {i} has dtype {x.dtype}; finite differences need float64 "
                "(make the input with dtype='float64' or model.to(dtype='float64'))"
            )
    checked = [i for i, x in enumerate(inputs) if isinstance(x, Tensor) and x.requires_grad]
    if not checked:
        raise GradcheckError("gradcheck: no input requires grad, so there is nothing to check")
    return checked


def _backward(fn, inputs: list, checked: list[int], seed: int) -> tuple[dict, list]:
    """One backward pass from a random upstream gradient g ~ N(0, 1) (seeded): the gradient of
    every checked input, and g on the host in float64. Frozen inputs must receive no gradient."""
    outs = _outputs(fn, inputs)
    rng = np.random.default_rng(seed)
    upstream = [bk.asarray(rng.standard_normal(o.shape), dtype=o.dtype, backend=o.backend) for o in outs]
    for o, g in zip(outs, upstream):
        if o.requires_grad:
            o.backward(g)
    analytic = {i: inputs[i].grad for i in checked}
    for i, x in enumerate(inputs):
        if isinstance(x, Tensor) and not x.requires_grad and x.grad is not None:
            raise GradcheckError(f"gradcheck: input {i} does not require grad but received a gradient")
    return analytic, [bk.to_numpy(g).astype(np.float64) for g in upstream]


def _central_differences(fn, inputs: list, x: Tensor, eps: float, host_upstream: list) -> np.ndarray:
    """dL/dx by (L(x + eps·e_i) - L(x - eps·e_i)) / (2 eps) for every element i of ``x``."""

    def outputs() -> list:
        with no_grad():
            return [bk.to_numpy(o.data).astype(np.float64) for o in _outputs(fn, inputs)]

    def directional(plus, minus) -> float:
        """Σ g·(f(x+ε) − f(x−ε)), subtracting outputs before summing: large outputs that ε does not
        touch (a -1e9 mask fill) cancel exactly instead of drowning the difference in rounding."""
        return sum(float(((p - m) * g).sum()) for p, m, g in zip(plus, minus, host_upstream))

    numeric = np.zeros(x.shape)
    # perturb x.data in place, one element at a time, by its index: works for any
    # strided layout (a transposed or sliced input), not only contiguous arrays
    for index in np.ndindex(*x.shape):
        original = x.data[index].item()
        x.data[index] = original + eps
        plus = outputs()
        x.data[index] = original - eps
        minus = outputs()
        x.data[index] = original
        numeric[index] = directional(plus, minus) / (2 * eps)
    return numeric


def _compare(i: int, shape: tuple, grad: np.ndarray, numeric: np.ndarray, atol: float, rtol: float) -> None:
    """Raise GradcheckError naming input ``i``, its worst element and both values, unless
    |grad - numeric| <= atol + rtol·|numeric| everywhere (and grad is finite)."""
    error = np.abs(grad - numeric)
    bound = atol + rtol * np.abs(numeric)
    if (error > bound).any() or not np.isfinite(grad).all():
        worst = np.unravel_index(int(np.argmax(np.where(np.isfinite(error), error - bound, np.inf))), shape)
        raise GradcheckError(
            f"gradcheck failed for input {i} (shape {tuple(shape)}): at index {tuple(int(k) for k in worst)} "
            f"the analytic gradient is {float(grad[worst])!r} but central differences give {float(numeric[worst])!r} "
            f"(|difference| {error[worst]:.3g} > atol {atol:g} + rtol {rtol:g} * |numeric|); "
            f"{int((error > bound).sum())} of {error.size} elements are off"
        )


def gradcheck(fn, inputs, eps: float = 1e-6, atol: float = 1e-6, rtol: float = 1e-5, seed: int = 0) -> bool:
    """Check ``fn``'s backward against central differences; True, or raise GradcheckError.

    fn: callable taking ``inputs`` (Tensors) and returning a Tensor (or tuple of Tensors).
    The scalar checked is L = Σ_outputs Σ (output ⊙ g) with g ~ N(0, 1) fixed per call,
    so dL/dx = the vector-Jacobian product the backward pass computes. Numeric:
    (L(x + eps·e_i) - L(x - eps·e_i)) / (2 eps) for every element i.
    Passes when |analytic - numeric| <= atol + rtol·|numeric| everywhere.
    """
    inputs = list(inputs)
    checked = _checked_inputs(inputs)
    saved_grads = [x.grad if isinstance(x, Tensor) else None for x in inputs]
    for x in inputs:
        if isinstance(x, Tensor):
            x.grad = None
    try:
        analytic, host_upstream = _backward(fn, inputs, checked, seed)
        for i in checked:
            x = inputs[i]
            grad = analytic[i]
            grad = np.zeros(x.shape) if grad is None else bk.to_numpy(grad)
            _compare(i, x.shape, grad, _central_differences(fn, inputs, x, eps, host_upstream), atol, rtol)
    finally:
        for x, g in zip(inputs, saved_grads):
            if isinstance(x, Tensor):
                x.grad = g
    return True
