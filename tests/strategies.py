"""Hypothesis strategies for the op specs (minitorch style): shapes, values, layouts, index keys.

Every domain restriction lives HERE, in the strategy that draws the inputs (positive values
for log and sqrt, a gap between the two sides of ``maximum``, distinct values for ``max``),
never in the function under test: the spec calls the op on exactly the values drawn.

Arrays are NumPy float64 on the host; the tests move them onto the backend under test.
Shapes stay small (sides <= 4, at most 4 dimensions) so a float64 gradcheck, which costs
two forward passes per input element, stays cheap.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

MAX_SIDE = 4

# ----------------------------------------------------------------------------- element domains


def reals(low: float = -2.0, high: float = 2.0):
    """Bounded finite floats: exp stays below e^2, cubes below 8."""
    return st.floats(low, high, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def positives(low: float = 0.2, high: float = 3.0):
    """Values bounded away from 0: the domain of log, sqrt and fractional powers."""
    return reals(low, high)


def nonzero(min_abs: float = 0.3, max_abs: float = 2.0):
    """Values bounded away from 0 with either sign: denominators, x ** -1, relu's kink."""
    return st.tuples(st.booleans(), reals(min_abs, max_abs)).map(lambda t: -t[1] if t[0] else t[1])


def grid(offset: float = 0.0, step: float = 1 / 32, steps: int = 64):
    """Exact binary fractions offset + k·step in [-2, 2]: distinct values are >= step apart.

    Drawn ``unique``, they give a reduction with one clear maximum; two grids with offsets
    step/2 apart give the two sides of ``maximum`` that never tie.
    """
    return st.integers(-steps, steps).map(lambda k: offset + k * step)


# ----------------------------------------------------------------------------- shapes


@st.composite
def shapes(draw, min_dims: int = 0, max_dims: int = 3, min_side: int = 1, max_side: int = MAX_SIDE):
    """A small array shape; ``()`` (a 0-d tensor) included unless min_dims > 0."""
    return tuple(draw(st.lists(st.integers(min_side, max_side), min_size=min_dims, max_size=max_dims)))


@st.composite
def broadcast_from(draw, target):
    """A shape that broadcasts to ``target``: some leading axes dropped, some axes shrunk to 1."""
    target = tuple(target)
    kept = target[draw(st.integers(0, len(target))):]
    return tuple(1 if draw(st.booleans()) else n for n in kept)


@st.composite
def broadcastable_pair(draw, min_dims: int = 0, max_dims: int = 3):
    """Two shapes that broadcast together (each may stretch the other: (3, 1) with (4,))."""
    target = draw(shapes(min_dims, max_dims))
    return draw(broadcast_from(target)), draw(broadcast_from(target))


@st.composite
def matmul_pair(draw, max_batch_dims: int = 2):
    """Shapes for ``a @ b``: batch dims that broadcast, and 1-D operands (a row, a column)."""
    m, k, n = (draw(st.integers(1, MAX_SIDE)) for _ in range(3))
    batch = draw(shapes(0, max_batch_dims, max_side=3))
    left_vector, right_vector = draw(st.booleans()), draw(st.booleans())
    shape_a = (k,) if left_vector else draw(broadcast_from(batch)) + (m, k)
    shape_b = (k,) if right_vector else draw(broadcast_from(batch)) + (k, n)
    return shape_a, shape_b


@st.composite
def reduction_axis(draw, ndim: int):
    """``axis=`` for sum/mean/max: None, one int (negative allowed) or a tuple of distinct axes."""
    if ndim == 0:
        return None
    kind = draw(st.sampled_from(["none", "int", "tuple"]))
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.integers(-ndim, ndim - 1))
    axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    return tuple(a - ndim if draw(st.booleans()) else a for a in axes)  # mixed spellings: (0, -1)


@st.composite
def reshape_target(draw, shape):
    """A shape with the same number of elements: dims permuted, neighbours merged, 1s inserted, one -1."""
    dims = list(draw(st.permutations(list(shape))))
    if len(dims) >= 2 and draw(st.booleans()):
        i = draw(st.integers(0, len(dims) - 2))
        dims[i:i + 2] = [dims[i] * dims[i + 1]]
    for _ in range(draw(st.integers(0, 1))):
        dims.insert(draw(st.integers(0, len(dims))), 1)
    if dims and draw(st.booleans()):
        dims[draw(st.integers(0, len(dims) - 1))] = -1
    return tuple(dims)


# ----------------------------------------------------------------------------- arrays


def non_contiguous(values: np.ndarray) -> np.ndarray:
    """The same values in a strided memory layout.

    ndim >= 2: a transposed view of transposed storage (Fortran order); ndim 1: every
    other element of a wider buffer. Ops must not assume C-contiguous inputs.
    """
    if values.ndim >= 2:
        return np.ascontiguousarray(values.T).T
    if values.ndim == 1:
        storage = np.zeros((values.shape[0], 2), dtype=values.dtype)
        storage[:, 0] = values
        return storage[:, 0]
    return values


@st.composite
def arrays(draw, shape, elements=None, dtype=np.float64, unique: bool = False, layout: bool = True):
    """A float64 array of ``shape`` with bounded values, sometimes in a non-contiguous layout."""
    values = draw(hnp.arrays(dtype, tuple(shape), elements=elements if elements is not None else reals(), unique=unique))
    if layout and values.ndim >= 1 and draw(st.booleans()):
        values = non_contiguous(values)
    return values


def masks(shape):
    """A boolean array of ``shape`` (condition of where, mask of masked_fill or indexing)."""
    return hnp.arrays(np.bool_, tuple(shape), elements=st.booleans())


# ----------------------------------------------------------------------------- indexing keys


@st.composite
def basic_index(draw, shape):
    """Slices (negative steps included), integers, None and Ellipsis: each element read at most once."""
    parts = []
    for n in shape:
        kind = draw(st.sampled_from(["slice", "slice", "int", "all"]))
        if kind == "int":
            parts.append(draw(st.integers(-n, n - 1)))
        elif kind == "all":
            parts.append(slice(None))
        else:
            start = draw(st.none() | st.integers(-n, n))
            stop = draw(st.none() | st.integers(-n - 1, n))
            parts.append(slice(start, stop, draw(st.sampled_from([None, 1, 2, -1, -2]))))
    extra = draw(st.sampled_from(["", "trailing", "none", "ellipsis"]))
    if extra == "trailing" and parts:
        parts = parts[: draw(st.integers(0, len(parts) - 1))]  # missing axes mean ":"
    elif extra == "none":
        parts.insert(draw(st.integers(0, len(parts))), None)
    elif extra == "ellipsis" and parts:
        parts = [Ellipsis] + parts[draw(st.integers(1, len(parts))):]
    return tuple(parts)


@st.composite
def integer_array_index(draw, shape):
    """Integer arrays that repeat an index, so the backward must add the repeated gradients."""
    def picks(n):
        idx = draw(st.lists(st.integers(-n, n - 1), min_size=1, max_size=5))
        return np.array(idx + [idx[0]])  # the first index again: always a repeat

    form = draw(st.sampled_from(["first", "first+reversed", "last", "pair"] if len(shape) >= 2 else ["first", "last"]))
    if form == "first":
        return picks(shape[0])
    if form == "first+reversed":
        return (picks(shape[0]), slice(None, None, -1))
    if form == "last":
        return (Ellipsis, picks(shape[-1]))
    rows = picks(shape[0])
    return (rows, np.array([draw(st.integers(-shape[1], shape[1] - 1)) for _ in rows]))


@st.composite
def boolean_index(draw, shape):
    """A boolean mask over the whole array or over its first axis."""
    if len(shape) >= 2 and draw(st.booleans()):
        return draw(masks(shape[:1]))
    return draw(masks(shape))
