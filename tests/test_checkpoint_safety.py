"""Checkpoints as safe as adapter files: nothing lost, nothing let in.

- a corrupt, truncated or crafted checkpoint is refused and the model, the optimizer, the
  scheduler and the RNG stay bit-identical (hypothesis fuzz: truncations, byte flips in the
  length prefix, the header and the data; crafted metadata and tensors with a valid SHA-256);
- the NaN guard never saves a non-finite state, keeps the last finite checkpoint and puts the
  run back to it; resume can replace the saved learning rate;
- a training process SIGKILLed while it saves leaves a loadable previous checkpoint, and the
  next save of that target removes the temporary files the kills left.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import minilora as ml
from minilora import backend as bk
from minilora import optim
from minilora.io import FileFormatError, digest, save_arrays
from minilora.models import GPT
from minilora.train import TrainingDivergedError, fit, load_checkpoint, save_checkpoint
from tiny_run import TINY, tiny_run

REPO = Path(__file__).resolve().parents[1]
_setup = tiny_run


def _state(model, opt=None, sched=None):
    """Everything a load may change, as host copies (compared bit for bit, NaN == NaN)."""
    out = {f"param/{n}": bk.to_numpy(p.data).copy() for n, p in model.named_parameters()}
    if opt is not None:
        out.update({f"optim/{k}": v.copy() for k, v in opt.state_arrays().items()})
        out["optim-meta"] = json.dumps(opt.state_meta(), sort_keys=True)
    if sched is not None:
        out["sched"] = json.dumps(sched.state_dict(), sort_keys=True)
    out["rng"] = json.dumps(bk.rng("numpy").bit_generator.state, sort_keys=True, default=str)
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], str):
            assert a[k] == b[k], k
        else:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k], equal_nan=True), k


def _read(path):
    """(arrays, meta) of a checkpoint, read with plain safetensors (to craft variants)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = json.loads(f.metadata()["minilora"])
    return arrays, meta


def _craft(path, arrays, meta):
    """Write a file with a *valid* SHA-256 over ``arrays`` and ``meta``: only content checks can refuse it."""
    meta = {k: v for k, v in meta.items() if k != "sha256"}
    meta["sha256"] = digest(arrays, meta)
    save_file(arrays, str(path), metadata={"minilora": json.dumps(meta)})


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory):
    """A LoRA run of 3 steps: (path, bytes); parameters, AdamW moments, scheduler, RNG and history inside."""
    folder = tmp_path_factory.mktemp("ckpt")
    model, opt, sched, get_batch = _setup("lora")
    fit(model, opt, get_batch, 3, scheduler=sched, progress=False, checkpoint_dir=folder, save_every=3)
    path = folder / "last.safetensors"
    return path, path.read_bytes()


def _load_refused(path, message=None, method="lora"):
    """Load ``path`` into a fresh run: FileFormatError naming the file, and nothing changed."""
    model, opt, sched, _ = _setup(method, seed=1)
    before = _state(model, opt, sched)
    with pytest.raises(FileFormatError, match=str(path)) as err:
        load_checkpoint(path, model, opt, sched)
    if message is not None:
        assert message in str(err.value), str(err.value)
    _assert_same(_state(model, opt, sched), before)
    return str(err.value)


# ----------------------------------------------------------------------------- integrity (H3)
def test_round_trip_still_loads_and_records_format_and_digest(lora_checkpoint, tmp_path):
    path, data = lora_checkpoint
    _, meta = _read(path)
    assert meta["format"] == "minilora-checkpoint" and meta["format_version"] == 1 and len(meta["sha256"]) == 64
    assert meta["base_tensors"] and all(len(v) == 16 for v in meta["base_tensors"].values())
    model, opt, sched, _ = _setup("lora", seed=0)  # the base the run trained on
    step, history, _ = load_checkpoint(path, model, opt, sched)
    assert step == 3 and len(history.losses) == 3
    model, opt, sched, _ = _setup("lora", seed=1)  # another base (other W0, embeddings, ...): refused unless meant
    with pytest.raises(FileFormatError, match="saved from a run on another base model"):
        load_checkpoint(path, model, opt, sched)
    step, history, _ = load_checkpoint(path, model, opt, sched, check_base=False)
    assert step == 3 and len(history.losses) == 3
    arrays, _ = _read(path)
    for name, p in model.named_parameters(trainable_only=True):
        assert np.array_equal(p.data, arrays[f"param/{name}"])


def test_a_flipped_exponent_byte_in_lora_B_is_refused(lora_checkpoint, tmp_path):
    path, data = lora_checkpoint
    arrays, _ = _read(path)
    header = int.from_bytes(data[:8], "little")
    info = json.loads(data[8:8 + header])["param/blocks.0.attn.q.lora_B.default"]
    start = 8 + header + info["data_offsets"][0]
    bad = bytearray(data)
    bad[start + 3] ^= 0x40  # the exponent byte of the first float32 (little endian)
    target = tmp_path / "flip.safetensors"
    target.write_bytes(bytes(bad))
    _load_refused(target, "the tensor data is corrupt")


@pytest.mark.parametrize("case", [
    "nan_param", "float64_param", "int32_param", "missing_trainable", "extra_tensor", "frozen_param_present",
    "negative_exp_avg_sq", "nan_exp_avg", "optimizer_type", "step_text", "step_negative", "no_history",
    "history_garbage", "rng_garbage", "lr_nan", "lr_text", "no_format", "format_version", "missing_optim_array",
    "scheduler_garbage", "param_shape", "optim_entry_shape", "scope_garbage",
])
def test_crafted_checkpoints_are_refused_before_anything_changes(lora_checkpoint, tmp_path, case):
    """Each variant has a valid SHA-256 (anyone can recompute it): the content checks must catch it."""
    path, _ = lora_checkpoint
    arrays, meta = _read(path)
    q_b = "param/blocks.0.attn.q.lora_B.default"
    first = meta["optimizer"]["params"][0]["name"]  # the optimizer's own name for lora_A of q
    expected = {
        "nan_param": "hold NaN or inf", "float64_param": "is float64 in the checkpoint",
        "int32_param": "is int32 in the checkpoint", "missing_trainable": "are not in the checkpoint",
        "extra_tensor": "neither parameters nor optimizer state", "frozen_param_present": "frozen in this model",
        "negative_exp_avg_sq": "negative values", "nan_exp_avg": "NaN or inf", "optimizer_type": "saved by 'SGD'",
        "step_text": "not a step number", "step_negative": "not a step number", "no_history": "history is malformed",
        "history_garbage": "history is malformed", "rng_garbage": "RNG state is invalid", "lr_nan": "not a valid value",
        "lr_text": "not a valid value", "no_format": "not a minilora checkpoint", "format_version": "format_version 999",
        "missing_optim_array": "are missing from the saved state", "scheduler_garbage": "no valid scheduler state",
        "param_shape": "has shape (16, 3)", "optim_entry_shape": "is for shape",
        "scope_garbage": "not 'trainable' or 'all'",
    }[case]
    if case == "nan_param":
        arrays[q_b] = arrays[q_b].copy()
        arrays[q_b][0, 0] = np.nan
    elif case == "float64_param":
        arrays[q_b] = arrays[q_b].astype(np.float64)
    elif case == "int32_param":
        arrays[q_b] = arrays[q_b].astype(np.int32)
    elif case == "missing_trainable":
        del arrays[q_b]
    elif case == "extra_tensor":
        arrays["evil"] = np.zeros(3, np.float32)
    elif case == "frozen_param_present":
        arrays["param/wte.weight"] = np.zeros((96, 16), np.float32)
    elif case == "negative_exp_avg_sq":
        arrays[f"optim/{first}.exp_avg_sq"] = -np.ones((2, 16), np.float32)
    elif case == "nan_exp_avg":
        arrays[f"optim/{first}.exp_avg"] = np.full((2, 16), np.nan, np.float32)
    elif case == "optimizer_type":
        meta["optimizer"]["optimizer"] = "SGD"
    elif case == "step_text":
        meta["step"] = "ten"
    elif case == "step_negative":
        meta["step"] = -1
    elif case == "no_history":
        del meta["history"]
    elif case == "history_garbage":
        meta["history"]["losses"] = ["x"] * len(meta["history"]["losses"])
    elif case == "rng_garbage":
        meta["rng"] = {"bit_generator": "PCG64", "state": "garbage"}
    elif case == "lr_nan":
        meta["optimizer"]["hyperparameters"]["lr"] = float("nan")
    elif case == "lr_text":
        meta["optimizer"]["hyperparameters"]["lr"] = "fast"
    elif case == "no_format":
        del meta["format"]
    elif case == "format_version":
        meta["format_version"] = 999
    elif case == "missing_optim_array":
        del arrays[f"optim/{first}.exp_avg"]
    elif case == "scheduler_garbage":
        meta["scheduler"] = {"base_lr": "x"}
    elif case == "param_shape":
        arrays[q_b] = np.zeros((16, 3), np.float32)
    elif case == "optim_entry_shape":
        meta["optimizer"]["params"][0]["shape"] = [7, 7]
    elif case == "scope_garbage":
        meta["params"] = "some"
    target = tmp_path / "crafted.safetensors"
    _craft(target, arrays, meta)
    _load_refused(target, expected)


def test_a_full_fine_tuning_checkpoint_does_not_half_load_into_a_lora_run(tmp_path):
    """A load that the optimizer state refuses changes no parameter: every check runs before the first write."""
    model, opt, sched, get_batch = _setup("full")
    fit(model, opt, get_batch, 2, scheduler=sched, progress=False, checkpoint_dir=tmp_path, save_every=2)
    message = _load_refused(tmp_path / "last.safetensors", method="lora")
    assert "frozen in this model" in message or "not in the checkpoint" in message
    # and an SGD run's checkpoint into an AdamW optimizer
    ml.manual_seed(0)
    model = GPT(TINY)
    sgd = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    save_checkpoint(tmp_path / "sgd.safetensors", model, sgd, 1)
    _load_refused(tmp_path / "sgd.safetensors", "saved by 'SGD'", method="full")


# ----------------------------------------------------------------------------- the fuzz
_MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 0.999)),
    st.tuples(st.just("flip prefix"), st.integers(0, 7), st.integers(1, 255)),
    st.tuples(st.just("flip header"), st.floats(0.0, 0.999), st.integers(1, 255)),
    st.tuples(st.just("flip data"), st.floats(0.0, 0.999), st.integers(1, 255)),
)


@settings(max_examples=max(60, settings().max_examples))  # at least 60 files, more under --hypothesis-profile=thorough
@given(_MUTATIONS)
def test_fuzzed_checkpoints_are_refused_or_load_the_same(lora_checkpoint, tmp_path_factory, mutation):
    """Truncations and byte flips anywhere: refused with everything bit-identical, or (a flip of JSON
    whitespace in the header, say) loaded to exactly what the intact file gives."""
    path, data = lora_checkpoint
    header = int.from_bytes(data[:8], "little")
    bad = bytearray(data)
    kind = mutation[0]
    if kind == "truncate":
        bad = bad[: int(mutation[1] * len(data))]
    else:
        lo, hi = {"flip prefix": (0, 8), "flip header": (8, 8 + header), "flip data": (8 + header, len(data))}[kind]
        at = mutation[1] if kind == "flip prefix" else lo + int(mutation[1] * (hi - lo))
        bad[at] ^= mutation[2]
    target = tmp_path_factory.mktemp("fuzz") / "last.safetensors"
    target.write_bytes(bytes(bad))
    model, opt, sched, _ = _setup("lora", seed=1)
    before = _state(model, opt, sched)
    try:
        load_checkpoint(target, model, opt, sched)
    except FileFormatError as exc:
        assert str(target) in str(exc)
        _assert_same(_state(model, opt, sched), before)
        return
    intact_model, intact_opt, intact_sched, _ = _setup("lora", seed=1)
    load_checkpoint(path, intact_model, intact_opt, intact_sched)
    _assert_same(_state(model, opt, sched), _state(intact_model, intact_opt, intact_sched))


# ----------------------------------------------------------------------------- NaN guard (H1)
def _straight(steps, method="full"):
    model, opt, sched, get_batch = _setup(method)
    fit(model, opt, get_batch, steps, scheduler=sched, progress=False)
    return {n: p.data.copy() for n, p in model.named_parameters()}


def test_a_nan_update_after_a_finite_loss_never_reaches_the_checkpoint(tmp_path):
    """A negative exp_avg_sq (corrupt state) gives a NaN update although the loss is finite."""
    at_five = _straight(5)  # first: the runs share the global dropout RNG
    model, opt, sched, get_batch = _setup()

    def poisoned(step):
        if step == 7:
            opt.state[0]["exp_avg_sq"][...] = -1.0
        return get_batch(step)

    with pytest.raises(TrainingDivergedError, match="the update made a parameter NaN or inf at step 7") as err:
        fit(model, opt, poisoned, 12, scheduler=sched, progress=False, checkpoint_dir=tmp_path, save_every=5)
    assert "restored from the last checkpoint" in str(err.value) and "(step 5)" in str(err.value)
    # the file holds step 5, finite, bit-identical to an uninterrupted run's step 5
    fresh, fresh_opt, fresh_sched, _ = _setup(seed=1)
    step, history, _ = load_checkpoint(tmp_path / "last.safetensors", fresh, fresh_opt, fresh_sched)
    assert step == 5 and len(history.losses) == 5
    for name, p in fresh.named_parameters():
        assert np.array_equal(p.data, at_five[name]), name
    # and the run in memory was put back to it: weights and moments finite again
    for name, p in model.named_parameters():
        assert np.array_equal(p.data, at_five[name]), name
    assert all(np.isfinite(a).all() and (not k.endswith("exp_avg_sq") or (a >= 0).all())
               for k, a in opt.state_arrays().items())


def test_a_huge_lr_stops_at_the_first_bad_update_and_resume_can_lower_it(tmp_path):
    """A non-finite update never reaches last.safetensors, and resume with restore_hyperparameters=False keeps the new lr."""
    model, opt, sched, get_batch = _setup(lr=1e39)  # the warm-up gives lr = 0 at step 0, 5e38 at step 1
    with pytest.raises(TrainingDivergedError, match="NaN or inf at step 1") as err:
        fit(model, opt, get_batch, 12, scheduler=sched, progress=False, checkpoint_dir=tmp_path, save_every=1)
    assert "(step 1)" in str(err.value) and "it was 5e+38" in str(err.value)
    fresh, fresh_opt, fresh_sched, _ = _setup(seed=1)
    assert load_checkpoint(tmp_path / "last.safetensors", fresh, fresh_opt, fresh_sched)[0] == 1
    assert all(np.isfinite(p.data).all() for p in fresh.parameters())
    assert all(np.isfinite(p.data).all() for p in model.parameters())  # memory is back at step 1 too
    (tmp_path / "last.safetensors").unlink()
    model, opt, sched, get_batch = _setup(lr=1e39)
    with pytest.raises(TrainingDivergedError, match="No checkpoint of this run exists"):
        fit(model, opt, get_batch, 12, scheduler=sched, progress=False)

    model, opt, sched, get_batch = _setup()
    fit(model, opt, get_batch, 4, scheduler=sched, progress=False, checkpoint_dir=tmp_path, save_every=2)
    good = (tmp_path / "last.safetensors").read_bytes()
    model, opt, sched, get_batch = _setup(lr=1e39)  # resume with a crazy lr, explicitly
    with pytest.raises(TrainingDivergedError, match=r"at step 4: .* \(it was 9\.05e\+38\)"):
        fit(model, opt, get_batch, 12, scheduler=sched, progress=False, checkpoint_dir=tmp_path, save_every=2,
            resume=True, restore_hyperparameters=False)
    assert (tmp_path / "last.safetensors").read_bytes() == good  # the last finite checkpoint is kept
    model, opt, sched, get_batch = _setup(lr=1e-6)
    history = fit(model, opt, get_batch, 12, scheduler=sched, progress=False, checkpoint_dir=tmp_path, save_every=2,
                  resume=True, restore_hyperparameters=False)
    assert history.steps == list(range(12))
    assert max(history.lrs[4:]) <= 1e-6 < min(history.lrs[:4])  # the new lr from step 4 on, the old one before
    assert all(np.isfinite(p.data).all() for p in model.parameters())


def test_resume_restores_the_saved_lr_by_default(tmp_path):
    model, opt, sched, get_batch = _setup()
    fit(model, opt, get_batch, 4, scheduler=sched, progress=False, checkpoint_dir=tmp_path, save_every=4)
    model, opt, sched, _ = _setup(lr=1e-6)
    load_checkpoint(tmp_path / "last.safetensors", model, opt, sched)
    assert sched.base_lr == 3e-3
    model, opt, sched, _ = _setup(lr=1e-6)
    load_checkpoint(tmp_path / "last.safetensors", model, opt, sched, restore_hyperparameters=False)
    assert sched.base_lr == 1e-6 and sched.last_step == 4
    assert opt.lr == 1e-6 * optim.warmup_cosine(4, total=12, warmup=2)


def test_save_checkpoint_refuses_non_finite_state_and_keeps_the_previous_file(tmp_path):
    model, opt, sched, _ = _setup()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model, opt, 1)
    good = path.read_bytes()
    model.wte.weight.data[0, 0] = np.inf
    with pytest.raises(FloatingPointError, match="wte.weight hold NaN or inf"):
        save_checkpoint(path, model, opt, 2)
    model.wte.weight.data[0, 0] = 0.0
    opt.state[0]["exp_avg"][...] = np.nan
    with pytest.raises(FloatingPointError, match="exp_avg hold NaN or inf"):
        save_checkpoint(path, model, opt, 2)
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["c.safetensors"]


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(tmp_path):
    """Resuming with fewer steps than the checkpoint holds is refused; last.safetensors stays the step it says."""
    model, opt, sched, get_batch = _setup()
    fit(model, opt, get_batch, 6, scheduler=sched, progress=False, checkpoint_dir=tmp_path, save_every=3)
    good = (tmp_path / "last.safetensors").read_bytes()
    model, opt, sched, get_batch = _setup()
    with pytest.raises(ValueError, match="at step 6, beyond steps=4"):
        fit(model, opt, get_batch, 4, scheduler=sched, progress=False, checkpoint_dir=tmp_path, save_every=3,
            resume=True)
    assert (tmp_path / "last.safetensors").read_bytes() == good


# ----------------------------------------------------------------------------- temp files
def test_the_next_save_removes_temp_files_of_dead_writers_only(tmp_path):
    target = tmp_path / "last.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = [tmp_path / f".last.safetensors.tmp-{dead_pid}-ab12cd34", tmp_path / ".tmp-k3j4h5last.safetensors"]
    alive = tmp_path / f".last.safetensors.tmp-{os.getppid()}-00000000"  # a live writer's file: kept
    other = tmp_path / f".other.safetensors.tmp-{dead_pid}-ab12cd34"  # another target's: kept
    for f in [*stale, alive, other]:
        f.write_bytes(b"x" * 100)
    save_arrays(target, {"w": np.zeros(2)})
    assert sorted(os.listdir(tmp_path)) == sorted([target.name, alive.name, other.name])


_CHILD = textwrap.dedent("""
    import functools, os, sys, time
    sys.path.insert(0, {tests!r})
    import minilora.io as mio
    from tiny_run import tiny_run as _setup
    from minilora.train import fit

    atomic_write = mio.atomic_write

    def slow_atomic_write(path, write):  # a slow disk: the temp file is written, then a pause before the rename
        def slow(tmp):
            write(tmp)
            time.sleep(0.03)
        atomic_write(path, slow)

    mio.atomic_write = slow_atomic_write
    folder = sys.argv[1]
    model, opt, sched, get_batch = _setup(total=400)
    resume = os.path.exists(os.path.join(folder, "last.safetensors"))
    fit(model, opt, get_batch, 400, scheduler=sched, progress=False, checkpoint_dir=folder, save_every=1, resume=resume)
""")


def test_sigkill_during_saves_keeps_the_previous_checkpoint_and_resume_is_exact(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=str(REPO / "tests")))
    folder = tmp_path / "run"
    last = folder / "last.safetensors"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"}
    rng = np.random.default_rng(0)
    leaked = 0
    for kill in range(6):  # at least 2 kills, more until one has landed inside a save (a save is ~90 % of a step)
        if kill >= 2 and leaked:
            break
        before = last.stat().st_mtime_ns if last.exists() else None
        child = subprocess.Popen([sys.executable, str(script), str(folder)], env=env, cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not (last.exists() and last.stat().st_mtime_ns != before):  # this child saved at least once
                assert child.poll() is None, child.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(float(rng.uniform(0.02, 0.15)))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stderr.close()
        leaked += sum(".tmp-" in n for n in os.listdir(folder))
        model, opt, sched, _ = _setup(seed=1, total=400)
        step, history, _ = load_checkpoint(last, model, opt, sched)  # the previous checkpoint is whole
        assert step >= 1 and history.steps == list(range(step)), kill
    assert leaked >= 1  # the kills did land inside saves
    steps = step + 3
    model, opt, sched, get_batch = _setup(total=400)
    resumed = fit(model, opt, get_batch, steps, scheduler=sched, progress=False, checkpoint_dir=folder, save_every=1,
                  resume=True)
    assert [n for n in os.listdir(folder) if ".tmp-" in n] == []  # the next save removed the killed writers' files
    straight_model, straight_opt, straight_sched, get_batch = _setup(total=400)
    straight = fit(straight_model, straight_opt, get_batch, steps, scheduler=straight_sched, progress=False)
    assert resumed.losses == straight.losses
    for (name, p), q in zip(model.named_parameters(), straight_model.parameters()):
        assert np.array_equal(p.data, q.data), name


def test_finetune_with_lr_zero_trains_at_lr_zero():
    """lr=0.0 is a learning rate, not "the default": nothing moves."""
    from minilora.recipes import finetune

    ml.manual_seed(0)
    run = finetune("classify", "lora", base=GPT(TINY), steps=2, lr=0.0, n_train=16, n_eval=2, measure_memory=False,
                   progress=False)
    assert run.config["lr"] == 0.0 and run.history.lrs == [0.0, 0.0]
    b_matrices = [p for n, p in run.model.named_parameters() if ".lora_B." in n]
    assert b_matrices and all(not p.data.any() for p in b_matrices)  # B starts at 0 and never moved


def test_lora_plus_groups_resume_with_their_own_lrs_or_the_saved_ones(tmp_path):
    """restore_hyperparameters=False keeps every group's lr (the LoRA+ ratio lr_B / lr_A included)."""
    def run(lr):
        model, _, _, _ = _setup("lora")
        opt = optim.AdamW(optim.lora_plus_param_groups(model, lr=lr, ratio=16))
        return model, opt, optim.LRScheduler(opt, functools.partial(optim.warmup_cosine, total=12, warmup=2))

    model, opt, sched = run(1e-3)
    for _ in range(3):
        sched.step()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model, opt, 3, scheduler=sched)
    saved_lrs = [g["lr"] for g in opt.param_groups]
    model, opt, sched = run(1e-5)
    load_checkpoint(path, model, opt, sched)
    assert [g["lr"] for g in opt.param_groups] == saved_lrs
    model, opt, sched = run(1e-5)
    load_checkpoint(path, model, opt, sched, restore_hyperparameters=False)
    factor = optim.warmup_cosine(3, total=12, warmup=2)
    assert [g["lr"] for g in opt.param_groups] == [1e-5 * factor, 16e-5 * factor]
    # a checkpoint of one group into an optimizer of two: refused, nothing changed
    one_model, one_opt, one_sched, _ = _setup("lora")
    save_checkpoint(path, one_model, one_opt, 1, scheduler=one_sched)
    model, opt, sched = run(1e-5)
    before = _state(model, opt, sched)
    with pytest.raises(FileFormatError, match=str(path)):
        load_checkpoint(path, model, opt, sched)
    _assert_same(_state(model, opt, sched), before)
