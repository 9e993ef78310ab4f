"""The fit loop: bit-identical resume, atomic checkpoints, the NaN guard, deterministic batches."""

import functools
import os

import numpy as np
import pytest

import minilora as ml
from minilora import optim
from minilora.data import Tokenizer, load_task
from minilora.io import FileFormatError, atomic_write, load_arrays, save_arrays
from minilora.models import GPT, GPTConfig
from minilora.recipes import task_batches
from minilora.train import TrainingDivergedError, epoch_batches, fit, load_checkpoint

TINY = GPTConfig(vocab_size=96, block_size=64, n_layer=1, n_head=2, d_model=16, dropout=0.1)


def _setup(seed=0):
    ml.manual_seed(seed)
    model = GPT(TINY)
    opt = optim.AdamW(model.parameters(), lr=3e-3)
    sched = optim.LRScheduler(opt, functools.partial(optim.warmup_cosine, total=12, warmup=2))
    examples = load_task("classify", "train", 64)
    return model, opt, sched, task_batches(examples, Tokenizer.default(), 8, seed, TINY.block_size)


def test_epoch_batches_are_a_pure_function_of_the_step():
    rows = epoch_batches(10, 3, seed=7)
    again = epoch_batches(10, 3, seed=7)
    assert [list(rows(s)) for s in range(9)] == [list(again(s)) for s in reversed(range(9))][::-1]
    first_epoch = np.concatenate([rows(s) for s in range(3)])
    assert len(set(first_epoch.tolist())) == 9  # no repeats inside an epoch
    assert not np.array_equal(rows(0), rows(3))  # a fresh permutation next epoch


def test_resume_continues_bit_identically(tmp_path):
    model, opt, sched, get_batch = _setup()
    straight = fit(model, opt, get_batch, 12, scheduler=sched, progress=False)
    final = {n: p.data.copy() for n, p in model.named_parameters()}

    model, opt, sched, get_batch = _setup()
    fit(model, opt, get_batch, 5, scheduler=sched, progress=False, checkpoint_dir=tmp_path, save_every=5)
    # a fresh process: new model, optimizer and scheduler, all state from the checkpoint (dropout RNG included)
    ml.manual_seed(123)
    model, opt, sched, get_batch = _setup(seed=0)
    ml.manual_seed(999)  # the checkpoint must restore the RNG, not this seed
    resumed = fit(model, opt, get_batch, 12, scheduler=sched, progress=False, checkpoint_dir=tmp_path,
                  save_every=5, resume=True)
    assert resumed.losses == straight.losses
    assert resumed.steps == list(range(12))
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(p.data, final[name], err_msg=name)


def test_a_write_killed_half_way_leaves_the_previous_file(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_arrays(path, {"w": np.arange(4.0)}, {"step": 1})
    before = path.read_bytes()

    def dies_half_way(tmp):
        with open(tmp, "wb") as f:
            f.write(b"\x00" * 10)
        raise KeyboardInterrupt  # the process is killed in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies_half_way)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]  # no temporary file left behind
    arrays, meta = load_arrays(path)
    assert meta == {"step": 1} and arrays["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_arrays(path, {"w": np.arange(100.0)})
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(FileFormatError, match="ckpt.safetensors"):
        load_arrays(path)


def test_nan_guard_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    model, opt, sched, get_batch = _setup()

    def poisoned(step):
        idx, targets, mask = get_batch(step)
        if step == 7:
            model.wte.weight.data[...] = np.nan  # something blew up
        return idx, targets, mask

    with pytest.raises(TrainingDivergedError, match="at step 7") as err:
        fit(model, opt, poisoned, 12, scheduler=sched, progress=False, checkpoint_dir=tmp_path, save_every=5)
    assert "last.safetensors" in str(err.value)
    fresh, fresh_opt, _, _ = _setup()
    step, history, _ = load_checkpoint(tmp_path / "last.safetensors", fresh, fresh_opt)
    assert step == 5 and len(history.losses) == 5
    assert all(np.isfinite(p.data).all() for p in fresh.parameters())


def test_eval_and_best_checkpoint(tmp_path):
    model, opt, sched, get_batch = _setup()
    scores = iter([0.2, 0.9, 0.5])
    history = fit(model, opt, get_batch, 9, scheduler=sched, progress=False, eval_fn=lambda m: {"acc": next(scores)},
                  eval_every=3, best_key="acc", checkpoint_dir=tmp_path)
    assert [s for s, _ in history.evals] == [3, 6, 9]
    assert history.best == {"step": 6, "value": 0.9, "key": "acc"}
    assert (tmp_path / "best.safetensors").exists()


def test_only_trainable_parameters_are_checkpointed(tmp_path):
    model, opt, sched, get_batch = _setup()
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("blocks.0.attn")
    opt = optim.AdamW(model.parameters(trainable_only=True), lr=1e-3)
    fit(model, opt, get_batch, 2, progress=False, checkpoint_dir=tmp_path, save_every=2)
    arrays, _ = load_arrays(tmp_path / "last.safetensors")
    saved = {k[len("param/"):] for k in arrays if k.startswith("param/")}
    assert saved == {n for n, p in model.named_parameters() if p.requires_grad}


def test_progress_without_a_tty_prints_a_few_lines_not_one_per_step():
    import io

    from minilora.train import History, Progress

    stream = io.StringIO()  # not a TTY: a log file, CI
    bar = Progress(200, "e2e/full", True, stream=stream)
    history = History()
    for step in range(200):
        history.tokens += 100
        history.seconds += 0.01
        bar.update(step + 1, 1.0 / (step + 1), history)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in stream.getvalue()
    assert lines[-1].startswith("  e2e/full: step 200/200, loss 0.0050")
    silent = io.StringIO()
    Progress(10, "x", False, stream=silent).update(10, 0.1, history)
    assert silent.getvalue() == ""


def test_length_grouped_batches_see_every_example_once_per_epoch_with_less_padding():
    from minilora.train import length_grouped_batches

    lengths = np.random.default_rng(0).integers(10, 64, 200)
    rows = length_grouped_batches(lengths, 8, seed=3, group=5)
    plain = epoch_batches(200, 8, seed=3)
    epoch = np.concatenate([rows(s) for s in range(25)])
    assert sorted(epoch.tolist()) == list(range(200))  # a permutation: each example once per epoch
    assert np.array_equal(rows(7), length_grouped_batches(lengths, 8, seed=3, group=5)(7))  # a pure function
    assert not np.array_equal(rows(25), rows(0))  # the next epoch is a new draw
    padded = sum(lengths[rows(s)].max() for s in range(25))
    padded_plain = sum(lengths[plain(s)].max() for s in range(25))
    assert padded < 0.85 * padded_plain
    same = length_grouped_batches(lengths, 8, seed=3, group=1)  # group 1: the plain shuffled batches
    assert all(np.array_equal(same(s), plain(s)) for s in range(30))


def test_a_list_of_batches_is_one_step_whose_gradients_add_up():
    """get_batch may return several batches: one optimizer step on their summed gradients, their losses summed."""
    config = GPTConfig(vocab_size=96, block_size=64, n_layer=1, n_head=2, d_model=16, dropout=0.0)
    examples, tok = load_task("classify", "train", 32), Tokenizer.default()
    halves = [task_batches(examples[:16], tok, 4, 0, 64), task_batches(examples[16:], tok, 4, 0, 64)]

    def fresh():
        ml.manual_seed(0)
        model = GPT(config).to(dtype="float64")
        return model, optim.AdamW(model.parameters(), lr=3e-3)

    model, opt = fresh()
    history = fit(model, opt, lambda s: [h(s) for h in halves], 4, progress=False)
    by_hand, by_hand_opt = fresh()
    losses, tokens = [], 0
    for step in range(4):  # the same steps written out
        by_hand_opt.zero_grad()
        total = 0.0
        for h in halves:
            batch = h(step)
            loss = by_hand.loss(*batch)
            total += float(loss.item())
            loss.backward()
            tokens += int(batch[2].sum())
        optim.clip_grad_norm_(by_hand.parameters(trainable_only=True), 1.0)
        by_hand_opt.step()
        losses.append(total)
    assert history.losses == losses and history.tokens == tokens
    for (name, p), q in zip(model.named_parameters(), by_hand.parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)


def test_clip_groups_clip_each_group_on_its_own():
    ml.manual_seed(0)
    model = GPT(TINY)
    opt = optim.AdamW(model.parameters(), lr=3e-3)
    seen = []
    spy = optim.clip_grad_norm_

    def recording(params, max_norm, **kw):
        seen.append(len(params))
        return spy(params, max_norm, **kw)

    head, rest = model.parameters()[:2], model.parameters()[2:]
    optim.clip_grad_norm_ = recording
    try:
        fit(model, opt, task_batches(load_task("classify", "train", 16), Tokenizer.default(), 4, 0, 64), 2,
            clip_groups=[head, rest], progress=False)
    finally:
        optim.clip_grad_norm_ = spy
    assert seen == [2, len(rest)] * 2


def test_the_training_loop_knows_nothing_of_lora():
    """train.py, checkpoint.py, progress.py and history.py import no module of minilora.lora."""
    import ast

    import minilora

    folder = os.path.dirname(minilora.__file__)
    for file in ("train.py", "checkpoint.py", "progress.py", "history.py"):
        with open(os.path.join(folder, file), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in modules if m.split(".")[0] == "lora" or m.startswith("minilora.lora")], (file, modules)


def test_the_samplers_and_the_checkpoint_format_keep_their_train_names():
    from minilora import checkpoint, data, progress, train
    from minilora.data import samplers

    assert train.epoch_batches is samplers.epoch_batches is data.epoch_batches
    assert train.length_grouped_batches is samplers.length_grouped_batches
    assert train.save_checkpoint is checkpoint.save_checkpoint and train.load_checkpoint is checkpoint.load_checkpoint
    assert train.Progress is progress.Progress


def test_the_optimizer_checks_a_saved_state_before_it_changes_anything():
    ml.manual_seed(0)
    model, opt, _, get_batch = _setup()
    fit(model, opt, get_batch, 2, progress=False)
    meta, arrays = opt.state_meta(), opt.state_arrays()
    first = meta["params"][0]["name"]
    cases = {
        "negative values": (meta, {**arrays, f"{first}.exp_avg_sq": -np.abs(arrays[f"{first}.exp_avg_sq"]) - 1}),
        "NaN or inf": (meta, {**arrays, f"{first}.exp_avg": arrays[f"{first}.exp_avg"] * np.nan}),
        "float64": (meta, {**arrays, f"{first}.exp_avg": arrays[f"{first}.exp_avg"].astype(np.float64)}),
        "not a valid value": ({**meta, "hyperparameters": {**meta["hyperparameters"], "eps": -1.0}}, arrays),
        "lr = inf is not a valid": ({**meta, "hyperparameters": {**meta["hyperparameters"], "lr": float("inf")}}, arrays),
        "malformed parameter entry": ({**meta, "params": [{"name": first}] + meta["params"][1:]}, arrays),
        "is for shape": ({**meta, "params": [{**meta["params"][0], "shape": [7, 7]}] + meta["params"][1:]}, arrays),
        "saved by 'SGD'": ({**meta, "optimizer": "SGD"}, arrays),
    }
    ml.manual_seed(1)
    fresh = optim.AdamW(GPT(TINY).parameters(), lr=1e-2)
    for message, (bad_meta, bad_arrays) in cases.items():
        with pytest.raises(ValueError, match=message):
            fresh.load_state_dict(bad_meta, bad_arrays)
        assert fresh.steps[0] == 0 and not np.any(fresh.state[0]["exp_avg"]) and fresh.lr == 1e-2, message
    fresh.load_state_dict(meta, arrays, restore_hyperparameters=False)
    assert fresh.steps[0] == 2 and fresh.lr == 1e-2
    np.testing.assert_array_equal(fresh.state[0]["exp_avg"], arrays[first + ".exp_avg"])
    fresh.load_state_dict(meta, arrays)
    assert fresh.lr == opt.lr


def test_sgd_refuses_a_saved_momentum_or_nesterov_it_has_no_buffers_for():
    ml.manual_seed(0)
    model = GPT(TINY)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in opt.params:
        p.grad = np.ones_like(p.data)
    opt.step()
    meta, arrays = opt.state_meta(), opt.state_arrays()
    hyper = meta["hyperparameters"]
    cases = {
        "momentum = -1.0 is not a valid": {**hyper, "momentum": -1.0},
        "momentum = 'x' is not a valid": {**hyper, "momentum": "x"},
        "nesterov = 1 is not a valid": {**hyper, "nesterov": 1},
        "nesterov=True; this SGD": {**hyper, "nesterov": True},
    }
    for message, bad in cases.items():
        with pytest.raises(ValueError, match=message):
            optim.SGD(GPT(TINY).parameters(), lr=0.1, momentum=0.9).load_state_dict({**meta, "hyperparameters": bad}, arrays)
    with pytest.raises(ValueError, match="momentum=0.9"):  # saved with momentum: this SGD has no buffers for it
        optim.SGD(GPT(TINY).parameters(), lr=0.1).load_state_dict(meta, arrays, strict=False)
    fresh = optim.SGD(GPT(TINY).parameters(), lr=0.1, momentum=0.5)
    fresh.load_state_dict(meta, arrays)  # another momentum > 0 needs the same buffers: restored as saved
    assert fresh.momentum == 0.9
