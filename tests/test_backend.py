"""The backend switch: selection, errors for people, device RNG, the NumPy/CuPy gaps.

Without a GPU the CuPy-only checks still run against a tiny fake ``cupy`` module (its
``ndarray`` is a NumPy subclass), so the mismatch and restore logic is exercised on CPU.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest
from conftest import assert_close

import minilora as ml
from minilora import backend as bk

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "minilora"


class FakeDeviceArray(np.ndarray):
    """Stands in for ``cupy.ndarray``: host memory the backend must treat as device memory."""


def _fake_cupy_module():
    return types.SimpleNamespace(
        ndarray=FakeDeviceArray,
        asarray=lambda a, dtype=None: np.asarray(a, dtype=dtype).view(FakeDeviceArray),
        asnumpy=lambda a: np.asarray(a).view(np.ndarray),
        random=types.SimpleNamespace(seed=lambda seed: None),
    )


@pytest.fixture
def device(monkeypatch):
    """A function making a device tensor: real CuPy when it runs here, else the fake module."""
    if bk.cupy_available():
        return lambda values: ml.tensor(np.asarray(values, dtype=np.float64), backend="cupy")
    monkeypatch.setattr(bk, "_cupy", _fake_cupy_module())
    # wrap without conversion: ml.tensor() would move the data to the current (numpy) backend
    return lambda values: ml.Tensor._from_op(np.asarray(values, dtype=np.float64).view(FakeDeviceArray), False)


def _run_python(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MINILORA_BACKEND"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


# ----------------------------------------------------------------------------- selecting a backend
def test_default_backend_is_numpy():
    result = _run_python("import minilora as ml; print(ml.get_backend())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "numpy"


def test_env_variable_selects_the_backend_at_import():
    result = _run_python("import minilora as ml; print(ml.get_backend())", MINILORA_BACKEND=" NumPy ")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "numpy"


def test_bogus_env_variable_gives_a_clear_error():
    # raised at the first use of the backend, not at import (the CLI turns it into a message)
    result = _run_python("import minilora; minilora.tensor([1.0])", MINILORA_BACKEND="bogus")
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ValueError")
    for word in ("MINILORA_BACKEND", "bogus", "numpy", "cupy"):
        assert word in last_line, last_line


def test_unknown_backend_raises_value_error_listing_the_choices():
    with pytest.raises(ValueError, match=r"'nope'.*'numpy', 'cupy'"):
        ml.set_backend("nope")
    with pytest.raises(ValueError, match="'numpy', 'cupy'"), bk.use("nope"):
        pass  # pragma: no cover
    assert ml.get_backend() == "numpy"


@pytest.mark.skipif(bk.cupy_available(), reason="CuPy and a GPU are available here: the backend can be selected")
def test_cupy_without_cupy_or_gpu_raises_backend_unavailable():
    with pytest.raises(ml.BackendUnavailableError, match=r"pip install minilora\[gpu\]"):
        ml.set_backend("cupy")
    with pytest.raises(ml.BackendUnavailableError):  # the cached reason, raised again
        ml.set_backend("cupy")
    assert ml.get_backend() == "numpy"
    assert bk.available_backends() == ("numpy", "strict")  # strict needs no GPU
    assert bk.cupy_available() is False


@pytest.mark.parametrize("device_count", [0, RuntimeError("cudaErrorNoDevice")], ids=["no-gpu", "driver-error"])
def test_cupy_installed_but_no_gpu_says_so(device_count, monkeypatch):
    def get_device_count():
        if isinstance(device_count, Exception):
            raise device_count
        return device_count

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_device_count)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(bk, "_cupy", None)
    monkeypatch.setattr(bk, "_cupy_error", None)
    with pytest.raises(ml.BackendUnavailableError, match=r"needs an NVIDIA GPU.*set_backend\('numpy'\)") as info:
        ml.set_backend("cupy")
    if isinstance(device_count, Exception):
        assert "cudaErrorNoDevice" in str(info.value)
    assert ml.get_backend() == "numpy"


def test_use_restores_the_previous_backend(device):
    assert ml.get_backend() == "numpy"
    with bk.use("cupy"):
        assert ml.get_backend() == "cupy"
        with bk.use("numpy"):
            assert ml.get_backend() == "numpy"
        assert ml.get_backend() == "cupy"
    assert ml.get_backend() == "numpy"
    with pytest.raises(KeyError), bk.use("cupy"):
        raise KeyError("inside the block")
    assert ml.get_backend() == "numpy"


def test_xp_follows_the_current_backend(device):
    assert bk.xp() is np
    with bk.use("cupy"):
        assert bk.xp() is bk.module_for("cupy") is not np


# ----------------------------------------------------------------------------- randomness
@pytest.mark.parametrize("sample", ["random_normal", "random_uniform"])
def test_manual_seed_makes_device_random_numbers_reproducible(sample, backend):
    draw = getattr(bk, sample)
    ml.manual_seed(123)
    first = bk.to_numpy(draw((3, 4), np.float32))
    again = bk.to_numpy(draw((3, 4), np.float32))
    ml.manual_seed(123)
    assert_close(draw((3, 4), np.float32), first, rtol=0, atol=0)
    assert_close(draw((3, 4), np.float32), again, rtol=0, atol=0)  # the stream continues the same way
    ml.manual_seed(124)
    assert not np.array_equal(bk.to_numpy(draw((3, 4), np.float32)), first)
    assert first.dtype == np.float32 and first.shape == (3, 4)
    assert not np.array_equal(first, again)


def test_random_uniform_and_normal_respect_their_parameters(backend):
    ml.manual_seed(0)
    u = bk.to_numpy(bk.random_uniform((2000,), np.float64, low=-3.0, high=-1.0))
    assert u.min() >= -3.0 and u.max() < -1.0
    n = bk.to_numpy(bk.random_normal((20000,), np.float64, std=0.02))
    assert abs(n.std() - 0.02) < 0.001 and abs(n.mean()) < 0.001
    assert bk.backend_of(bk.random_normal((2,), np.float32)) == backend


# ----------------------------------------------------------------------------- transfers and gaps
def test_to_numpy_on_tensors_arrays_and_scalars(backend):
    values = np.arange(6.0).reshape(2, 3)
    t = ml.tensor(values, backend=backend)
    for thing in (t, t.data, values, values.tolist()):
        host = bk.to_numpy(thing)
        assert type(host) is np.ndarray
        np.testing.assert_array_equal(host, values)
    assert bk.to_numpy(np.float32(1.5)) == np.float32(1.5)
    assert t.numpy().dtype == np.float64


def test_to_numpy_brings_device_arrays_home(device):
    d = device([1.0, 2.0])
    assert d.backend == "cupy"
    host = bk.to_numpy(d)
    assert type(host) is np.ndarray
    np.testing.assert_array_equal(host, [1.0, 2.0])


def test_scatter_add_accumulates_repeated_indices(backend):
    target = bk.asarray(np.zeros(4), backend=backend)
    bk.scatter_add(target, bk.asarray(np.array([0, 0, 2, 0]), backend=backend), bk.asarray(np.array([1.0, 2.0, 3.0, 4.0]), backend=backend))
    np.testing.assert_array_equal(bk.to_numpy(target), [7.0, 0.0, 3.0, 0.0])

    rows = bk.asarray(np.zeros((3, 2)), backend=backend)  # an embedding-table gradient: repeated token ids
    bk.scatter_add(rows, bk.asarray(np.array([1, 1, 0]), backend=backend), bk.asarray(np.ones((3, 2)), backend=backend))
    np.testing.assert_array_equal(bk.to_numpy(rows), [[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]])


# ----------------------------------------------------------------------------- mixing backends
def test_get_array_module_rejects_mixed_backends(device):
    host = np.ones(2)
    dev = device([1.0, 2.0]).data
    assert bk.backend_of(dev) == "cupy" and bk.backend_of(host) == "numpy"
    assert bk.get_array_module(dev, dev, None) is bk.module_for("cupy")
    assert bk.get_array_module(host, None) is np
    with pytest.raises(bk.BackendMismatchError, match=r"numpy\(2,\).*cupy\(2,\)"):
        bk.get_array_module(host, dev)


from test_ops import MIXED as MIXING_OPS  # noqa: E402  (the same binary-op table as the dtype-mixing test)


@pytest.mark.parametrize("op", MIXING_OPS)
def test_ops_on_host_and_device_tensors_raise_backend_mismatch(op, device):
    host = ml.tensor(np.array([1.0, 2.0]), requires_grad=True)
    dev = device([3.0, 4.0])
    for a, b in ((host, dev), (dev, host)):
        with pytest.raises(bk.BackendMismatchError, match="two backends"):
            MIXING_OPS[op](a, b)


def test_backend_mismatch_is_a_type_error():
    assert issubclass(bk.BackendMismatchError, TypeError)
    assert issubclass(bk.BackendUnavailableError, RuntimeError)


# ----------------------------------------------------------------------------- the one CuPy import
def _cupy_imports(path: pathlib.Path) -> list[str]:
    source = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError:  # a file mid-edit: fall back to reading its lines
        return [line.strip() for line in source.splitlines()
                if line.lstrip().startswith(("import cupy", "from cupy"))]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in ("cupy", "cupyx")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("cupy", "cupyx"):
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call) and any(
            isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.split(".")[0] in ("cupy", "cupyx")
            for arg in node.args
        ) and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__"):
            found.append("importlib.import_module('cupy')")
    return found


def test_only_backend_py_imports_cupy():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "backend.py":
            continue
        imports = _cupy_imports(path)
        if imports:
            offenders[str(path.relative_to(REPO))] = imports
    assert not offenders, f"only minilora/backend.py may import CuPy; also found in: {offenders}"
    assert _cupy_imports(PACKAGE / "backend.py"), "backend.py should be where CuPy is imported"
