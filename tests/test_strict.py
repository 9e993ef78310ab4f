"""The strict backend: NumPy underneath, CuPy's rules on top (what CI runs in place of a GPU).

Each refusal is shown to fire (a planted ``np.asarray`` on a device array fails, ``np.add.at``
fails, mixing with host arrays fails, ...), each thing CuPy allows is shown to work, and the model
paths (GPT, LoRA, the mixed batch, generate, the optimizers, fit, merge, adapter files and
``minilora demo --fast``) run on strict and give the NumPy backend's numbers, bit for bit: the
same NumPy kernels run underneath, only the rules differ.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

import minilora as ml
from minilora import backend as bk
from minilora import lora, optim
from minilora.function import Function
from minilora.generate import generate
from minilora.models import GPT, GPTConfig
from minilora.train import fit

REPO = pathlib.Path(__file__).resolve().parents[1]
IMPLICIT = re.escape(bk.IMPLICIT_CONVERSION)


def dev(values, dtype=np.float64):
    """A strict (device) array holding ``values``."""
    return bk.asarray(np.asarray(values, dtype=dtype), backend="strict")


# ----------------------------------------------------------------------------- refusals, each shown to fire
@pytest.mark.parametrize("convert", [
    np.asarray, np.array, np.ascontiguousarray, lambda a: np.asarray(a, dtype=np.float32),
    lambda a: np.array([a, a]), np.float64,
], ids=["np.asarray", "np.array", "np.ascontiguousarray", "asarray-dtype", "list-of-arrays", "np.float64"])
def test_implicit_conversion_to_a_host_array_raises_cupys_type_error(convert):
    with pytest.raises(TypeError, match=IMPLICIT):
        convert(dev([1.0, 2.0]))
    assert bk.IMPLICIT_CONVERSION == ("Implicit conversion to a NumPy array is not allowed. "
                                      "Please use `.get()` to construct a NumPy array explicitly.")


class _PlantedAsarray(Function):
    """An op with a planted host conversion: fine on NumPy, a GPU bug that strict must catch."""

    def forward(self, x):
        return np.asarray(x) * 2.0

    def backward(self, grad):
        return grad * 2.0


def test_a_planted_np_asarray_in_an_op_fails_on_strict_and_passes_on_numpy():
    host = _PlantedAsarray.apply(ml.tensor([1.0, 2.0], backend="numpy"))
    np.testing.assert_array_equal(host.data, [2.0, 4.0])
    with pytest.raises(TypeError, match=IMPLICIT):
        _PlantedAsarray.apply(ml.tensor([1.0, 2.0], backend="strict"))


def test_float_int_bool_of_a_non_scalar_raise_and_of_one_element_are_allowed():
    x = dev([1.0, 2.0])
    for convert in (float, int, complex):
        with pytest.raises(TypeError):
            convert(x)
    with pytest.raises(ValueError, match="ambiguous"):
        bool(x)
    total = x.sum()  # CuPy: reductions return 0-d device arrays, not host scalars
    assert isinstance(total, bk.StrictArray) and total.shape == () and bk.backend_of(total) == "strict"
    assert float(total) == 3.0 and int(total) == 3 and bool(total) is True and f"{total:.2f}" == "3.00"
    assert isinstance(x[1], bk.StrictArray) and x[1].shape == () and float(x[1]) == 2.0
    assert isinstance(x.max(), bk.StrictArray) and x.max().item() == 2.0 and x[0].item() == 1.0


@pytest.mark.parametrize("call", [
    lambda x: np.exp(x), lambda x: np.sum(x), lambda x: np.concatenate([x, x]), lambda x: np.where(x > 0, x, 0.0),
    lambda x: np.isfinite(x).all(), lambda x: np.linalg.norm(x), lambda x: np.zeros_like(x),
    lambda x: np.testing.assert_array_equal(x, x), lambda x: np.maximum(x, 0.0),
], ids=["np.exp", "np.sum", "np.concatenate", "np.where", "np.isfinite", "np.linalg.norm", "np.zeros_like",
        "np.testing", "np.maximum"])
def test_numpy_module_functions_on_device_arrays_raise(call):
    with pytest.raises(TypeError, match=r"NumPy functions run on the host|Implicit conversion"):
        call(dev([[1.0, -2.0], [3.0, 4.0]]))


def test_np_add_at_fails_xp_add_at_is_not_there_and_scatter_add_is():
    target = dev(np.zeros(3))
    with pytest.raises(TypeError, match=r"numpy\.add\.at .*scatter_add"):
        np.add.at(target, [0, 0], 1.0)
    xp = bk.get_array_module(target)
    assert xp is bk.module_for("strict") is bk.strict_module() and xp is not np
    with pytest.raises(AttributeError, match=r"add\.at is not there.*scatter_add"):
        xp.add.at  # noqa: B018  (the attribute lookup itself is what fails)
    bk.scatter_add(target, dev([0, 0, 2], dtype=np.int64), dev([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(bk.to_numpy(target), [3.0, 0.0, 3.0])
    with pytest.raises(TypeError, match="scatter_add only supports"):  # CuPy's atomicAdd has no int64
        bk.scatter_add(dev(np.zeros(3), dtype=np.int64), dev([0], dtype=np.int64), dev([1], dtype=np.int64))


@pytest.mark.parametrize("mix", [
    lambda d, h: d + h, lambda d, h: h + d, lambda d, h: d * h, lambda d, h: h - d, lambda d, h: d @ h,
    lambda d, h: d < h, lambda d, h: d.__iadd__(h), lambda d, h: bk.xp().maximum(d, h),
    lambda d, h: bk.xp().concatenate([d, h]), lambda d, h: bk.xp().where(h > 0, d, d),
    lambda d, h: bk.xp().dot(d, h), lambda d, h: d + np.float64(1.0) * h,
    lambda d, h: ml.tensor(d) + ml.tensor(h, backend="numpy"),
], ids=["d+h", "h+d", "d*h", "h-d", "d@h", "d<h", "d+=h", "xp.maximum", "xp.concatenate", "xp.where",
        "xp.dot", "0-d-scalar-times-host", "tensors"])
def test_mixing_device_and_host_numpy_arrays_raises(mix):
    with bk.use("strict"):
        with pytest.raises(bk.BackendMismatchError, match=r"numpy|two backends"):
            mix(dev([1.0, 2.0]), np.array([3.0, 4.0]))


def test_assigning_a_host_array_or_list_into_a_device_array_raises_like_cupy():
    d = dev(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray cannot be used for fill"):
        d[...] = np.ones((2, 2))
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray"):
        d[0] = np.ones(2)
    with pytest.raises(TypeError, match="Unsupported type"):
        d[0] = [1.0, 2.0]
    with pytest.raises(TypeError, match="Unsupported type"):
        d + [1.0, 2.0]  # CuPy's ufuncs take no lists either
    with pytest.raises(TypeError, match="Unsupported type"):
        bk.module_for("strict").exp([1.0])


def test_host_transfer_only_through_to_numpy_and_get_and_it_copies():
    x = dev([1.0, 2.0])
    for host in (bk.to_numpy(x), x.get(), ml.tensor(x).numpy(), bk.to_numpy(ml.tensor(x))):
        assert type(host) is np.ndarray
        np.testing.assert_array_equal(host, [1.0, 2.0])
        host[0] = 99.0  # a copy, as from a GPU: the device array is untouched
    np.testing.assert_array_equal(x.get(), [1.0, 2.0])
    with pytest.raises(TypeError, match="memory"):  # .data of a device array is memory (cupy: MemoryPointer)
        np.asarray(x.data)
    source = np.array([1.0, 2.0])
    moved = bk.module_for("strict").asarray(source)
    source[0] = -5.0  # host -> device copied the data
    assert float(moved[0]) == 1.0
    same = bk.module_for("strict").asarray(moved)  # device -> device: no copy, as cupy.asarray
    same[1] = 7.0
    assert float(moved[1]) == 7.0 and ml.tensor(moved, backend="strict").data.get()[1] == 7.0
    with pytest.raises(AttributeError, match="no attribute 'tofile'"):
        x.tofile  # noqa: B018  (cupy.ndarray has a different I/O surface: go through the host)


# ----------------------------------------------------------------------------- what CuPy allows works
def test_python_and_numpy_scalars_indexing_and_in_place_updates_work():
    x = dev([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(bk.to_numpy(2 * x - 1.0), [[1.0, 3.0], [5.0, 7.0]])
    np.testing.assert_array_equal(bk.to_numpy(np.float32(2) * x), [[2.0, 4.0], [6.0, 8.0]])  # a NumPy scalar
    np.testing.assert_array_equal(bk.to_numpy(1.0 / x[0]), [1.0, 0.5])
    np.testing.assert_array_equal(bk.to_numpy(x[np.array([1, 0])]), [[3.0, 4.0], [1.0, 2.0]])  # host index: copied
    np.testing.assert_array_equal(bk.to_numpy(x[[1], :]), [[3.0, 4.0]])
    x[[0, 1], [1, 0]] = np.array([9.0, 8.0])  # advanced assignment converts the host values (as CuPy)
    x[0, 0] = np.float64(5.0)
    x += 1
    x[1] = dev([0.0, 0.0])
    np.testing.assert_array_equal(bk.to_numpy(x), [[6.0, 10.0], [0.0, 0.0]])
    assert len(x) == 2 and [r.shape for r in x] == [(2,), (2,)] and isinstance(list(x[0])[0], bk.StrictArray)
    assert repr(x).startswith("array(") and "10." in str(x)
    for again in (copy.deepcopy(x), pickle.loads(pickle.dumps(x))):
        assert isinstance(again, bk.StrictArray)
        np.testing.assert_array_equal(again.get(), x.get())
    t = ml.tensor(x, backend="strict")  # Tensor (op) array and array (op) Tensor both stay on the device
    assert (x * t).backend == (t * x).backend == "strict"


def test_strict_rng_is_its_own_stream_seeded_by_manual_seed():
    ml.manual_seed(5)
    first = bk.random_normal((6,), np.float64, backend="strict")
    host = bk.random_normal((6,), np.float64, backend="numpy")
    assert bk.backend_of(first) == "strict" and bk.backend_of(host) == "numpy"
    ml.manual_seed(5)
    np.testing.assert_array_equal(bk.to_numpy(bk.random_normal((6,), np.float64, backend="strict")), bk.to_numpy(first))
    assert not np.array_equal(bk.to_numpy(first), host)  # a stream of its own, as a GPU's


def test_selecting_strict_by_name_block_and_environment():
    assert "strict" in bk.available_backends() and "strict" in bk.BACKENDS
    with bk.use("strict"):
        assert ml.get_backend() == "strict" and bk.xp() is bk.strict_module()
        assert ml.tensor([1.0]).backend == "strict"
    ml.set_backend("strict")
    assert bk.get_array_module(dev([1.0]), np.float32(2.0), None) is bk.strict_module()  # NumPy scalars mix
    env = {k: v for k, v in os.environ.items() if k != "MINILORA_BACKEND"}
    env.update(MINILORA_BACKEND="strict", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", "import minilora as ml; print(ml.get_backend(), ml.tensor([1.0]).backend)"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["strict", "strict"]


# ----------------------------------------------------------------------------- the model paths on strict
CFG = GPTConfig(vocab_size=17, block_size=12, n_layer=2, n_head=2, d_model=16, dropout=0.0)


def _lora_pair():
    """The same float64 GPT with two random-ish adapters, on NumPy and as a strict copy."""
    ml.manual_seed(0)
    model = GPT(CFG).to(dtype="float64")
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v")), adapter_name="a")
    lora.apply_lora(model, lora.LoRAConfig(r=3, alpha=3, target_modules=("q", "fc")), adapter_name="b")
    rng = np.random.default_rng(1)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data[...] = rng.standard_normal(p.shape) * 0.1
    lora.mark_only_lora_as_trainable(model)
    return model, copy.deepcopy(model).to(backend="strict")


def _mixed_forward(model, idx, ids):
    """One adapter per row, without a graph (``lora.mixed_batch`` where it exists, else ``adapter_ids=``)."""
    with ml.no_grad():
        if hasattr(lora, "mixed_batch"):
            with lora.mixed_batch(model, ids):
                return model(idx)
        return model(idx, adapter_ids=ids)


def _ids(n, seed=2):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, size=(n, 8))


def test_gpt_lora_and_mixed_batch_forward_backward_on_strict_equal_numpy():
    host, strict = _lora_pair()
    assert {p.backend for p in strict.parameters()} == {"strict"}
    idx, targets = _ids(4), _ids(4, seed=3)
    mask = np.ones_like(targets)
    mask[:, :3] = 0
    for model in (host, strict):
        model.loss(idx, targets, mask).backward()
    for (name, p), q in zip(host.named_parameters(), strict.parameters()):
        assert bk.backend_of(q.data) == "strict"
        if p.grad is not None:
            np.testing.assert_array_equal(bk.to_numpy(q.grad), p.grad, err_msg=name)
    ids = ["a", "__base__", "b", "a"]
    expected, got = _mixed_forward(host, idx, ids).data, _mixed_forward(strict, idx, ids)
    assert got.backend == "strict"
    np.testing.assert_array_equal(bk.to_numpy(got), expected)


def test_optimizers_fit_and_merge_on_strict_equal_numpy():
    runs = {}
    for backend in ("numpy", "strict"):
        host, strict = _lora_pair()
        model = host if backend == "numpy" else strict
        idx, targets = _ids(4), _ids(4, seed=3)
        for make in (lambda: optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01),
                     lambda: optim.SGD(model.parameters(), lr=0.05, momentum=0.9)):
            history = fit(model, make(), lambda step: (idx, targets, None), 3, progress=False)
        with ml.no_grad():
            unmerged = bk.to_numpy(model(idx))
            lora.merge(model)
            merged = bk.to_numpy(model(idx))
        np.testing.assert_allclose(merged, unmerged, rtol=1e-10, atol=1e-10)
        runs[backend] = ([h for h in history.losses], {n: bk.to_numpy(p.data) for n, p in model.named_parameters()})
    assert runs["strict"][0] == runs["numpy"][0]
    for name, value in runs["numpy"][1].items():
        np.testing.assert_array_equal(runs["strict"][1][name], value, err_msg=name)


def test_generate_and_adapter_files_on_strict_equal_numpy(tmp_path):
    host, strict = _lora_pair()
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    ids = ["a", "b", "__base__", "a"]
    for kwargs in ({}, {"num_beams": 2}, {"temperature": 0.8, "seed": 3}):
        assert generate(strict, prompts, 4, adapter_ids=ids, **kwargs) == generate(host, prompts, 4, adapter_ids=ids, **kwargs)
    path = tmp_path / "b.safetensors"
    lora.save_adapter(path, strict, adapter_name="b")
    _, fresh = _lora_pair()
    for p in fresh.parameters():
        if p.requires_grad:
            p.data[...] = 0.0
    lora.load_adapter(path, fresh, adapter_name="b")
    for (name, p), q in zip(strict.named_parameters(), fresh.parameters()):
        if ".b" in name and "lora_" in name:
            np.testing.assert_array_equal(bk.to_numpy(q.data), bk.to_numpy(p.data), err_msg=name)
            assert q.backend == "strict"


def test_demo_fast_runs_on_the_strict_backend(tmp_path):
    """`MINILORA_BACKEND=strict minilora demo --fast`: the whole demo is device-clean."""
    env = {k: v for k, v in os.environ.items() if k != "MINILORA_BACKEND"}
    env.update(MINILORA_BACKEND="strict", PYTHONPATH=str(REPO), OPENBLAS_NUM_THREADS="1", MPLBACKEND="Agg")
    out = subprocess.run(
        [sys.executable, "-m", "minilora.cli", "demo", "--fast", "--no-progress", "--out", str(tmp_path / "out"),
         "--json", str(tmp_path / "demo.json")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )
    assert out.returncode == 0, f"demo --fast on strict failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    assert "backend strict" in out.stdout
    results = json.loads((tmp_path / "demo.json").read_text())
    for task, methods in results["tasks"].items():
        for method in ("full", "lora"):
            assert 0.0 <= methods[method]["metric"] <= 1.0, (task, method)
    assert results["mixed_batch"]


def test_tutorial_07_check_catches_an_np_exp_softmax_without_a_gpu():
    """A softmax written with np.exp passes on NumPy; the check's strict leg fails it, with the fix."""
    from minilora import exercises as ex

    def numpy_only(a):
        e = np.exp(a - a.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    assert numpy_only(np.array([[1.0, 2.0]])).sum() == pytest.approx(1.0)
    with pytest.raises(ex.ExerciseError, match=r"numpy\.exp was called on a device array.*get_array_module"):
        ex.check_softmax_any_backend(numpy_only)
    with pytest.raises(ex.ExerciseError, match="strict backend you returned a minilora.strict.StrictArray"):
        ex.check_host_logits(lambda model, idx: model(idx).data)  # a device array is not a host array


def test_lora_parameters_follow_the_weights_backend_not_the_current_one():
    """apply_lora on a strict model while the current backend is numpy: A and B on strict (found by tutorial 07)."""
    model = GPT(CFG).to(backend="strict")
    assert ml.get_backend() == "numpy"
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v")))
    assert {p.backend for p in model.parameters()} == {"strict"}
    assert model(_ids(2)).backend == "strict"
