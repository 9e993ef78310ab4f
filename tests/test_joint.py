"""Joint training of several LoRA adapters in one mixed batch (minilora.joint)."""

import numpy as np
import pytest

import minilora as ml
from minilora import functional as F
from minilora import lora, optim
from minilora.data import DEMO_TASKS as TASKS
from minilora.data import Tokenizer, collate, load_task
from minilora.joint import (_logits, finetune_joint, joint_batches, joint_groups, joint_loss, joint_model, routed_loss,
                            train_joint)
from minilora.models import GPT, GPTConfig
from minilora.recipes import finetune, task_batches
from minilora.train import fit

TINY = GPTConfig(vocab_size=96, block_size=64, n_layer=1, n_head=2, d_model=16, dropout=0.0)


def _model_with_adapters(names, seed=0):
    ml.manual_seed(seed)
    model = GPT(TINY).to(dtype="float64")
    for name in names:
        lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v")), adapter_name=name)
    lora.mark_only_lora_as_trainable(model)
    rng = np.random.default_rng(seed)
    for pname, p in model.named_parameters():
        if ".lora_B." in pname:  # B = 0 at init would make every dA zero: give B values to test dA too
            p.data[...] = rng.normal(0.0, 0.3, p.shape)
    return model


def _mixed_batch(seed=1):
    """Rows of three adapters, scattered, with different row counts and different counted lengths."""
    rng = np.random.default_rng(seed)
    ids = ["b", "a", "c", "a", "b", "b", "a", "c", "b"]
    T = 12
    idx = rng.integers(0, 96, (len(ids), T))
    targets = rng.integers(0, 96, (len(ids), T))
    mask = np.zeros((len(ids), T))
    for i in range(len(ids)):
        start = int(rng.integers(0, 6))
        mask[i, start:start + int(rng.integers(1, T - start + 1))] = 1.0
    return idx, targets, mask, ids


def _grads(model, names):
    out = {}
    for pname, p in model.named_parameters():
        for name in names:
            if pname.endswith(f".{name}") and ".lora_" in pname:
                out[pname] = None if p.grad is None else p.grad.copy()
    return out


def test_each_adapter_gets_the_gradient_of_its_own_rows_mean_loss():
    names = ("a", "b", "c")
    model = _model_with_adapters(names)
    idx, targets, mask, ids = _mixed_batch()
    loss = joint_loss(model, idx, targets, mask, ids)
    loss.backward()
    joint = _grads(model, names)
    total = 0.0
    for name in names:
        for p in model.parameters():
            p.grad = None
        rows = [i for i, n in enumerate(ids) if n == name]
        own = F.cross_entropy(_logits(model, idx[rows], [name] * len(rows)), targets[rows], mask=mask[rows])
        own.backward()  # L_t: the mean NLL over the counted tokens of task t's rows only
        total += float(own.item())
        separate = _grads(model, names)
        for pname, g in separate.items():
            if pname.endswith(f".{name}"):
                assert g is not None and np.abs(g).max() > 0
                np.testing.assert_allclose(joint[pname], g, rtol=1e-10, atol=1e-13, err_msg=pname)
    # the normalisation: the joint loss is the SUM of the per-task mean losses
    assert float(loss.item()) == pytest.approx(total, rel=1e-12)


def test_an_adapter_gradient_ignores_how_many_rows_the_other_tasks_bring():
    names = ("a", "b", "c")
    idx, targets, mask, ids = _mixed_batch()
    grads = []
    for extra in (0, 5):  # five more rows of task "b": "a"'s gradient must not change
        model = _model_with_adapters(names)
        if extra:
            idx2, t2, m2, _ = _mixed_batch(seed=7)
            idx_, targets_, mask_ = (np.concatenate([idx, idx2[:extra]]), np.concatenate([targets, t2[:extra]]),
                                     np.concatenate([mask, m2[:extra]]))
            ids_ = ids + ["b"] * extra
        else:
            idx_, targets_, mask_, ids_ = idx, targets, mask, ids
        joint_loss(model, idx_, targets_, mask_, ids_).backward()
        grads.append({k: v for k, v in _grads(model, names).items() if k.endswith(".a")})
    for k in grads[0]:
        np.testing.assert_allclose(grads[0][k], grads[1][k], rtol=1e-10, atol=1e-13, err_msg=k)


def test_joint_batches_hold_the_rows_of_the_separate_runs():
    tok = Tokenizer.default()
    examples = {t: load_task(t, "train", 40) for t in TASKS}
    get_batch = joint_batches(examples, tok, batch_size=4, seed=3, block_size=64)
    idx, targets, mask, ids = get_batch(5)
    assert ids == [t for t in TASKS for _ in range(4)]
    from minilora.train import epoch_batches

    for j, task in enumerate(TASKS):
        rows = epoch_batches(40, 4, 3)(5)
        b = collate([examples[task][i] for i in rows], tok, block_size=64)
        w = b.idx.shape[1]
        np.testing.assert_array_equal(idx[4 * j:4 * j + 4, :w], b.idx)
        np.testing.assert_array_equal(mask[4 * j:4 * j + 4, :w], b.mask)
        assert not mask[4 * j:4 * j + 4, w:].any()  # the padding up to the widest task counts nothing


def _padding_added(members):
    """The fraction of a stacked group's token slots that stacking adds as padding."""
    width = max(w for w, _ in members)
    rows = sum(n for _, n in members)
    return (width * rows - sum(w * n for w, n in members)) / (width * rows)


@pytest.mark.parametrize("max_padding", [0.0, 0.1, 0.3, 1.0])
def test_joint_groups_hold_each_tasks_rows_at_its_own_width(max_padding):
    tok = Tokenizer.default()
    examples = {t: load_task(t, "train", 40) for t in TASKS}
    from minilora.train import epoch_batches

    get_batch = joint_groups(examples, tok, batch_size=4, seed=3, block_size=64, max_padding=max_padding)
    for step in (0, 5, 9):
        groups = get_batch(step)
        seen, members = [], []
        for idx, targets, mask, ids in groups:
            tasks = list(dict.fromkeys(ids))
            assert ids == [t for t in tasks for _ in range(4)]  # every task whole, in one group
            seen += tasks
            widths = []
            for j, task in enumerate(tasks):
                b = collate([examples[task][i] for i in epoch_batches(40, 4, 3)(step)], tok, block_size=64)
                w = b.idx.shape[1]
                np.testing.assert_array_equal(idx[4 * j:4 * j + 4, :w], b.idx)
                np.testing.assert_array_equal(targets[4 * j:4 * j + 4, :w], b.targets)
                np.testing.assert_array_equal(mask[4 * j:4 * j + 4, :w], b.mask)
                assert not mask[4 * j:4 * j + 4, w:].any()
                widths.append((w, 4))
            assert idx.shape[1] == max(w for w, _ in widths)  # the group's width: its widest task's
            assert _padding_added(widths) <= max_padding + 1e-12
            members.append(widths)
        assert sorted(seen) == sorted(TASKS)
        for before, after in zip(members, members[1:]):  # the next group's first task did not fit in
            assert _padding_added(before + after[:1]) > max_padding
        if max_padding == 1.0:
            assert len(groups) == 1
    if max_padding == 0.0:  # each task alone (unless two widths are equal), at its own width
        assert all(len(set(w for w, _ in m)) == 1 for m in members)


def test_joint_groups_refuse_a_padding_fraction_outside_0_1():
    with pytest.raises(ValueError, match="max_padding"):
        joint_groups({}, Tokenizer.default(), 4, 0, 64, max_padding=1.5)


def test_a_joint_run_on_width_groups_equals_one_on_padded_batches():
    ml.manual_seed(5)
    base = GPT(TINY).to(dtype="float64")
    tok = Tokenizer.default()
    train = {t: load_task(t, "train", 12) for t in TASKS}
    runs = []
    for get_batch in (joint_batches(train, tok, 3, 0, 64), joint_groups(train, tok, 3, 0, 64, max_padding=0.0)):
        model = joint_model(base, TASKS, r=2, seed=0)
        rng = np.random.default_rng(0)
        for name, p in model.named_parameters():
            if ".lora_B." in name:  # B != 0: the first step's gradients of A are not zero either
                p.data[...] = rng.normal(0.0, 0.3, p.shape)
        history = train_joint(model, TASKS, get_batch, 4, lr=5e-3, progress=False)
        runs.append((history, {n: p.data.copy() for n, p in model.named_parameters() if ".lora_" in n}))
    (h_pad, padded), (h_groups, grouped) = runs
    assert len(joint_groups(train, tok, 3, 0, 64)(0)) > 1  # the groups really split the step
    np.testing.assert_allclose(h_groups.losses, h_pad.losses, rtol=1e-10)
    assert h_groups.tokens == h_pad.tokens
    for name, value in padded.items():
        np.testing.assert_allclose(grouped[name], value, rtol=1e-9, atol=1e-12, err_msg=name)


def test_a_joint_run_equals_three_separate_runs():
    ml.manual_seed(5)
    base = GPT(TINY).to(dtype="float64")
    kw = dict(r=2, targets=("q", "v"), steps=4, batch_size=3, lr=5e-3, seed=0, n_train=12, n_eval=2)
    joint = finetune_joint(TASKS, base=base, **kw)
    runs = {task: finetune(task, "lora", base=base, progress=False, measure_memory=False, **kw) for task in TASKS}
    for task, run in runs.items():
        separate = {n: p.data for n, p in run.model.named_parameters() if ".lora_" in n}
        shared = {n: p.data for n, p in joint.model.named_parameters() if n.endswith(f".{task}") and ".lora_" in n}
        assert set(separate) == set(shared) and separate
        for name, value in separate.items():
            if ".lora_B." in name:
                assert np.abs(value).max() > 0  # B left its zero init: the runs really trained
            np.testing.assert_allclose(shared[name], value, rtol=1e-9, atol=1e-12, err_msg=f"{task}: {name}")
        assert joint.runs[task].metric == pytest.approx(run.metric)
        assert joint.runs[task].trainable_params == run.trainable_params
    # step by step, the joint loss is the sum of the three separate runs' losses
    np.testing.assert_allclose(joint.history.losses, np.sum([runs[t].history.losses for t in TASKS], axis=0), rtol=1e-10)


def test_joint_training_clips_each_adapter_like_its_separate_run():
    """With a clip threshold that binds (the tiny model's adapter gradients have norms ~0.005)."""
    ml.manual_seed(5)
    base = GPT(TINY).to(dtype="float64")
    tok = Tokenizer.default()
    tasks, steps, clip = ("e2e", "classify"), 5, 0.002
    train = {t: load_task(t, "train", 12) for t in tasks}
    model = joint_model(base, tasks, r=2, seed=0)
    clipped = []
    spy = optim.clip_grad_norm_

    def recording(params, max_norm, **kw):
        norm = spy(params, max_norm, **kw)
        clipped.append(norm > max_norm)
        return norm

    optim.clip_grad_norm_ = recording
    try:
        history = train_joint(model, tasks, joint_batches(train, tok, 3, 0, 64), steps, lr=5e-3, grad_clip=clip,
                              progress=False)
    finally:
        optim.clip_grad_norm_ = spy
    assert any(clipped)  # the threshold did bind
    total = np.zeros(steps)
    for task in tasks:
        alone = joint_model(base, (task,), r=2, seed=0)
        opt = optim.AdamW(alone.parameters(trainable_only=True), lr=5e-3, weight_decay=0.0)
        sched = optim.LRScheduler(opt, lambda s: optim.warmup_linear(s, total=steps, warmup=1))
        h = fit(alone, opt, task_batches(train[task], tok, 3, 0, 64), steps, scheduler=sched, grad_clip=clip,
                progress=False, loss_fn=routed_loss([task] * 3))
        total += h.losses
        for name, p in alone.named_parameters():
            if ".lora_" in name:
                np.testing.assert_allclose(dict(model.named_parameters())[name].data, p.data, rtol=1e-9, atol=1e-12,
                                           err_msg=name)
    np.testing.assert_allclose(history.losses, total, rtol=1e-10)


def test_finetune_joint_rejects_unknown_or_repeated_tasks():
    with pytest.raises(ValueError, match="distinct"):
        finetune_joint(("e2e", "e2e"), base=GPT(TINY), steps=1)
    with pytest.raises(ValueError, match="distinct"):
        finetune_joint(("e2e", "wikisql"), base=GPT(TINY), steps=1)


def test_joint_training_has_the_nan_guard_of_fit():
    """train_joint runs on train.fit: a diverging update stops it with TrainingDivergedError, naming the step."""
    from minilora.train import TrainingDivergedError

    ml.manual_seed(5)
    base = GPT(TINY)
    tok = Tokenizer.default()
    tasks = ("e2e", "classify")
    train = {t: load_task(t, "train", 12) for t in tasks}
    model = joint_model(base, tasks, r=2, seed=0)
    with pytest.raises(TrainingDivergedError, match="at step"):
        train_joint(model, tasks, joint_batches(train, tok, 3, 0, 64), 4, lr=1e38, grad_clip=None, progress=False)


def test_joint_training_updates_the_tasks_adapters_and_nothing_else():
    """Another trainable parameter (here the final LayerNorm's bias) is left as it is, as before the optimizer saw it."""
    ml.manual_seed(5)
    tok = Tokenizer.default()
    tasks = ("e2e", "classify")
    train = {t: load_task(t, "train", 12) for t in tasks}
    model = joint_model(GPT(TINY), tasks, r=2, seed=0)
    bias = dict(model.named_parameters())["ln_f.bias"]
    bias.requires_grad = True
    before = bias.data.copy()
    train_joint(model, tasks, joint_batches(train, tok, 3, 0, 64), 3, lr=1e-2, progress=False)
    np.testing.assert_array_equal(bias.data, before)
    assert any(np.abs(p.data).max() > 0 for n, p in model.named_parameters() if ".lora_B." in n)
