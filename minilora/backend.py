"""The array backend: NumPy by default, CuPy by one switch, and "strict" to check without a GPU.

This is the ONLY module that imports CuPy. Everything else asks for the array
module of its inputs (``get_array_module``) or of the current backend (``xp()``),
so the same op code runs on host and device arrays. The NumPy/CuPy gaps
(scatter-add, random numbers, host transfer) are filled here and nowhere else.

    ml.set_backend("cupy")            # or env MINILORA_BACKEND=cupy
    with ml.backend.use("cupy"): ...  # temporarily
    ml.set_backend("strict")          # NumPy underneath, CuPy's rules on top (no GPU needed)

The "strict" backend computes with NumPy but its arrays (``StrictArray``) refuse what a
``cupy.ndarray`` refuses: implicit conversion to a host array (``np.asarray(x)``, ``float(x)`` of a
non-scalar, any NumPy-only function), arithmetic with host NumPy arrays, NumPy module functions
called on them (``np.exp(x)``, ``np.add.at``: take the module from ``get_array_module``), and
host transfer other than ``to_numpy`` / ``x.get()``. Reductions return 0-d arrays, as CuPy's do;
``float()``, ``int()`` and ``bool()`` of a one-element array are allowed (CuPy syncs for them).
Code that runs on "strict" has no NumPy-vs-device mistakes left for a GPU to find.
"""

from __future__ import annotations

import contextlib
import operator
import os
import types

import numpy as np

__all__ = [
    "BackendUnavailableError",
    "BackendMismatchError",
    "set_backend",
    "get_backend",
    "use",
    "xp",
    "module_for",
    "get_array_module",
    "backend_of",
    "to_numpy",
    "asarray",
    "manual_seed",
    "rng",
    "scatter_add",
    "available_backends",
    "cupy_available",
    "StrictArray",
    "strict_module",
]

BACKENDS = ("numpy", "cupy", "strict")


class BackendUnavailableError(RuntimeError):
    """Raised when a backend is asked for but cannot run on this machine."""


class BackendMismatchError(TypeError):
    """Raised when one operation receives arrays that live on two backends."""


_cupy = None  # the cupy module once imported and checked
_cupy_error: str | None = None


def _load_cupy():
    """Import CuPy and check that a GPU is visible; raise a helpful error otherwise."""
    global _cupy, _cupy_error
    if _cupy is not None:
        return _cupy
    if _cupy_error is not None:
        raise BackendUnavailableError(_cupy_error)
    try:
        import cupy  # noqa: PLC0415  (the one place cupy is imported)
    except Exception as exc:  # ImportError, or a broken CUDA install
        _cupy_error = (
            f"the 'cupy' backend needs the CuPy package, which could not be imported ({exc}). "
            "Install it with `pip install minilora[gpu]` (or a cupy-cudaXXx wheel matching your "
            "CUDA version), or stay on the default backend with ml.set_backend('numpy')."
        )
        raise BackendUnavailableError(_cupy_error) from None
    try:
        n_gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        n_gpus, detail = 0, f" ({exc})"
    else:
        detail = ""
    if n_gpus < 1:
        _cupy_error = (
            f"the 'cupy' backend needs an NVIDIA GPU, but CuPy found none{detail}. "
            "Run on a machine with a GPU and a CUDA driver, or use ml.set_backend('numpy')."
        )
        raise BackendUnavailableError(_cupy_error)
    _cupy = cupy
    return cupy


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one GPU."""
    try:
        _load_cupy()
    except BackendUnavailableError:
        return False
    return True


def available_backends() -> tuple[str, ...]:
    """The backends that can run here: ('numpy', 'strict'), plus 'cupy' where a GPU is."""
    return ("numpy", "cupy", "strict") if cupy_available() else ("numpy", "strict")


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    return name


_current = "numpy"
_env_error: Exception | None = None  # a bad MINILORA_BACKEND, raised at first use (not at import)


def _active() -> str:
    """The current backend's name; a bad MINILORA_BACKEND is raised here, where a caller can catch it."""
    if _env_error is not None:
        raise _env_error
    return _current


def set_backend(name: str) -> None:
    """Select the backend new tensors and parameters are created on."""
    global _current, _env_error
    if _check_name(name) == "cupy":
        _load_cupy()
    _current = name
    _env_error = None  # an explicit choice replaces a bad MINILORA_BACKEND


def get_backend() -> str:
    return _active()


@contextlib.contextmanager
def use(name: str):
    """``with ml.backend.use("cupy"): ...`` selects a backend inside the block only."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def module_for(name: str):
    """The array module of a backend name: numpy, cupy, or the strict module (``strict_module()``)."""
    name = _check_name(name)
    if name == "numpy":
        return np
    return _load_cupy() if name == "cupy" else strict_module()


def xp():
    """The array module of the current backend."""
    name = _active()
    return np if name == "numpy" else module_for(name)


def _is_cupy_array(a) -> bool:
    return _cupy is not None and isinstance(a, _cupy.ndarray)


def _is_device_array(a) -> bool:
    """A CuPy array or a strict one: data that must be copied to reach the host."""
    return isinstance(a, StrictArray) or _is_cupy_array(a)


def backend_of(a) -> str:
    """'numpy', 'cupy' or 'strict' for an array (anything else counts as host data)."""
    if isinstance(a, StrictArray):
        return "strict"
    return "cupy" if _is_cupy_array(a) else "numpy"


def get_array_module(*arrays):
    """The array module shared by ``arrays`` (None entries and NumPy scalars are ignored).

    Raises BackendMismatchError when host and device arrays are mixed: an op
    cannot add a NumPy array to a CuPy array without an explicit transfer.
    """
    if _cupy is None and _strict is None:  # fast path: no device backend ever loaded, everything is NumPy
        return np
    kinds = {backend_of(a) for a in arrays if hasattr(a, "shape") and not isinstance(a, np.generic)}
    if len(kinds) > 1:
        shapes = ", ".join(f"{backend_of(a)}{tuple(a.shape)}" for a in arrays if hasattr(a, "shape"))
        raise BackendMismatchError(
            f"an operation received arrays on two backends ({shapes}); move them to one first, "
            "e.g. model.to(backend='cupy') or ml.tensor(x) under the same backend"
        )
    return module_for(kinds.pop()) if kinds else np


def to_numpy(a) -> np.ndarray:
    """A host NumPy array for a NumPy/CuPy/strict array or a Tensor (a copy from a device)."""
    if not isinstance(a, np.ndarray) and not _is_device_array(a):
        a = getattr(a, "data", a)  # a Tensor (a device array's .data is its memory, not its values)
    if isinstance(a, StrictArray):
        return a.get()
    if _is_cupy_array(a):
        return _cupy.asnumpy(a)
    return np.asarray(a)


def asarray(data, dtype=None, backend: str | None = None):
    """``data`` as an array of ``backend`` (default: the current one), copying across devices."""
    module = module_for(backend or _active())
    if module is np:
        return np.asarray(to_numpy(data) if _is_device_array(data) else data, dtype=dtype)
    if _is_device_array(data) and backend_of(data) != (backend or _active()):
        data = to_numpy(data)  # device to device goes through the host
    return module.asarray(data, dtype=dtype)


# ----------------------------------------------------------------------------- randomness
_seed = 0
_generators: dict[str, object] = {}


def manual_seed(seed: int) -> None:
    """Seed the random generators of every backend (NumPy now, CuPy when first used)."""
    global _seed
    _seed = int(seed)
    _generators.clear()
    if _cupy is not None:
        _cupy.random.seed(_seed)


def rng(backend: str | None = None):
    """The seeded generator of a backend (``numpy.random.Generator``, CuPy's, or the strict one: a
    stream of its own, as a GPU's, seeded by ``manual_seed``, whose draws differ from NumPy's)."""
    name = backend or _active()
    gen = _generators.get(name)
    if gen is None:
        if name == "numpy":
            gen = np.random.default_rng(_seed)
        elif name == "strict":
            gen = _StrictProxy(np.random.default_rng(np.random.SeedSequence(_seed, spawn_key=(0x5C,))), "strict.rng")
        else:
            cupy = _load_cupy()
            gen = cupy.random.default_rng(_seed) if hasattr(cupy.random, "default_rng") else cupy.random.RandomState(_seed)
        _generators[name] = gen
    return gen


def random_uniform(shape, dtype, backend: str | None = None, low=0.0, high=1.0):
    """Uniform samples in [low, high) of ``dtype`` on a backend (the RNG gap lives here)."""
    name = backend or _active()
    gen = rng(name)
    if name == "numpy":
        return gen.uniform(low, high, size=shape).astype(dtype, copy=False)
    return (gen.random(shape, dtype=np.float64) * (high - low) + low).astype(dtype, copy=False)


def random_normal(shape, dtype, backend: str | None = None, std=1.0):
    """Gaussian samples N(0, std²) of ``dtype`` on a backend."""
    name = backend or _active()
    gen = rng(name)
    if name == "numpy":
        return (gen.standard_normal(size=shape) * std).astype(dtype, copy=False)
    return (gen.standard_normal(shape, dtype=np.float64) * std).astype(dtype, copy=False)


# ----------------------------------------------------------------------------- gaps
def scatter_add(target, indices, values) -> None:
    """``target[indices] += values`` with repeated indices accumulated (in place).

    NumPy spells it ``np.add.at``; CuPy ``cupyx.scatter_add`` (float16/32/64, int32, uint32 and
    uint64 only: the strict backend refuses the other dtypes as CuPy does).
    """
    if isinstance(target, StrictArray):
        if target.dtype not in _SCATTER_ADD_DTYPES:
            raise TypeError(f"scatter_add only supports {', '.join(str(d) for d in _SCATTER_ADD_DTYPES)} on a "
                            f"device (CuPy's atomicAdd), got {target.dtype}; accumulate in float32/float64 or int32")
        np.add.at(target._a, _unwrap_key(indices), _unwrap_operand(values))
    elif _is_cupy_array(target):
        import cupyx  # noqa: PLC0415

        cupyx.scatter_add(target, indices, values)
    else:
        np.add.at(target, indices, values)


# ----------------------------------------------------------------------------- the strict backend
IMPLICIT_CONVERSION = ("Implicit conversion to a NumPy array is not allowed. "
                       "Please use `.get()` to construct a NumPy array explicitly.")  # CuPy's words
_SCATTER_ADD_DTYPES = tuple(np.dtype(d) for d in ("float16", "float32", "float64", "int32", "uint32", "uint64"))
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
        return _StrictProxy(r, "strict.random.Generator")
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


class _StrictProxy:
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
            value = _StrictProxy(value, f"{self.__name__}.{name}")
        elif callable(value) and not isinstance(value, type):
            value = _strict_function(value, name)
        setattr(self, name, value)  # cache: the next lookup is a plain attribute
        return value

    def __repr__(self) -> str:
        return f"<minilora strict array module {self.__name__!r} (NumPy with CuPy's rules)>"


_strict = None  # the strict module once made


def strict_module():
    """The array module of the "strict" backend: NumPy's functions on strict arrays, CuPy's refusals."""
    global _strict
    if _strict is None:
        _strict = _StrictProxy(np, "strict")
    return _strict


def _init_from_env() -> None:
    """Apply MINILORA_BACKEND. A bad value does not break ``import minilora`` (a traceback nobody can
    catch, e.g. in the CLI): it is raised, naming the variable, by the first call that needs the backend."""
    global _env_error
    name = os.environ.get("MINILORA_BACKEND", "").strip().lower()
    if name:
        try:
            set_backend(name)
        except (ValueError, BackendUnavailableError) as exc:  # say where the bad name came from
            _env_error = type(exc)(f"environment variable MINILORA_BACKEND={name!r}: {exc}")


_init_from_env()
