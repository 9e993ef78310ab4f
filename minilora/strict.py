"""The "strict" backend: NumPy underneath, CuPy's rules on top, to check GPU code without a GPU.

    ml.set_backend("strict")          # tensors hold StrictArray; xp is a StrictProxy of NumPy

A ``StrictArray`` computes with NumPy but refuses what a ``cupy.ndarray`` refuses: implicit
conversion to a host array (``np.asarray(x)``, ``float(x)`` of a non-scalar, any NumPy-only
function), arithmetic with host NumPy arrays, NumPy module functions called on it (``np.exp(x)``,
``np.add.at``: take the module from ``get_array_module``), and host transfer other than
``to_numpy`` / ``x.get()``. Reductions return 0-d arrays, as CuPy's do; ``float()``, ``int()`` and
``bool()`` of a one-element array are allowed (CuPy syncs for them). Code that runs on "strict"
has no NumPy-vs-device mistakes left for a GPU to find.

The array module of the backend is ``StrictProxy(numpy)``: NumPy's functions, each unwrapping its
strict arguments, refusing host arrays, and wrapping its results. ``minilora.backend`` selects
this backend like any other (``module_for("strict")``); this module knows nothing of the switch.
"""

from __future__ import annotations

import operator
import types

import numpy as np

__all__ = ["BackendMismatchError", "IMPLICIT_CONVERSION", "SCATTER_ADD_DTYPES", "StrictArray", "StrictProxy",
           "scatter_add"]


class BackendMismatchError(TypeError):
    """Raised when one operation receives arrays that live on two backends."""


IMPLICIT_CONVERSION = ("Implicit conversion to a NumPy array is not allowed. "
                       "Please use `.get()` to construct a NumPy array explicitly.")  # CuPy's words
SCATTER_ADD_DTYPES = tuple(np.dtype(d) for d in ("float16", "float32", "float64", "int32", "uint32", "uint64"))
_SCALARS = (bool, int, float, complex, np.generic)
_HOST_DATA_OK = frozenset({"array", "asarray", "asanyarray", "ascontiguousarray"})  # the explicit host -> device
_NOT_ON_DEVICE = frozenset({"errstate", "seterr", "geterr", "nditer", "ndenumerate", "frompyfunc", "matrix",
                            "ma", "char", "rec", "memmap", "recarray", "printoptions", "set_printoptions"})
_OPERATOR_UFUNCS = frozenset({np.add, np.subtract, np.multiply, np.true_divide, np.floor_divide, np.remainder,
                              np.power, np.matmul, np.less, np.less_equal, np.equal, np.not_equal, np.greater,
                              np.greater_equal, np.bitwise_and, np.bitwise_or, np.bitwise_xor, np.left_shift,
                              np.right_shift})
_ARRAY_METHODS = frozenset({
    "all", "any", "argmax", "argmin", "argpartition", "argsort", "astype", "choose", "clip", "compress", "conj",
    "conjugate", "copy", "cumprod", "cumsum", "diagonal", "dot", "fill", "flatten", "item", "max", "mean", "min",
    "nonzero", "partition", "prod", "put", "ravel", "repeat", "reshape", "round", "sort", "squeeze", "std", "sum",
    "swapaxes", "take", "tobytes", "tolist", "trace", "transpose", "var", "view",
})
_HOST_INDEX_METHODS = frozenset({"take", "put", "compress"})  # CuPy copies host index arrays for these


def _mixing_error(a) -> BackendMismatchError:
    return BackendMismatchError(
        f"Unsupported type {type(a)}: a host NumPy array of shape {tuple(a.shape)} met a device array in one "
        "operation (CuPy refuses this too). Move it first: xp = minilora.backend.get_array_module(device_array); "
        "xp.asarray(host_array); or bring the device array home with minilora.backend.to_numpy(...)"
    )


def _unwrap_operand(x):
    """An operand of device arithmetic: device arrays and scalars only (CuPy's rule for ufuncs)."""
    if isinstance(x, StrictArray):
        return x._a
    if isinstance(x, _SCALARS):
        return x
    if isinstance(x, np.ndarray):
        raise _mixing_error(x)
    raise TypeError(f"Unsupported type {type(x)}: device operations take device arrays and Python/NumPy scalars "
                    "only (CuPy's rule); make an array first with xp.asarray(...)")


def _unwrap_arg(x, host_ok: bool = False):
    """An argument of a device function: strict arrays unwrapped, host arrays refused (unless ``host_ok``)."""
    if isinstance(x, StrictArray):
        return x._a
    if isinstance(x, np.ndarray):
        if host_ok:
            return x
        raise _mixing_error(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap_arg(v, host_ok) for v in x)
    return x


def _unwrap_key(key):
    """An index: device arrays unwrapped; host arrays and lists are allowed (CuPy copies them over)."""
    unwrap = lambda k: k._a if isinstance(k, StrictArray) else k  # noqa: E731
    return tuple(map(unwrap, key)) if isinstance(key, tuple) else unwrap(key)


def _wrap(r):
    """NumPy results as device results: arrays and NumPy scalars become strict arrays (0-d, as CuPy's)."""
    if isinstance(r, np.ndarray):
        return StrictArray(r)
    if isinstance(r, np.generic):
        return StrictArray(np.asarray(r))
    if isinstance(r, tuple):
        values = [_wrap(v) for v in r]
        return type(r)(*values) if hasattr(r, "_fields") else tuple(values)
    if isinstance(r, list):
        return [_wrap(v) for v in r]
    if isinstance(r, np.random.Generator):
        return StrictProxy(r, "strict.random.Generator")
    return r


def _binary(name):
    def method(self, other, *modulo):
        if (not isinstance(other, (StrictArray, np.ndarray) + _SCALARS)
                and getattr(other, "__array_priority__", 0) > StrictArray.__array_priority__):
            return NotImplemented  # e.g. a Tensor: its reflected operator takes over
        return _wrap(getattr(self._a, name)(_unwrap_operand(other)))
    method.__name__ = name
    return method


def _inplace(name):
    def method(self, other):
        getattr(self._a, name)(_unwrap_operand(other))
        return self
    method.__name__ = name
    return method


class _DeviceMemory:
    """What ``.data`` of a device array is (CuPy: a MemoryPointer): memory, not values."""

    def __init__(self, array):
        self.ptr = array.ctypes.data

    def __array__(self, dtype=None, copy=None):
        raise TypeError("the .data of a device array is its memory (a cupy MemoryPointer), not its values; "
                        "use minilora.backend.to_numpy(array) or array.get()")


class StrictArray:
    """A NumPy array behind CuPy's rules: what tensors of the "strict" backend hold (see the module docstring)."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100  # below Tensor's 1000: array (op) Tensor is done by the Tensor
    __hash__ = None

    def __init__(self, array: np.ndarray):
        self._a = array

    T = property(lambda self: StrictArray(self._a.T))
    real = property(lambda self: StrictArray(self._a.real))
    imag = property(lambda self: StrictArray(self._a.imag))
    data = property(lambda self: _DeviceMemory(self._a), doc="device memory, not values: use .get()")
    device = "strict"

    def get(self, stream=None, order="C", out=None) -> np.ndarray:
        """A host copy (``cupy.ndarray.get``); with ``out``, copied into that host array."""
        if out is None:
            return np.array(self._a, order=order, copy=True)
        np.copyto(out, self._a, casting="no")  # CuPy: the same shape and dtype
        return out

    def __getattr__(self, name):
        if name not in _ARRAY_METHODS:  # includes "_a" while unpickling: no recursion
            raise AttributeError(f"'StrictArray' object has no attribute {name!r} (a device array: cupy.ndarray "
                                 "has no such attribute either)")
        method, host_ok = getattr(self._a, name), name in _HOST_INDEX_METHODS

        def call(*args, **kwargs):
            r = method(*[_unwrap_arg(a, host_ok) for a in args], **{k: _unwrap_arg(v) for k, v in kwargs.items()})
            return self if r is self._a else _wrap(r)
        return call

    # ------------------------------------------------------------------ indexing
    def __getitem__(self, key):
        key = _unwrap_key(key)
        r = self._a[key]
        if isinstance(r, np.generic):  # CuPy returns a 0-d device view, never a host scalar
            r = self._a[(key if isinstance(key, tuple) else (key,)) + (Ellipsis,)]
        return StrictArray(r)

    def __setitem__(self, key, value):
        parts = key if isinstance(key, tuple) else (key,)
        advanced = any(isinstance(p, (list, np.ndarray, StrictArray, bool, np.bool_)) for p in parts)
        if isinstance(value, StrictArray):
            value = value._a
        elif not advanced and isinstance(value, np.ndarray) and value.ndim > 0:
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill (CuPy's words): a host array was "
                             "assigned into a device array; assign xp.asarray(host) instead")
        elif not advanced and not isinstance(value, _SCALARS + (np.ndarray,)):
            raise TypeError(f"Unsupported type {type(value)} assigned into a device array; use xp.asarray(...)")
        self._a[_unwrap_key(key)] = value

    __len__ = lambda self: len(self._a)

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self._a)))

    # ------------------------------------------------------------------ conversions (as CuPy: sync for one element)
    def __array__(self, dtype=None, copy=None):
        raise TypeError(IMPLICIT_CONVERSION)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        for x in inputs + tuple(kwargs.get("out", ())):
            if isinstance(x, np.ndarray):
                raise _mixing_error(x)
        if (method == "__call__" and ufunc in _OPERATOR_UFUNCS and len(inputs) == 2 and not kwargs
                and isinstance(inputs[0], np.generic) and isinstance(inputs[1], StrictArray)):
            return _wrap(ufunc(inputs[0], inputs[1]._a))  # np.float32(2) * x: a NumPy scalar's operator
        name = ufunc.__name__ + ("" if method == "__call__" else f".{method}")
        hint = ("scatter-add with minilora.backend.scatter_add(target, indices, values)" if method == "at"
                else f"xp = minilora.backend.get_array_module(x); xp.{name}(...)")
        raise TypeError(f"numpy.{name} was called on a device array: NumPy functions run on the host. "
                        f"Take the module from the array: {hint}")

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} was called on a device array: NumPy functions run on the host. "
                        f"Take the module from the array: xp = minilora.backend.get_array_module(x); "
                        f"xp.{func.__name__}(...)")

    __float__ = lambda self: float(self._a)  # one element: allowed (CuPy syncs), several: TypeError
    __int__ = lambda self: int(self._a)
    __complex__ = lambda self: complex(self._a)
    __bool__ = lambda self: bool(self._a)
    __repr__ = lambda self: repr(self._a)
    __str__ = lambda self: str(self._a)
    __format__ = lambda self, spec: format(self._a, spec)
    __copy__ = __deepcopy__ = lambda self, memo=None: StrictArray(self._a.copy())
    __reduce__ = lambda self: (StrictArray, (self._a.copy(),))
    __neg__ = lambda self: StrictArray(-self._a)
    __pos__ = lambda self: self
    __abs__ = lambda self: StrictArray(abs(self._a))
    __invert__ = lambda self: StrictArray(~self._a)


for _name in ("shape", "dtype", "ndim", "size", "nbytes", "itemsize", "strides", "flags"):
    setattr(StrictArray, _name, property(operator.attrgetter(f"_a.{_name}")))
for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor", "lshift", "rshift"):
    for _form in ("__{}__", "__r{}__"):
        setattr(StrictArray, _form.format(_name), _binary(_form.format(_name)))
    setattr(StrictArray, f"__i{_name}__", _inplace(f"__i{_name}__"))
for _name in ("lt", "le", "eq", "ne", "gt", "ge"):
    setattr(StrictArray, f"__{_name}__", _binary(f"__{_name}__"))


class _StrictUfunc:
    """A NumPy ufunc on strict arrays; ``.at`` is not there (scatter-add through ``scatter_add``)."""

    __slots__ = ("_ufunc",)

    def __init__(self, ufunc):
        self._ufunc = ufunc

    def _run(self, fn, args, kwargs):
        kwargs = {k: (tuple(_unwrap_operand(o) for o in v) if k == "out" and isinstance(v, tuple)
                      else _unwrap_operand(v) if k in ("out", "where") else v) for k, v in kwargs.items()}
        return _wrap(fn(*[_unwrap_operand(a) for a in args], **kwargs))

    def __call__(self, *args, **kwargs):
        return self._run(self._ufunc, args, kwargs)

    def __getattr__(self, name):
        if name == "at":
            raise AttributeError(f"{self._ufunc.__name__}.at is not there on a device (CuPy's ufuncs have no .at "
                                 "before v13); scatter-add with minilora.backend.scatter_add(target, indices, values)")
        if name in ("reduce", "accumulate", "outer"):
            return lambda *args, **kwargs: self._run(getattr(self._ufunc, name), args, kwargs)
        return getattr(self._ufunc, name)

    def __repr__(self) -> str:
        return f"<strict ufunc {self._ufunc.__name__!r}>"


def _strict_function(func, name: str):
    host_ok = name in _HOST_DATA_OK

    def call(*args, **kwargs):
        host = args[0] if host_ok and args and isinstance(args[0], np.ndarray) else None  # host data coming over
        args = [_unwrap_arg(a, host_ok) for a in args]
        r = func(*args, **{k: _unwrap_arg(v, host_ok) for k, v in kwargs.items()})
        if host_ok and isinstance(r, np.ndarray):
            if r.dtype.kind in "OSUVMm":
                raise ValueError(f"Unsupported dtype {r.dtype}: device arrays hold numbers and booleans only")
            if host is not None and np.may_share_memory(r, host):
                r = r.copy(order="K")  # host -> device is a copy (CuPy keeps the layout)
        return _wrap(r)
    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"numpy.{name} under the strict backend's rules"
    return call


class StrictProxy:
    """NumPy (the module, a submodule, or a Generator) seen through the strict rules: ``xp`` of "strict"."""

    def __init__(self, target, name: str):
        self._target, self.__name__ = target, name

    def __getattr__(self, name):
        if name.startswith("__") or name in _NOT_ON_DEVICE:
            raise AttributeError(f"{self.__name__} has no attribute {name!r} (CuPy has none either)")
        value = getattr(self._target, name)
        if value is np.ndarray:
            value = StrictArray
        elif isinstance(value, np.ufunc):
            value = _StrictUfunc(value)
        elif isinstance(value, types.ModuleType):
            value = StrictProxy(value, f"{self.__name__}.{name}")
        elif callable(value) and not isinstance(value, type):
            value = _strict_function(value, name)
        setattr(self, name, value)  # cache: the next lookup is a plain attribute
        return value

    def __repr__(self) -> str:
        return f"<minilora strict array module {self.__name__!r} (NumPy with CuPy's rules)>"


def scatter_add(target: StrictArray, indices, values) -> None:
    """``target[indices] += values`` on a strict array, with the dtypes CuPy's ``scatter_add`` takes."""
    if target.dtype not in SCATTER_ADD_DTYPES:
        raise TypeError(f"scatter_add only supports {', '.join(str(d) for d in SCATTER_ADD_DTYPES)} on a "
                        f"device (CuPy's atomicAdd), got {target.dtype}; accumulate in float32/float64 or int32")
    np.add.at(target._a, _unwrap_key(indices), _unwrap_operand(values))
