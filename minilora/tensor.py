"""Tensor: an array plus the autograd bookkeeping (grad, requires_grad, creator).

The whole engine in one paragraph: every op result remembers the Function that
made it (``creator``); ``backward`` sorts those Functions topologically (an
explicit stack, so a 10,000-op chain needs no recursion) and sweeps them once in
reverse, handing each its output gradient and adding the gradients it returns
into its inputs. Leaf tensors that require grad accumulate into ``.grad``.

Tensor's operators (``+ - * / ** @``, ``[...]``, ``.sum()``, ...) call the primitive ops of
``minilora.ops``. This file cannot import them (every op is a Function, and function.py imports
Tensor), so ``minilora/__init__`` links them once with ``install_ops(ops)`` — the explicit
install step of DeZero's ``setup_variable()``.
"""

from __future__ import annotations

import contextlib

import numpy as np

from . import backend as bk

__all__ = ["Tensor", "tensor", "no_grad", "enable_grad", "is_grad_enabled", "install_ops", "RowGradient"]

_grad_enabled = True
_ops = None  # the primitive ops (minilora.ops), set by install_ops


def install_ops(ops_module) -> None:
    """Let Tensor's operators and methods call ``ops_module`` (``minilora.ops``; minilora/__init__ does it)."""
    global _ops
    _ops = ops_module


def is_grad_enabled() -> bool:
    return _grad_enabled


@contextlib.contextmanager
def _grad_mode(enabled: bool):
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, enabled
    try:
        yield
    finally:
        _grad_enabled = previous


def no_grad():
    """``with ml.no_grad(): ...`` builds no graph (inference, optimizer updates)."""
    return _grad_mode(False)


def enable_grad():
    return _grad_mode(True)


def is_float_dtype(dtype) -> bool:
    return np.issubdtype(dtype, np.floating)


class Tensor:
    """An n-dimensional array of the current backend that can carry a gradient."""

    __slots__ = ("data", "grad", "requires_grad", "creator", "name", "__weakref__")
    __array_priority__ = 1000  # ndarray (op) Tensor defers to Tensor's reflected operator

    def __init__(self, data, requires_grad: bool = False, dtype=None, backend: str | None = None, name=None):
        if isinstance(data, Tensor):
            data = data.data
        if dtype is None and not hasattr(data, "dtype"):
            probe = np.asarray(data)  # Python lists/scalars: floats become float32, as in PyTorch
            dtype = np.float32 if is_float_dtype(probe.dtype) else probe.dtype
        self.data = bk.asarray(data, dtype=dtype, backend=backend)  # backend None: the current one
        if requires_grad and not is_float_dtype(self.data.dtype):
            raise TypeError(f"only floating tensors can require grad, got dtype {self.data.dtype}")
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self.creator = None
        self.name = name

    @classmethod
    def _from_op(cls, data, requires_grad: bool) -> "Tensor":
        """Wrap an op's output array without copying or converting it."""
        t = cls.__new__(cls)
        t.data, t.grad, t.requires_grad, t.creator, t.name = data, None, requires_grad, None, None
        return t

    # ------------------------------------------------------------------ array-like facts
    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def backend(self) -> str:
        return bk.backend_of(self.data)

    @property
    def is_leaf(self) -> bool:
        return self.creator is None

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        extra = ", requires_grad=True" if self.requires_grad else ""
        body = np.array2string(bk.to_numpy(self.data), precision=4, separator=", ", threshold=20)
        return f"tensor({body}, dtype={self.dtype}{extra})"

    def numpy(self) -> np.ndarray:
        """A host NumPy copy-free view when possible (a copy from the GPU)."""
        return bk.to_numpy(self.data)

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> "Tensor":
        """The same data, cut from the graph: no gradient flows through it."""
        return Tensor._from_op(self.data, False)

    def zero_grad(self) -> None:
        self.grad = None

    def astype(self, dtype) -> "Tensor":
        return _ops.astype(self, dtype)

    # ------------------------------------------------------------------ autograd
    def backward(self, grad=None) -> None:
        """Accumulate d(self)/d(leaf) · grad into every leaf's ``.grad``.

        ``grad`` is the upstream gradient (an array or Tensor of self's shape);
        it may be omitted only for one-element outputs such as a loss.
        """
        if not self.requires_grad:
            raise RuntimeError(
                "backward() on a tensor that does not require grad: no input of the graph had "
                "requires_grad=True (or it was built under ml.no_grad())"
            )
        xp = bk.get_array_module(self.data)
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward() without a gradient needs a one-element output, got shape {self.shape}; "
                    "pass grad=an array of that shape"
                )
            grad = xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"backward(grad): grad has shape {grad.shape}, the tensor has shape {self.shape}")
        if self.creator is None:
            self._accumulate(grad)
            return
        grads = {id(self.creator): grad}  # one output per Function: its grad is keyed by the Function
        owned = {}  # id(leaf) -> the .grad array this sweep made or was handed fresh: safe to add into in place
        for fn in _topological_order(self.creator):
            g = grads.pop(id(fn), None)
            if g is None:
                continue
            in_grads = fn.backward(g)
            if not isinstance(in_grads, tuple):
                in_grads = (in_grads,)
            for x, needed, gx in zip(fn.inputs, fn.needs_input_grad, in_grads):
                if not needed or gx is None:
                    continue
                if gx.shape != x.data.shape or gx.dtype != x.data.dtype:
                    raise RuntimeError(
                        f"{type(fn).__name__}.backward returned a gradient of shape {gx.shape} and dtype "
                        f"{gx.dtype} for an input of shape {x.data.shape} and dtype {x.data.dtype}"
                    )
                if x.creator is None:
                    x._accumulate(gx, owned, fn.fresh_grads)
                else:
                    if isinstance(gx, RowGradient):  # a Function's backward takes dense arrays only
                        gx = gx.dense()
                    key = id(x.creator)
                    previous = grads.get(key)
                    grads[key] = gx if previous is None else previous + gx

    def _accumulate(self, g, owned: dict | None = None, fresh: bool = False) -> None:
        """``.grad`` += ``g``, as a new array unless this backward sweep owns ``.grad`` (``owned``).

        ``g`` may be shared with another input's gradient, and an earlier ``.grad`` with the
        caller, so only an array made in this sweep, or handed to it fresh (``fresh``:
        ``Function.fresh_grads``), is added into in place: the LM head's dW, into which the tied
        embedding's rows (a ``RowGradient``) go without a copy of the (V, D) array.
        """
        owned = {} if owned is None else owned
        mine = self.grad is not None and owned.get(id(self)) is self.grad
        if isinstance(g, RowGradient):
            if self.grad is None:
                self.grad = g.dense()
            elif mine:
                g.add_into(self.grad)
            else:
                self.grad = g.added_to(self.grad)
            owned[id(self)] = self.grad
        elif self.grad is None:
            self.grad = g
            if fresh:
                owned[id(self)] = g
        elif mine:
            self.grad += g
        else:
            self.grad = self.grad + g
            owned[id(self)] = self.grad

    # ------------------------------------------------------------------ operators
    def __add__(self, other):
        return _ops.add(self, other)

    def __radd__(self, other):
        return _ops.add(other, self)

    def __sub__(self, other):
        return _ops.sub(self, other)

    def __rsub__(self, other):
        return _ops.sub(other, self)

    def __mul__(self, other):
        return _ops.mul(self, other)

    def __rmul__(self, other):
        return _ops.mul(other, self)

    def __truediv__(self, other):
        return _ops.div(self, other)

    def __rtruediv__(self, other):
        return _ops.div(other, self)

    def __pow__(self, exponent):
        return _ops.pow(self, exponent)

    def __neg__(self):
        return _ops.neg(self)

    def __matmul__(self, other):
        return _ops.matmul(self, other)

    def __rmatmul__(self, other):
        return _ops.matmul(other, self)

    def __getitem__(self, key):
        return _ops.getitem(self, key)

    # ------------------------------------------------------------------ methods
    def sum(self, axis=None, keepdims=False):
        return _ops.sum(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims=False):
        return _ops.mean(self, axis=axis, keepdims=keepdims)

    def max(self, axis=None, keepdims=False):
        return _ops.max(self, axis=axis, keepdims=keepdims)

    def reshape(self, *shape):
        return _ops.reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)

    def transpose(self, *axes):
        return _ops.transpose(self, axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else (axes or None))

    @property
    def T(self):
        return _ops.transpose(self, None)

    def swapaxes(self, axis1, axis2):
        return _ops.swapaxes(self, axis1, axis2)

    def broadcast_to(self, shape):
        return _ops.broadcast_to(self, shape)

    def exp(self):
        return _ops.exp(self)

    def log(self):
        return _ops.log(self)

    def tanh(self):
        return _ops.tanh(self)

    def sqrt(self):
        return _ops.sqrt(self)

    def relu(self):
        return _ops.relu(self)


class RowGradient:
    """A gradient that is zero but on some rows: row ``rows[i]`` gets ``values[i]`` (repeats add up).

    What an embedding's backward returns for its (V, D) table. Written out dense it is a V × D
    array of zeros but for the looked-up rows: 154 MB for GPT-2's wte, of which a batch of 512
    tokens touches at most 512 rows, and for a tied table the autograd would then add it to the
    LM head's dW, a third array of that size. ``add_into`` reads and writes only the touched rows
    of the dense gradient instead; the result is bit for bit ``dense + self.dense()`` (each row's
    values are summed in the order ``dense()`` sums them, from zero).
    """

    def __init__(self, rows, values, shape):
        self.rows, self.values = rows, values
        self.shape, self.dtype = tuple(shape), values.dtype

    def dense(self):
        """The (V, D) array: zeros, and each row's values added in order (``backend.scatter_add``)."""
        out = bk.get_array_module(self.values).zeros(self.shape, dtype=self.dtype)
        bk.scatter_add(out, self.rows, self.values)
        return out

    def add_into(self, grad) -> None:
        """``grad += self.dense()`` in place, reading and writing only the rows in ``self.rows``."""
        xp = bk.get_array_module(self.values)
        touched, where = xp.unique(self.rows, return_inverse=True)
        sums = xp.zeros((touched.shape[0],) + self.shape[1:], dtype=self.dtype)
        bk.scatter_add(sums, where.reshape(-1), self.values)  # each touched row's sum, as dense() forms it
        grad[touched] += sums  # the rows are unique: one addition per element, as in grad + dense

    def added_to(self, grad):
        """``grad + self.dense()`` as a new array (``grad`` is not changed)."""
        out = grad.copy()
        self.add_into(out)
        return out


def _topological_order(root) -> list:
    """Functions reachable from ``root``, each after every Function that consumes its output.

    Iterative depth-first post-order (children first), then reversed: no recursion,
    so arbitrarily deep graphs work.
    """
    post, visited, stack = [], set(), [(root, False)]
    while stack:
        fn, expanded = stack.pop()
        if expanded:
            post.append(fn)  # all of fn's inputs' creators are already in ``post``
            continue
        if id(fn) in visited:
            continue
        visited.add(id(fn))
        stack.append((fn, True))
        for x in fn.inputs:
            creator = getattr(x, "creator", None)
            if creator is not None and id(creator) not in visited:
                stack.append((creator, False))
    post.reverse()
    return post


def tensor(data, requires_grad: bool = False, dtype=None, backend: str | None = None) -> Tensor:
    """Make a leaf Tensor on the current backend (``dtype`` as a NumPy dtype or name)."""
    return Tensor(data, requires_grad=requires_grad, dtype=dtype, backend=backend)
