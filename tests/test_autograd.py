"""The autograd engine itself: graph traversal, accumulation, grad modes, and gradcheck's rules."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
from conftest import assert_close

import minilora as ml
from minilora.function import Function


def leaf(values, backend="numpy", dtype="float64", requires_grad=True):
    return ml.tensor(np.asarray(values, dtype=np.float64), dtype=dtype, requires_grad=requires_grad, backend=backend)


# ----------------------------------------------------------------------------- deep graphs
def test_ten_thousand_deep_chain_needs_no_recursion(backend):
    """micrograd's recursive sort would hit the recursion limit; minilora sorts with a stack."""
    x = leaf([0.5, -1.0], backend)
    y = x
    for _ in range(5_000):
        y = y * 1.0001
        y = y + 0.001
    assert sys.getrecursionlimit() < 10_000  # so a recursive engine would fail here
    y.sum().backward()
    factor = 1.0001 ** 5_000
    shift = 0.001 * sum(1.0001 ** k for k in range(5_000))
    assert_close(y.data, np.array([0.5, -1.0]) * factor + shift, rtol=1e-10)
    assert_close(x.grad, np.full(2, factor), rtol=1e-10)


# ----------------------------------------------------------------------------- accumulation
def test_tensor_used_twice_in_one_op_accumulates(backend):
    x = leaf([1.5, -2.0, 3.0], backend)
    (x * x).sum().backward()
    assert_close(x.grad, 2 * np.array([1.5, -2.0, 3.0]))
    x.grad = None
    (x + x).sum().backward()
    assert_close(x.grad, np.full(3, 2.0))


def test_diamond_graph_adds_both_paths(backend):
    """x feeds a and b, which meet again in c: dc/dx = b·da/dx + a·db/dx."""
    values = np.array([0.3, -0.7])
    x = leaf(values, backend)
    a = x * 2.0
    b = x.exp()
    c = a * b
    d = (c + a).sum()  # a is used twice as well
    d.backward()
    assert_close(x.grad, 2 * np.exp(values) + 2 * values * np.exp(values) + 2.0, rtol=1e-12)


def test_shared_intermediate_used_by_many_consumers(backend):
    x = leaf([1.0, 2.0], backend)
    h = x * 3.0
    total = h.sum() + (h * h).sum() + h.mean()
    total.backward()
    h_values = 3.0 * np.array([1.0, 2.0])
    assert_close(x.grad, 3.0 * (1.0 + 2 * h_values + 0.5))


def test_gradients_accumulate_across_backward_calls(backend):
    x = leaf([1.0, -2.0], backend)
    (x * 3.0).sum().backward()
    first = np.array(ml.backend.to_numpy(x.grad))
    (x * x).sum().backward()
    assert_close(first, [3.0, 3.0])
    assert_close(x.grad, np.array([3.0, 3.0]) + 2 * np.array([1.0, -2.0]))
    x.zero_grad()
    assert x.grad is None


def test_backward_twice_through_the_same_graph_accumulates(backend):
    x = leaf([2.0], backend)
    y = (x * x).sum()
    y.backward()
    y.backward()
    assert_close(x.grad, [8.0])


def test_user_gradient_array_is_not_aliased_into_grad(backend):
    """Accumulating later must not write into an array the caller still holds."""
    x = leaf([1.0, 2.0], backend)
    g = ml.backend.asarray(np.array([1.0, 1.0]), backend=backend)
    for y in (x + 0.0, x.reshape(2), x):  # ops whose backward may hand the upstream array through
        y.backward(g)
        y.backward(g)
    assert_close(g, [1.0, 1.0])
    assert_close(x.grad, [6.0, 6.0])


# ----------------------------------------------------------------------------- grad modes
def test_no_grad_builds_no_graph(backend):
    x = leaf([1.0, 2.0], backend)
    with ml.no_grad():
        assert not ml.is_grad_enabled()
        y = (x * x).exp().sum()
    assert ml.is_grad_enabled()
    assert y.requires_grad is False and y.creator is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()


def test_no_grad_is_restored_after_an_exception():
    with pytest.raises(ZeroDivisionError), ml.no_grad():
        raise ZeroDivisionError("inside the block")
    assert ml.is_grad_enabled()


def test_enable_grad_inside_no_grad():
    x = leaf([1.0])
    with ml.no_grad():
        with ml.enable_grad():
            y = x * 2.0
        z = x * 2.0
    assert y.requires_grad and y.creator is not None
    assert not z.requires_grad


def test_detach_stops_gradients(backend):
    x = leaf([1.0, 2.0], backend)
    w = leaf([3.0, 4.0], backend)
    d = w.detach()
    assert d.requires_grad is False and d.creator is None
    assert d.data is w.data  # same storage, cut from the graph
    (x * d).sum().backward()
    assert_close(x.grad, [3.0, 4.0])
    assert w.grad is None


def test_operations_on_constants_do_not_require_grad(backend):
    c = leaf([1.0, 2.0], backend, requires_grad=False)
    y = (c * 2.0).exp()
    assert not y.requires_grad and y.creator is None


def test_only_inputs_that_require_grad_receive_one(backend):
    x = leaf([1.0, 2.0], backend)
    frozen = leaf([5.0, 6.0], backend, requires_grad=False)
    (x * frozen).sum().backward()
    assert_close(x.grad, [5.0, 6.0])
    assert frozen.grad is None


# ----------------------------------------------------------------------------- backward() errors
def test_backward_on_a_non_scalar_without_grad_raises(backend):
    y = leaf([[1.0, 2.0]], backend) * 2.0
    with pytest.raises(RuntimeError, match=r"one-element output.*\(1, 2\)"):
        y.backward()


def test_backward_on_a_one_element_non_scalar_is_allowed(backend):
    x = leaf([[3.0]], backend)
    (x * x).backward()
    assert_close(x.grad, [[6.0]])


def test_backward_with_a_gradient_of_the_wrong_shape_raises(backend):
    y = leaf([1.0, 2.0, 3.0], backend) * 2.0
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\)"):
        y.backward(np.ones(2))


def test_backward_with_an_explicit_gradient(backend):
    x = leaf([1.0, 2.0, 3.0], backend)
    (x * 2.0).backward(ml.backend.asarray(np.array([1.0, 0.0, -1.0]), backend=backend))
    assert_close(x.grad, [2.0, 0.0, -2.0])


def test_a_backward_that_returns_the_wrong_shape_is_reported():
    class BadSum(Function):
        def forward(self, x):
            return x.sum()

        def backward(self, grad):
            return grad  # forgot to expand back to x's shape

    x = leaf([1.0, 2.0])
    with pytest.raises(RuntimeError, match=r"BadSum.backward.*shape \(\).*shape \(2,\)"):
        BadSum.apply(x).backward()


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", ["int64", "int32", "bool"])
def test_integer_and_boolean_tensors_cannot_require_grad(dtype):
    with pytest.raises(TypeError, match="floating"):
        ml.tensor(np.array([1, 0]), dtype=dtype, requires_grad=True)


# ----------------------------------------------------------------------------- gradcheck
def test_gradcheck_accepts_a_correct_backward(backend):
    x = leaf(np.linspace(-1, 1, 6).reshape(2, 3), backend)
    w = leaf(np.linspace(0.5, 2, 12).reshape(3, 4), backend)
    assert ml.gradcheck(lambda a, b: (a @ b).tanh(), [x, w]) is True


def test_gradcheck_catches_the_planted_bug_and_names_input_index_and_values():
    """a * a.detach() has forward a² but backward a (not 2a): the classic missing path."""
    a = leaf([[0.5, -1.0, 2.0], [1.5, -0.25, 0.75]])
    with pytest.raises(ml.GradcheckError) as info:
        ml.gradcheck(lambda a: (a * a.detach()).sum(), [a])
    message = str(info.value)
    assert "input 0" in message and "(2, 3)" in message
    match = re.search(
        r"at index \((\d+), (\d+)\) the analytic gradient is (?:np\.float64\()?([-+0-9.e]+)\)? "
        r"but central differences give (?:np\.float64\()?([-+0-9.e]+)",
        message,
    )
    assert match, message
    row, col = int(match.group(1)), int(match.group(2))
    analytic, numeric = float(match.group(3)), float(match.group(4))
    assert 0 <= row < 2 and 0 <= col < 3
    # the worst element is the largest |a|: the true gradient is twice what backward said
    assert (row, col) == (0, 2)
    assert numeric == pytest.approx(2 * analytic, rel=1e-5)
    assert "atol" in message and "rtol" in message


def test_gradcheck_uses_a_random_upstream_gradient():
    """A backward that ignores its upstream gradient is right only for an all-ones upstream."""
    class ForgetsUpstream(Function):
        def forward(self, x):
            return x * 2.0

        def backward(self, grad):
            return np.full_like(grad, 2.0)  # should be grad * 2

    x = leaf([1.0, 2.0, 3.0])
    with pytest.raises(ml.GradcheckError, match="input 0"):
        ml.gradcheck(lambda x: ForgetsUpstream.apply(x), [x])


def test_gradcheck_checks_every_input():
    class SwapsGradients(Function):
        def forward(self, a, b):
            self.save_for_backward(a, b)
            return a * b

        def backward(self, grad):
            a, b = self.saved
            return grad * a, grad * b  # swapped: should be grad * b, grad * a

    a, b = leaf([1.0, 2.0]), leaf([3.0, 5.0])
    with pytest.raises(ml.GradcheckError, match="input 0"):
        ml.gradcheck(lambda a, b: SwapsGradients.apply(a, b), [a, b])


def test_gradcheck_refuses_float32_inputs():
    x = leaf([1.0, 2.0], dtype="float32")
    with pytest.raises(ml.GradcheckError, match="float64"):
        ml.gradcheck(lambda x: x * x, [x])


def test_gradcheck_needs_an_input_that_requires_grad():
    x = leaf([1.0, 2.0], requires_grad=False)
    with pytest.raises(ml.GradcheckError, match="nothing to check"):
        ml.gradcheck(lambda x: x * x, [x])


def test_gradcheck_asserts_frozen_inputs_get_no_gradient():
    def leaks_into_frozen(a, b):
        b.grad = np.ones_like(b.data)  # a buggy op writing a gradient into a frozen input
        return a * b

    a, frozen = leaf([1.0, 2.0]), leaf([3.0, 4.0], requires_grad=False)
    with pytest.raises(ml.GradcheckError, match="input 1 does not require grad but received a gradient"):
        ml.gradcheck(leaks_into_frozen, [a, frozen])


def test_gradcheck_leaves_frozen_inputs_and_existing_grads_alone():
    a, frozen = leaf([1.0, 2.0]), leaf([3.0, 4.0], requires_grad=False)
    a.grad = np.array([7.0, 7.0])
    assert ml.gradcheck(lambda a, b: (a * b).exp(), [a, frozen])
    assert frozen.grad is None
    assert_close(a.grad, [7.0, 7.0])  # restored: gradcheck does not disturb training state
    assert_close(a.data, [1.0, 2.0])  # and the perturbed inputs are put back exactly


def test_gradcheck_handles_tuple_outputs_and_non_contiguous_inputs():
    base = np.arange(12.0).reshape(3, 4) / 7
    x = ml.tensor(base.T, requires_grad=True)  # a transposed view: not C-contiguous
    assert not x.data.flags.c_contiguous
    assert ml.gradcheck(lambda x: tuple(ml.split(x * x, 2, axis=0)), [x])
    assert_close(x.data, base.T)
