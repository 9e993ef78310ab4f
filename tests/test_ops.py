"""Every primitive op, specified ONCE, checked on every backend.

The table ``OPS`` holds one ``OpSpec`` per primitive (or per important variant, such as
each kind of index): how minilora calls it, what NumPy computes for it, what PyTorch
calls it (used by tests/oracle), and the hypothesis strategy that draws valid inputs.
Two tests run over the whole table on each backend: the forward equals the NumPy
reference, and ``ml.gradcheck`` accepts the hand-written backward (float64). The rest of
the file checks what the table cannot: dtype rules, un-broadcasting, and bad inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from conftest import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import (
    arrays,
    basic_index,
    boolean_index,
    broadcast_from,
    broadcastable_pair,
    grid,
    integer_array_index,
    masks,
    matmul_pair,
    nonzero,
    positives,
    reals,
    reduction_axis,
    reshape_target,
    shapes,
)

import minilora as ml
from minilora import backend as bk
from minilora.function import unbroadcast


@dataclass(frozen=True)
class OpSpec:
    """One primitive: ``forward(*tensors, **params)`` must equal ``reference(*arrays, **params)``.

    ``cases`` draws ``(arrays, params)``: a tuple of float64 input arrays (each becomes a
    Tensor that requires grad) and a dict of constant parameters (axis, key, exponent...).
    ``torch_fn(torch, *torch_tensors, **params)`` is the PyTorch counterpart for the oracle.
    """

    name: str
    forward: Callable
    reference: Callable
    torch_fn: Callable
    cases: st.SearchStrategy
    gradcheck_tolerances: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


# ----------------------------------------------------------------------------- input strategies
@st.composite
def unary(draw, elements=None, unique=False):
    return (draw(arrays(draw(shapes()), elements, unique=unique)),), {}


@st.composite
def binary(draw, left=None, right=None):
    shape_a, shape_b = draw(broadcastable_pair())
    return (draw(arrays(shape_a, left)), draw(arrays(shape_b, right))), {}


@st.composite
def matmul_case(draw):
    shape_a, shape_b = draw(matmul_pair())
    return (draw(arrays(shape_a)), draw(arrays(shape_b))), {}


@st.composite
def reduction_case(draw, distinct=False):
    """distinct: values >= 1/32 apart, so max has one winner and finite differences see no kink."""
    shape = draw(shapes())
    x = draw(arrays(shape, grid() if distinct else None, unique=distinct))
    return (x,), {"axis": draw(reduction_axis(len(shape))), "keepdims": draw(st.booleans())}


@st.composite
def reshape_case(draw):
    shape = draw(shapes())
    return (draw(arrays(shape)),), {"shape": draw(reshape_target(shape))}


@st.composite
def transpose_case(draw):
    shape = draw(shapes())
    axes = None
    if shape and draw(st.booleans()):
        axes = tuple(a - len(shape) if draw(st.booleans()) else a for a in draw(st.permutations(range(len(shape)))))
    return (draw(arrays(shape)),), {"axes": axes}


@st.composite
def swapaxes_case(draw):
    shape = draw(shapes(min_dims=1))
    pick = st.integers(-len(shape), len(shape) - 1)
    return (draw(arrays(shape)),), {"axis1": draw(pick), "axis2": draw(pick)}


@st.composite
def broadcast_to_case(draw):
    target = draw(shapes(max_dims=4))
    return (draw(arrays(draw(broadcast_from(target)))),), {"shape": target}


@st.composite
def getitem_case(draw, keys, min_dims=0):
    shape = draw(shapes(min_dims=min_dims))
    return (draw(arrays(shape)),), {"key": draw(keys(shape))}


@st.composite
def concatenate_case(draw):
    shape = list(draw(shapes(min_dims=1)))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    parts = []
    for _ in range(draw(st.integers(2, 3))):
        shape[axis] = draw(st.integers(1, 3))
        parts.append(draw(arrays(tuple(shape))))
    return tuple(parts), {"axis": axis}


@st.composite
def stack_case(draw):
    shape = draw(shapes())
    axis = draw(st.integers(-len(shape) - 1, len(shape)))
    return tuple(draw(arrays(shape)) for _ in range(draw(st.integers(2, 3)))), {"axis": axis}


@st.composite
def split_case(draw):
    shape = draw(shapes(min_dims=1))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    n = shape[axis]
    if draw(st.booleans()):
        sections = draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))  # equal parts
    else:
        sections = sorted(draw(st.lists(st.integers(0, n), min_size=1, max_size=3)))  # cut points
    return (draw(arrays(shape)),), {"sections": sections, "axis": axis}


@st.composite
def where_case(draw):
    target = draw(shapes())
    a, b, c = (draw(broadcast_from(target)) for _ in range(3))
    return (draw(arrays(a)), draw(arrays(b))), {"condition": draw(masks(c))}


@st.composite
def masked_fill_case(draw):
    shape = draw(shapes())
    return (draw(arrays(shape)),), {
        "mask": draw(masks(draw(broadcast_from(shape)))),
        "value": draw(st.sampled_from([0.0, -1e9, 2.5])),
    }


@st.composite
def astype_case(draw):
    return (draw(arrays(draw(shapes()))),), {"dtype": draw(st.sampled_from(["float64", "float32"]))}


# ----------------------------------------------------------------------------- helpers the table uses
def _transpose(x, axes):
    return x.transpose() if axes is None else x.transpose(*axes)


def _torch_permute(t, axes):
    return t.permute(tuple(reversed(range(t.ndim))) if axes is None else tuple(a % t.ndim for a in axes))


def torch_dims(ndim, axis):
    """PyTorch's ``dim=`` for NumPy's ``axis=`` (None = every axis)."""
    return tuple(range(ndim)) if axis is None else axis


def torch_index(torch, t, key):
    """``t[key]`` in PyTorch for a NumPy key; negative steps (which torch lacks) via flat positions."""
    parts = key if isinstance(key, tuple) else (key,)
    if any(isinstance(p, slice) and p.step is not None and p.step < 0 for p in parts):
        positions = np.arange(t.numel()).reshape(tuple(t.shape))[key]
        return t.reshape(-1)[torch.as_tensor(np.array(positions, order="C"))]  # np.array keeps 0-d
    converted = tuple(torch.as_tensor(p) if isinstance(p, np.ndarray) else p for p in parts)
    return t[converted if isinstance(key, tuple) else converted[0]]


def _pow(exponent, elements):
    return OpSpec(
        f"pow[{exponent}]",
        forward=lambda x: x ** exponent,
        reference=lambda x: np.power(x, exponent),
        torch_fn=lambda torch, x: x ** exponent,
        cases=unary(elements),
    )


# ----------------------------------------------------------------------------- THE table
OPS = [
    OpSpec("add", lambda a, b: a + b, np.add, lambda torch, a, b: a + b, binary()),
    OpSpec("sub", lambda a, b: a - b, np.subtract, lambda torch, a, b: a - b, binary()),
    OpSpec("mul", lambda a, b: a * b, np.multiply, lambda torch, a, b: a * b, binary()),
    OpSpec("div", lambda a, b: a / b, np.divide, lambda torch, a, b: a / b, binary(right=nonzero())),
    OpSpec("neg", lambda x: -x, np.negative, lambda torch, x: -x, unary()),
    _pow(0, reals()),
    _pow(2, reals()),
    _pow(3, reals()),
    _pow(0.5, positives()),
    _pow(-1, nonzero()),
    _pow(1.7, positives()),
    OpSpec("exp", lambda x: x.exp(), np.exp, lambda torch, x: torch.exp(x), unary()),
    OpSpec("log", lambda x: x.log(), np.log, lambda torch, x: torch.log(x), unary(positives())),
    OpSpec("tanh", lambda x: x.tanh(), np.tanh, lambda torch, x: torch.tanh(x), unary()),
    OpSpec("sqrt", lambda x: x.sqrt(), np.sqrt, lambda torch, x: torch.sqrt(x), unary(positives())),
    # the two sides live on grids offset by half a step: they never tie, so no kink is crossed
    OpSpec("maximum", ml.maximum, np.maximum, lambda torch, a, b: torch.maximum(a, b),
           binary(grid(), grid(offset=1 / 64))),
    OpSpec("relu", ml.relu, lambda x: np.maximum(x, 0.0), lambda torch, x: torch.relu(x),
           unary(nonzero(min_abs=0.05))),
    OpSpec("matmul", lambda a, b: a @ b, np.matmul, lambda torch, a, b: torch.matmul(a, b), matmul_case()),
    OpSpec("sum", lambda x, axis, keepdims: x.sum(axis=axis, keepdims=keepdims),
           lambda x, axis, keepdims: np.sum(x, axis=axis, keepdims=keepdims),
           lambda torch, x, axis, keepdims: torch.sum(x, dim=torch_dims(x.ndim, axis), keepdim=keepdims),
           reduction_case()),
    OpSpec("mean", lambda x, axis, keepdims: x.mean(axis=axis, keepdims=keepdims),
           lambda x, axis, keepdims: np.mean(x, axis=axis, keepdims=keepdims),
           lambda torch, x, axis, keepdims: torch.mean(x, dim=torch_dims(x.ndim, axis), keepdim=keepdims),
           reduction_case()),
    OpSpec("max", lambda x, axis, keepdims: x.max(axis=axis, keepdims=keepdims),
           lambda x, axis, keepdims: np.max(x, axis=axis, keepdims=keepdims),
           # amax, not max(dim): amax splits the gradient between tied maxima, as minilora does
           lambda torch, x, axis, keepdims: torch.amax(x, dim=torch_dims(x.ndim, axis), keepdim=keepdims),
           reduction_case(distinct=True)),
    OpSpec("reshape", lambda x, shape: x.reshape(shape), np.reshape,
           lambda torch, x, shape: x.reshape(shape), reshape_case()),
    OpSpec("transpose", _transpose, np.transpose, lambda torch, x, axes: _torch_permute(x, axes), transpose_case()),
    OpSpec("swapaxes", lambda x, axis1, axis2: x.swapaxes(axis1, axis2), np.swapaxes,
           lambda torch, x, axis1, axis2: torch.swapaxes(x, axis1, axis2), swapaxes_case()),
    OpSpec("broadcast_to", lambda x, shape: x.broadcast_to(shape), np.broadcast_to,
           lambda torch, x, shape: torch.broadcast_to(x, shape), broadcast_to_case()),
    OpSpec("getitem[basic]", lambda x, key: x[key], lambda x, key: x[key], torch_index,
           getitem_case(basic_index)),
    OpSpec("getitem[int-array]", lambda x, key: x[key], lambda x, key: x[key], torch_index,
           getitem_case(integer_array_index, min_dims=1)),
    OpSpec("getitem[bool-mask]", lambda x, key: x[key], lambda x, key: x[key], torch_index,
           getitem_case(boolean_index, min_dims=1)),
    OpSpec("concatenate", lambda *xs, axis: ml.concatenate(xs, axis=axis),
           lambda *xs, axis: np.concatenate(xs, axis=axis),
           lambda torch, *xs, axis: torch.cat(xs, dim=axis), concatenate_case()),
    OpSpec("stack", lambda *xs, axis: ml.stack(xs, axis=axis), lambda *xs, axis: np.stack(xs, axis=axis),
           lambda torch, *xs, axis: torch.stack(xs, dim=axis), stack_case()),
    OpSpec("split", lambda x, sections, axis: ml.split(x, sections, axis=axis),
           lambda x, sections, axis: np.split(x, sections, axis=axis),
           lambda torch, x, sections, axis: torch.tensor_split(x, sections, dim=axis), split_case()),
    OpSpec("where", lambda a, b, condition: ml.where(condition, a, b),
           lambda a, b, condition: np.where(condition, a, b),
           lambda torch, a, b, condition: torch.where(torch.as_tensor(condition), a, b), where_case()),
    OpSpec("masked_fill", lambda x, mask, value: ml.masked_fill(x, mask, value),
           lambda x, mask, value: np.where(mask, value, x),
           lambda torch, x, mask, value: x.masked_fill(torch.as_tensor(mask), value), masked_fill_case()),
    # a float32 round trip is exact only to ~1e-7, so finite differences need a wider step here
    OpSpec("astype", lambda x, dtype: x.astype(dtype), lambda x, dtype: x.astype(dtype),
           lambda torch, x, dtype: x.to(getattr(torch, dtype)), astype_case(),
           gradcheck_tolerances={"eps": 1e-3, "atol": 1e-3, "rtol": 1e-3}),
]
OPS_BY_NAME = {spec.name: spec for spec in OPS}


# ----------------------------------------------------------------------------- running a spec
def as_list(out):
    """An op's output(s) as a list (split returns several tensors)."""
    return list(out) if isinstance(out, (list, tuple)) else [out]


def on_backend(params, backend):
    """Array-valued params (index arrays, masks, conditions) moved onto ``backend``."""
    def move(v):
        if isinstance(v, np.ndarray):
            return bk.asarray(v, backend=backend)
        if isinstance(v, tuple):
            return tuple(move(p) for p in v)
        return v

    return {k: move(v) for k, v in params.items()}


def make_inputs(arrays_, backend, dtype=None):
    return [ml.tensor(a if dtype is None else a.astype(dtype), requires_grad=True, backend=backend) for a in arrays_]


def upstream_for(outputs, seed=0):
    """A random (never all-ones) upstream gradient for each output, on its backend and dtype."""
    rng = np.random.default_rng(seed)
    return [bk.asarray(rng.standard_normal(o.shape), dtype=o.dtype, backend=o.backend) for o in outputs]


# ----------------------------------------------------------------------------- the two table tests
@pytest.mark.parametrize("spec", OPS, ids=str)
@given(data=st.data())
def test_forward_matches_numpy(spec, backend, data):
    arrays_, params = data.draw(spec.cases, label="(inputs, params)")
    out = spec.forward(*make_inputs(arrays_, backend), **on_backend(params, backend))
    expected = spec.reference(*arrays_, **params)
    outs, expected = as_list(out), as_list(expected)
    assert len(outs) == len(expected)
    for o, e in zip(outs, expected):
        e = np.asarray(e)
        assert isinstance(o, ml.Tensor) and o.backend == backend
        assert tuple(o.shape) == e.shape and o.dtype == e.dtype
        assert o.requires_grad
        assert_close(o.data, e, rtol=1e-12, atol=1e-12, what=spec.name)


@pytest.mark.parametrize("spec", OPS, ids=str)
@given(data=st.data())
def test_backward_passes_gradcheck(spec, backend, data):
    arrays_, params = data.draw(spec.cases, label="(inputs, params)")
    params = on_backend(params, backend)
    inputs = make_inputs(arrays_, backend)
    assert ml.gradcheck(lambda *xs: spec.forward(*xs, **params), inputs, **spec.gradcheck_tolerances)


def test_table_covers_every_primitive():
    exported = {"add", "sub", "mul", "div", "neg", "pow", "exp", "log", "tanh", "sqrt", "maximum", "relu",
                "matmul", "sum", "mean", "max", "reshape", "transpose", "swapaxes", "broadcast_to", "getitem",
                "concatenate", "stack", "split", "where", "masked_fill", "astype"}
    covered = {spec.name.split("[")[0] for spec in OPS}
    assert exported <= covered, f"ops without a spec: {sorted(exported - covered)}"
    assert set(ml.ops.__dict__) >= exported


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("spec", OPS, ids=str)
@settings(max_examples=4)
@given(data=st.data())
def test_float32_in_float32_out_and_grads(spec, backend, data):
    arrays_, params = data.draw(spec.cases, label="(inputs, params)")
    inputs = make_inputs(arrays_, backend, dtype=np.float32)
    outs = as_list(spec.forward(*inputs, **on_backend(params, backend)))
    expected = np.dtype(params.get("dtype", np.float32))  # astype changes the dtype on purpose
    for o, g in zip(outs, upstream_for(outs)):
        assert o.dtype == expected, f"{spec.name}: float32 inputs gave a {o.dtype} output"
        o.backward(g)
    for i, x in enumerate(inputs):
        assert x.grad is not None, f"{spec.name}: input {i} got no gradient"
        assert x.grad.dtype == np.float32, f"{spec.name}: input {i} got a {x.grad.dtype} gradient"
        assert tuple(x.grad.shape) == tuple(x.shape)


SCALAR_EXPRESSIONS = {
    "x + 2.0": lambda x: x + 2.0,
    "2.0 + x": lambda x: 2.0 + x,
    "x - 1": lambda x: x - 1,
    "1 - x": lambda x: 1 - x,
    "x * 0.5": lambda x: x * 0.5,
    "3 * x": lambda x: 3 * x,
    "x / 3": lambda x: x / 3,
    "1.0 / x": lambda x: 1.0 / x,
    "x ** 2": lambda x: x ** 2,
    "x ** 0.5": lambda x: x ** 0.5,
    "maximum(x, 0.0)": lambda x: ml.maximum(x, 0.0),
    "where(c, x, 0.0)": lambda x: ml.where(x.data > 1.0, x, 0.0),
    "masked_fill(x, m, -1e9)": lambda x: ml.masked_fill(x, x.data > 1.0, -1e9),
    "x.mean()": lambda x: x.mean(),
}


@pytest.mark.parametrize("expression", SCALAR_EXPRESSIONS)
def test_python_scalars_do_not_upcast(expression, backend):
    x = ml.tensor(np.array([0.5, 1.5, 2.5]), dtype="float32", requires_grad=True, backend=backend)
    y = SCALAR_EXPRESSIONS[expression](x)
    assert y.dtype == np.float32, f"{expression} gave {y.dtype}"
    y.sum().backward()
    assert x.grad.dtype == np.float32


def test_python_float_lists_become_float32_and_int_lists_stay_int():
    assert ml.tensor([1.0, 2.0]).dtype == np.float32
    assert ml.tensor([1, 2]).dtype == np.int64
    assert ml.tensor(np.zeros(2)).dtype == np.float64  # arrays keep their dtype


MIXED = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "maximum": ml.maximum,
    "matmul": lambda a, b: a @ b,
    "where": lambda a, b: ml.where(np.array([True, False]), a, b),
    "concatenate": lambda a, b: ml.concatenate([a, b]),
    "stack": lambda a, b: ml.stack([a, b]),
}


@pytest.mark.parametrize("op", MIXED)
def test_mixing_float32_and_float64_raises_type_error(op, backend):
    a = ml.tensor(np.ones(2), dtype="float32", requires_grad=True, backend=backend)
    b = ml.tensor(np.ones(2), dtype="float64", requires_grad=True, backend=backend)
    for left, right in ((a, b), (b, a)):
        with pytest.raises(TypeError, match=r"(?s)float(32|64).*float(32|64)") as info:
            MIXED[op](left, right)
        assert "float32" in str(info.value) and "float64" in str(info.value)
        assert "astype" in str(info.value)  # the message says what to do


# ----------------------------------------------------------------------------- un-broadcasting
@given(data=st.data())
def test_unbroadcast_sums_over_the_broadcast_axes(backend, data):
    big = data.draw(shapes(max_dims=4), label="broadcast shape")
    small = data.draw(broadcast_from(big), label="original shape")
    grad = data.draw(arrays(big), label="grad")
    # reference: broadcasting copies element i of `small` into every position labelled i;
    # its adjoint adds the gradients of all positions that carry the label i
    labels = np.broadcast_to(np.arange(int(np.prod(small))).reshape(small), big)
    expected = np.bincount(labels.ravel(), weights=grad.ravel(), minlength=int(np.prod(small)))
    result = unbroadcast(bk.asarray(grad, backend=backend), small)
    assert tuple(result.shape) == small
    assert_close(result, expected.reshape(small), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("shape_a, shape_b", [((2, 3), (4, 5)), ((3,), (4,)), ((2, 3), (2,)), ((2, 3, 4), (5, 4, 2))])
def test_matmul_shape_mismatch_names_both_shapes(shape_a, shape_b, backend):
    a = ml.tensor(np.ones(shape_a), backend=backend)
    b = ml.tensor(np.ones(shape_b), backend=backend)
    with pytest.raises(ValueError) as info:
        a @ b
    assert str(shape_a) in str(info.value) and str(shape_b) in str(info.value)


def test_matmul_of_a_scalar_raises():
    with pytest.raises(ValueError, match="at least one dimension"):
        ml.tensor(np.float64(2.0)) @ ml.tensor(np.ones(2))


def test_reshape_mismatch_raises_with_the_shapes(backend):
    x = ml.tensor(np.ones((2, 3)), backend=backend)
    with pytest.raises(ValueError, match=r"\(2, 3\).*6 elements.*\(4, 2\)"):
        x.reshape(4, 2)


@pytest.mark.parametrize("exponent", [ml.tensor(2.0), np.ones(3)], ids=["tensor", "array"])
def test_pow_with_a_non_constant_exponent_raises_type_error(exponent):
    x = ml.tensor(np.ones(3), requires_grad=True)
    with pytest.raises(TypeError, match="exponent"):
        x ** exponent


def test_split_into_unequal_parts_raises():
    with pytest.raises(ValueError, match="equal parts"):
        ml.split(ml.tensor(np.ones(5)), 2)


def test_reduction_axis_out_of_range_raises():
    with pytest.raises(ValueError, match="out of bounds"):
        ml.tensor(np.ones((2, 3))).sum(axis=2)


def test_empty_concatenate_and_stack_raise():
    with pytest.raises(ValueError, match="^concatenate needs at least one tensor$"):
        ml.concatenate([])
    with pytest.raises(ValueError, match="^stack needs at least one tensor$"):
        ml.stack(iter([]))
