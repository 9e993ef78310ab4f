"""Adapter files, base-model files and the adapter life cycle, tried as a hostile user would.

The config is inside the SHA-256 and range-checked; the base model an adapter was trained on
is fingerprinted; files get the umask's mode, symlinks are written through, and a missing,
unreadable, directory or FIFO path gets a message that says which (a FIFO never hangs a load);
merge(safe=False) says what it merged; deleting adapters never changes other adapters silently.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import minilora as ml
from minilora import lora
from minilora.io import FileFormatError, digest, load_arrays, save_arrays
from minilora.models import GPT, GPTConfig
from minilora.models.pretrained import load_model, save_model
from minilora.train import load_checkpoint, save_checkpoint

CFG = lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v"))


def tiny_gpt(seed=0, n_layer=2):
    ml.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=24, block_size=8, n_layer=n_layer, n_head=2, d_model=16))


def trained(seed=0, name="default", cfg=CFG, n_layer=2):
    model = tiny_gpt(seed, n_layer)
    lora.apply_lora(model, cfg, name)
    rng = np.random.default_rng(1)
    params = dict(model.named_parameters())
    for n in lora.lora_parameter_names(model):
        params[n].data[...] = (rng.standard_normal(params[n].shape) * 0.3).astype(np.float32)
    return model


def snapshot(model):
    return {n: p.data.copy() for n, p in model.named_parameters()}


def assert_untouched(model, before, adapters):
    now = snapshot(model)
    assert list(now) == list(before) and lora.list_adapters(model) == adapters
    for n in now:
        assert np.array_equal(now[n], before[n], equal_nan=True), n


def refused(path, model, message, **kwargs):
    before, adapters = snapshot(model), lora.list_adapters(model)
    with pytest.raises(lora.AdapterFileError, match=str(path)) as err:
        lora.load_adapter(path, model, **kwargs)
    assert message in str(err.value), str(err.value)
    assert_untouched(model, before, adapters)
    return str(err.value)


def read(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["minilora"])  # noqa: SIM118


def craft(path, arrays, meta, tensors_only=False):
    """A file with a valid SHA-256 for its content: only the content checks can refuse it."""
    meta = {k: v for k, v in meta.items() if k != "sha256"}
    meta["sha256"] = digest(arrays, None if tensors_only else meta)
    save_file(arrays, str(path), metadata={"minilora": json.dumps(meta)})


@pytest.fixture
def adapter_file(tmp_path):
    path = tmp_path / "a.safetensors"
    lora.save_adapter(path, trained(), "default")
    return path


# ----------------------------------------------------------------------------- the config inside the digest
def test_one_flipped_bit_in_the_stored_alpha_is_refused(adapter_file):
    data = bytearray(adapter_file.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    at = data.index(b'alpha\\": 4.0', 0, header_end) + len(b'alpha\\": ')
    data[at] ^= 0x02  # "4.0" -> "6.0": still valid JSON, scaling 2.0 -> 3.0
    adapter_file.write_bytes(bytes(data))
    refused(adapter_file, tiny_gpt(), "the tensor data is corrupt or the metadata was changed")


CRAFTED = [
    (lambda m: m["config"].update(dropout=0.99), "dropout 0.99, outside [0, 0.9]"),
    (lambda m: m["config"].update(alpha=1e308), "outside (0, 10000]"),
    (lambda m: m.update(format_version=999), "format_version 999; this minilora reads versions [1, 2, 3]"),
    (lambda m: m.update(format_version=True), "format_version True"),
    (lambda m: m["config"].update(r="2"), "the stored LoRAConfig is invalid"),
    (lambda m: m.update(adapter_name="a.b"), "the stored adapter name is invalid"),
]


@pytest.mark.parametrize("change, message", CRAFTED)
def test_crafted_configs_are_refused(adapter_file, change, message):
    arrays, meta = read(adapter_file)
    change(meta)
    craft(adapter_file, arrays, meta)
    for model in (tiny_gpt(), trained()):
        refused(adapter_file, model, message)


@pytest.mark.parametrize("change, message", CRAFTED)
def test_readers_without_a_model_refuse_crafted_files_as_load_adapter_does(adapter_file, change, message):
    """``minilora analyze`` reads A and B through lora.files.read_adapter: the same checks, no model needed."""
    from minilora.hf.commands import adapter_updates

    arrays, meta = read(adapter_file)
    change(meta)
    craft(adapter_file, arrays, meta)
    for reader in (lora.files.read_adapter, adapter_updates):
        with pytest.raises(lora.AdapterFileError, match=re.escape(str(adapter_file))) as err:
            reader(adapter_file)
        assert message in str(err.value), str(err.value)


def test_readers_without_a_model_refuse_a_flipped_byte_and_a_missing_partner(adapter_file):
    from minilora.hf.commands import adapter_updates

    assert sorted(adapter_updates(adapter_file)[0]) == [f"blocks.{i}.attn.{p}" for i in range(2) for p in "qv"]
    good = adapter_file.read_bytes()
    data = bytearray(good)
    data[-1] ^= 0x01  # one bit of the last tensor's data
    adapter_file.write_bytes(bytes(data))
    with pytest.raises(lora.AdapterFileError, match="the tensor data is corrupt or the metadata was changed"):
        adapter_updates(adapter_file)
    adapter_file.write_bytes(good)
    arrays, meta = read(adapter_file)
    del arrays["blocks.1.attn.v.lora_B.default"]
    craft(adapter_file, arrays, meta)
    with pytest.raises(lora.AdapterFileError, match=r"blocks\.1\.attn\.v\.lora_A\.default has no "
                                                    r"blocks\.1\.attn\.v\.lora_B\.default beside it"):
        adapter_updates(adapter_file)


def test_a_non_string_sha256_is_a_clear_error_not_a_type_error(adapter_file):
    arrays, meta = read(adapter_file)
    meta["sha256"] = 12345
    save_file(arrays, str(adapter_file), metadata={"minilora": json.dumps(meta)})
    refused(adapter_file, tiny_gpt(), "'sha256' is 12345, not a 64-digit SHA-256")


def test_an_update_that_overflows_the_weight_dtype_is_refused(adapter_file):
    arrays, meta = read(adapter_file)
    arrays["blocks.1.attn.v.lora_B.default"] = np.full((16, 2), 1e30, np.float32)
    arrays["blocks.1.attn.v.lora_A.default"] = np.full((2, 16), 1e30, np.float32)
    craft(adapter_file, arrays, meta)
    refused(adapter_file, tiny_gpt(), "ΔW = s·B A of blocks.1.attn.v is not finite in float32")


def test_format_version_1_files_still_load(adapter_file):
    """format_version 1: a SHA-256 over the tensors only, and no base fingerprint."""
    arrays, meta = read(adapter_file)
    meta["format_version"] = 1
    del meta["base_sha256"]
    craft(adapter_file, arrays, meta, tensors_only=True)
    model = tiny_gpt()
    lora.load_adapter(adapter_file, model)
    idx = np.arange(16).reshape(2, 8) % 24
    assert np.array_equal(model(idx).data, trained()(idx).data)


# ----------------------------------------------------------------------------- the base fingerprint
def test_an_adapter_from_another_base_with_the_same_shapes_is_refused(adapter_file):
    other = tiny_gpt(seed=5)  # same config, other weights
    refused(adapter_file, other, "the adapter was trained on another base model")
    lora.load_adapter(adapter_file, other, check_base=False)  # explicitly wanted: loads
    assert lora.list_adapters(other) == ["default"]
    same = tiny_gpt(seed=0)
    same.to(dtype="float32")
    lora.load_adapter(adapter_file, same)
    # the fingerprint ignores other adapters in the model (they are not the base)
    crowded = trained(name="other")
    lora.load_adapter(adapter_file, crowded)
    assert lora.list_adapters(crowded) == ["other", "default"]
    assert "base_sha256" in read(adapter_file)[1]


def _logits(model):
    idx = np.arange(16).reshape(2, 8) % 24
    model.eval()
    with ml.no_grad():
        return np.asarray(model(idx).data)


def test_the_fingerprint_covers_the_adapted_linear_weights(adapter_file):
    """One model's embeddings, LayerNorms and biases with another's Linear weights is another base."""
    hybrid, other = tiny_gpt(seed=0), dict(tiny_gpt(seed=5).named_parameters())
    for name, p in hybrid.named_parameters():
        if name.startswith("blocks.") and name.endswith(".weight") and ("attn." in name or "mlp." in name):
            p.data[...] = other[name].data
    message = refused(adapter_file, hybrid, "the adapter was trained on another base model")
    assert "blocks.0.attn.q.weight" in message and "12 of the model's 36 base tensors" in message
    # a single adapted weight moved by one element is enough
    nudged = tiny_gpt(seed=0)
    nudged.blocks[1].attn.v.weight.data[3, 4] += 1e-3
    assert "blocks.1.attn.v.weight" in refused(adapter_file, nudged, "trained on another base model")


def test_an_adapter_is_refused_on_a_model_it_is_merged_into(adapter_file):
    merged = lora.merge_and_unload(trained())
    message = refused(adapter_file, merged, "this adapter is merged into the model's weights already")
    assert "add ΔW twice" in message
    fresh = tiny_gpt(seed=0)  # the unmerged base takes it, and equals the merged model
    lora.load_adapter(adapter_file, fresh)
    assert np.allclose(_logits(fresh), _logits(merged), atol=1e-5)


def test_pissa_and_merged_models_keep_the_fingerprint_of_their_original_base(tmp_path):
    pissa = tiny_gpt(seed=0)
    lora.apply_lora(pissa, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v"), init="pissa"))
    lora.save_adapter(tmp_path / "p.safetensors", pissa)
    lora.load_adapter(tmp_path / "p.safetensors", tiny_gpt(seed=0))  # the original W0, not the residual, is recorded
    model = trained()
    lora.merge(model)  # keep_original: the pre-merge copy is the base
    lora.save_adapter(tmp_path / "m.safetensors", model)
    lora.load_adapter(tmp_path / "m.safetensors", tiny_gpt(seed=0))
    lora.unmerge(model)
    lora.merge(model, keep_original=False)  # no copy of W0 is left: the file could not record it
    with pytest.raises(RuntimeError, match="keep_original=False"):
        lora.save_adapter(tmp_path / "n.safetensors", model)


# ----------------------------------------------------------------------------- modes, symlinks, special paths
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        lora.save_adapter(tmp_path / "a.safetensors", trained())
        save_checkpoint(tmp_path / "c.safetensors", trained())
        save_arrays(tmp_path / "w.safetensors", {"w": np.zeros(2)})
    finally:
        os.umask(old)
    for name in ("a.safetensors", "c.safetensors", "w.safetensors"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode, name


def test_replacing_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "a.safetensors"
    lora.save_adapter(path, trained())
    os.chmod(path, 0o640)
    lora.save_adapter(path, trained())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_saving_to_a_symlink_writes_through_it(tmp_path):
    real = tmp_path / "store" / "a.safetensors"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "current.safetensors"
    link.symlink_to(real)
    lora.save_adapter(link, trained())
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert sorted(os.listdir(real.parent)) == ["a.safetensors"]  # written (and its temp file) beside the target
    lora.load_adapter(real, tiny_gpt())


def test_writing_onto_a_directory_or_fifo_is_refused_clearly(tmp_path):
    with pytest.raises(FileFormatError, match="is a directory; give a file name inside it"):
        lora.save_adapter(tmp_path, trained())
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(FileFormatError, match=r"is a FIFO \(named pipe\), not a regular file"):
        save_arrays(fifo, {"w": np.zeros(2)})


def _alarm(seconds):
    def ring(signum, frame):
        raise TimeoutError("the load blocked")

    signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)


@pytest.mark.parametrize("loader", ["adapter", "checkpoint", "model"])
def test_reading_special_paths_says_what_they_are_and_never_hangs(tmp_path, loader):
    load = {
        "adapter": lambda p: lora.load_adapter(p, tiny_gpt()),
        "checkpoint": lambda p: load_checkpoint(p, tiny_gpt()),
        "model": lambda p: load_model(p),
    }[loader]
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    cases = [(tmp_path / "missing.safetensors", "no such file"), (tmp_path, "is a directory, not a file"),
             (fifo, "is a FIFO (named pipe), not a regular file"),
             (tmp_path / "missing" / "x.safetensors", "no such file")]
    _alarm(10)
    try:
        for path, message in cases:
            with pytest.raises(FileFormatError) as err:
                load(path)
            assert str(err.value) == f"{path}: {message}"
    finally:
        signal.alarm(0)


def _as_nobody(fn):
    """fn() in a forked child that drops to user 'nobody' (65534) when run as root; returns its string."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no exec, the modules are loaded already
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            try:
                message = fn()
            except Exception as exc:  # noqa: BLE001 (reported to the parent, which asserts on it)
                message = f"{type(exc).__name__}: {exc}"
            os.write(write_end, message.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        message = f.read().decode()
    os.waitpid(pid, 0)
    return message


@pytest.fixture
def open_folder():
    """A folder every user can enter (pytest's tmp_path is under a root-only 0700 folder)."""
    folder = Path(tempfile.mkdtemp(prefix="minilora-perm-"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder)


def test_an_unreadable_file_says_permission_denied(open_folder):
    """Mode 000 (root reads anything, so the reader is 'nobody')."""
    path = open_folder / "a.safetensors"
    lora.save_adapter(path, trained())
    os.chmod(path, 0)
    message = _as_nobody(lambda: lora.load_adapter(path, None))
    assert message == (f"AdapterFileError: {path}: permission denied: this user may not read it "
                       "(check its mode and owner, e.g. `ls -l`)")


def test_writing_into_a_folder_without_permission_says_so(open_folder):
    locked = open_folder / "locked"
    locked.mkdir(mode=0o755)
    model = trained()
    if os.geteuid() != 0:
        os.chmod(locked, 0o555)
    message = _as_nobody(lambda: lora.save_adapter(locked / "a.safetensors", model))
    assert message == f"PermissionError: {locked / 'a.safetensors'}: cannot write: permission denied in the folder {locked}"
    assert os.listdir(locked) == []


# ----------------------------------------------------------------------------- base-model files
def test_base_model_files_carry_a_digest_and_refuse_a_flipped_byte(tmp_path):
    model = tiny_gpt()
    save_model(model, tmp_path / "m.safetensors", tmp_path / "m.json")
    again = load_model(tmp_path / "m.safetensors")
    assert all(np.array_equal(p.data, q.data) for p, q in zip(model.parameters(), again.parameters()))
    data = bytearray((tmp_path / "m.safetensors").read_bytes())
    data[-5] ^= 0x10
    (tmp_path / "m.safetensors").write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="the tensor data is corrupt"):
        load_model(tmp_path / "m.safetensors")


def test_the_shipped_base_model_without_a_digest_still_loads():
    from minilora.models.pretrained import BASE_WEIGHTS

    arrays, meta = load_arrays(BASE_WEIGHTS)
    assert "config" in meta and arrays


# ----------------------------------------------------------------------------- merge and delete
def test_merge_safe_false_says_how_many_layers_it_merged_before_failing():
    model = trained()
    model.eval()
    model.blocks[1].attn.v.lora_B["default"].data[0, 0] = np.nan  # the last of 4 adapted layers
    before = snapshot(model)
    with pytest.raises(FloatingPointError) as err:
        lora.merge(model, safe=False)
    message = str(err.value)
    assert "3 of 4 layers were merged before it and stay merged" in message and "blocks.1.attn.v" in message
    assert "no weight was changed" not in message
    lora.unmerge(model)
    assert_untouched(model, before, ["default"])
    with pytest.raises(FloatingPointError, match="no weight was changed"):  # safe=True: checked first, true
        lora.merge(model)
    assert_untouched(model, before, ["default"])


def test_deleting_an_adapter_merged_with_another_is_refused():
    model = trained(name="a")
    lora.apply_lora(model, CFG, "b")
    model.eval()
    lora.merge(model, ["a", "b"])
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"merged into the weight together with \['b'\]"):
        lora.delete_adapter(model, "a")
    assert_untouched(model, before, ["a", "b"])
    assert all(layer.merged_adapters == ["a", "b"] for _, layer in lora.lora_layers(model))


def test_deleting_the_active_adapter_says_that_none_is_active():
    model = trained(name="a")
    lora.apply_lora(model, CFG, "b", activate=False)
    with pytest.warns(UserWarning, match=r"deleted adapter 'a', which was active: no adapter is active now"):
        lora.delete_adapter(model, "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora.delete_adapter(model, "b")  # not active: nothing to say


# ----------------------------------------------------------------------------- bias deltas
def _with_bias_adapters(mode):
    """Two adapters whose biases are trained (random Δb), A and B random too."""
    model = trained(name="a", cfg=lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v"), bias=mode))
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "o"), bias=mode), "b", activate=False)
    rng = np.random.default_rng(3)
    params = dict(model.named_parameters())
    for n in lora.lora_parameter_names(model) + lora.bias_delta_names(model):
        params[n].data[...] = rng.standard_normal(params[n].shape).astype(np.float32)
    return model


@pytest.mark.parametrize("mode", ["lora_only", "all"])
def test_every_way_back_to_the_base_gives_the_base_exactly(tmp_path, mode):
    """Adapters with bias="all"/"lora_only" keep their bias deltas apart: unmerge, delete and disable give the base's biases back."""
    idx = np.arange(24).reshape(3, 8) % 24
    base = tiny_gpt()
    expected = base(idx).data
    path = tmp_path / "a.safetensors"
    lora.save_adapter(path, _with_bias_adapters(mode), "a")
    lora.save_adapter(tmp_path / "b.safetensors", _with_bias_adapters(mode), "b")
    model = tiny_gpt()
    lora.load_adapter(path, model)
    lora.load_adapter(tmp_path / "b.safetensors", model, activate=False)
    assert not np.array_equal(model(idx).data, expected)  # the adapter (and its Δb) is in effect
    with lora.disable_adapters(model):
        assert np.array_equal(model(idx).data, expected)
    with lora.mixed_batch(model, ["a", "__base__", "b"]):
        mixed = model(idx).data
    assert np.array_equal(mixed[1], expected[1])  # the "__base__" row is the base, bit for bit
    assert np.array_equal(mixed[0], model(idx).data[0])  # row 0 = adapter "a" alone
    lora.set_adapter(model, "b")
    assert np.allclose(mixed[2], model(idx).data[2], atol=1e-6)  # row 2 = adapter "b" alone
    for name, p in base.named_parameters():
        assert np.array_equal(dict(model.named_parameters())[name].data, p.data), name  # base biases untouched
    with pytest.warns(UserWarning, match="no adapter is active now"):
        lora.delete_adapter(model, "b")
    lora.delete_adapter(model, "a")
    assert np.array_equal(model(idx).data, expected)
    assert lora.bias_delta_names(model) == []


def test_bias_deltas_get_gradients_from_their_own_rows_only():
    idx = np.arange(16).reshape(2, 8) % 24
    model = _with_bias_adapters("all")
    lora.mark_only_lora_as_trainable(model)
    with lora.mixed_batch(model, ["a", "__base__"]):
        model.loss(idx, idx).backward()
    mixed = {n: p.grad.copy() for n, p in model.named_parameters() if ".lora_bias.a" in n}
    model.zero_grad()
    lora.set_adapter(model, "a")
    rows = idx[:1]
    (model.loss(rows, rows) * 0.5).backward()  # row 0 of a 2-row mean
    for name, grad in mixed.items():
        assert np.allclose(grad, dict(model.named_parameters())[name].grad, atol=1e-6), name
    assert all(p.grad is None or not p.grad.any() for n, p in model.named_parameters() if ".lora_bias.b" in n)


def test_merge_and_unload_folds_the_bias_deltas():
    idx = np.arange(16).reshape(2, 8) % 24
    model = _with_bias_adapters("all")
    model.eval()
    expected = model(idx).data
    plain = lora.merge_and_unload(model)
    assert lora.bias_delta_names(plain) == [] and not any(".lora_" in n for n, _ in plain.named_parameters())
    assert np.allclose(plain(idx).data, expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 4), (1, 0)])
def test_empty_inputs_are_a_clear_error(shape):
    """They gave an internal 'cannot reshape a tensor of shape (0, 4, 16)' message."""
    model = trained()
    for run in (lambda idx: model(idx), lambda idx: model.loss(idx, idx)):
        with pytest.raises(ValueError, match="at least one row and one token, got token ids of shape " + re.escape(str(shape))):
            run(np.zeros(shape, dtype=np.int64))



def test_an_adapter_saved_while_merged_records_the_unmerged_base(tmp_path):
    model = trained()
    model.eval()
    lora.merge(model)
    lora.save_adapter(tmp_path / "a.safetensors", model)  # the weights in memory are W0 + ΔW
    fresh = tiny_gpt()
    lora.load_adapter(tmp_path / "a.safetensors", fresh)  # the fingerprint is W0's: it loads
    lora.unmerge(model)
    idx = np.arange(16).reshape(2, 8) % 24
    assert np.array_equal(fresh(idx).data, model(idx).data)


def test_saves_write_their_bytes_through_atomic_write_and_never_a_writer_with_its_own_temp_files(tmp_path, monkeypatch):
    """safetensors' save_file makes a temp file of its own, which a kill leaves behind: no save may call it."""
    import safetensors.numpy

    from minilora import hf

    def foreign_writer(*args, **kwargs):
        raise AssertionError("safetensors.numpy.save_file was called")

    monkeypatch.setattr(safetensors.numpy, "save_file", foreign_writer)
    model = trained()
    lora.save_adapter(tmp_path / "a.safetensors", model)
    save_checkpoint(tmp_path / "c.safetensors", model)
    save_arrays(tmp_path / "w.safetensors", {"w": np.zeros(2)})
    hf.save_gpt2(tmp_path / "gpt2", model)
    hf.save_peft_adapter(tmp_path / "peft", model)
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "c.safetensors", "gpt2", "peft", "w.safetensors"]
    assert sorted(os.listdir(tmp_path / "peft")) == ["adapter_config.json", "adapter_model.safetensors"]
    lora.load_adapter(tmp_path / "a.safetensors", tiny_gpt())
