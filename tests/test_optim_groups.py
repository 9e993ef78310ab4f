"""Parameter groups (each with its own lr and weight decay), schedules over groups, and LoRA+ groups.

Oracles: separate one-group optimizers (same numbers, bit for bit), and torch.optim with the same
param_groups (float64, 1e-12) where PyTorch is installed.
"""

import functools
import json

import numpy as np
import pytest
from conftest import to_np

import minilora as ml
from minilora import lora, optim
from minilora.models import GPT, GPTConfig

SHAPES = [(4, 3), (6,), (2, 3, 2), (3,)]
STEPS = 12


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return [ml.tensor(rng.standard_normal(s), requires_grad=True, dtype="float64") for s in SHAPES]


def gradients(seed=1):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s) for s in SHAPES] for _ in range(STEPS)]


def step_all(opt, params, grads, sched=None):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.copy()
        opt.step()
        if sched is not None:
            sched.step()


ADAMW_GROUPS = [{"lr": 1e-2}, {"lr": 3e-2, "weight_decay": 0.2, "betas": (0.8, 0.99), "eps": 1e-6}]
SGD_GROUPS = [{"lr": 0.05}, {"lr": 0.2, "weight_decay": 0.1}]


def grouped(params, options):
    return [{"params": params[:2], **options[0]}, {"params": params[2:], **options[1]}]


@pytest.mark.parametrize(
    ("make", "options"),
    [(functools.partial(optim.AdamW, weight_decay=0.01), ADAMW_GROUPS),
     (functools.partial(optim.SGD, lr=0.1, momentum=0.9), SGD_GROUPS)],
    ids=["adamw", "sgd"],
)
def test_groups_equal_separate_optimizers(make, options):
    params, left, right = make_params(), make_params(), make_params()
    opt = make(grouped(params, options))
    assert [g["lr"] for g in opt.param_groups] == [o["lr"] for o in options]
    assert opt.group_of == [0, 0, 1, 1] and opt.lr == options[0]["lr"]
    separate = [make(left[:2], **options[0]), make(right[2:], **options[1])]
    step_all(opt, params, gradients())
    step_all(separate[0], left[:2], [g[:2] for g in gradients()])
    step_all(separate[1], right[2:], [g[2:] for g in gradients()])
    for p, q in zip(params, left[:2] + right[2:]):
        np.testing.assert_array_equal(to_np(p), to_np(q))
    assert opt.steps == [STEPS] * 4


def test_scheduler_scales_every_group_and_checkpoints_round_trip():
    schedule = functools.partial(optim.warmup_cosine, total=STEPS, warmup=3, min_ratio=0.1)
    straight = make_params()
    opt = optim.AdamW(grouped([("p%d" % k, p) for k, p in enumerate(straight)], ADAMW_GROUPS))
    sched = optim.LRScheduler(opt, schedule)
    assert sched.base_lrs == [1e-2, 3e-2] and sched.base_lr == 1e-2
    step_all(opt, straight, gradients(), sched)
    for group, base in zip(opt.param_groups, sched.base_lrs):
        assert group["lr"] == base * schedule(STEPS)  # the ratio between the groups holds at every step

    first = make_params()
    opt = optim.AdamW(grouped([("p%d" % k, p) for k, p in enumerate(first)], ADAMW_GROUPS))
    sched = optim.LRScheduler(opt, schedule)
    step_all(opt, first, gradients()[:5], sched)
    meta, arrays = json.loads(json.dumps(opt.state_meta())), opt.state_arrays()
    assert [g["params"] for g in meta["param_groups"]] == [["p0", "p1"], ["p2", "p3"]]
    sched_state = json.loads(json.dumps(sched.state_dict()))
    resumed = [ml.tensor(to_np(p).copy(), requires_grad=True, dtype="float64") for p in first]
    other_options = [{"lr": 5.0}, {"lr": 7.0, "betas": (0.5, 0.5)}]  # overwritten by the saved groups
    opt2 = optim.AdamW(grouped([("p%d" % k, p) for k, p in enumerate(resumed)], other_options))
    opt2.load_state_dict(meta, arrays)
    assert opt2.param_groups[1]["betas"] == (0.8, 0.99) and opt2.param_groups[1]["weight_decay"] == 0.2
    sched2 = optim.LRScheduler(opt2, schedule)
    sched2.load_state_dict(sched_state)
    step_all(opt2, resumed, gradients()[5:], sched2)
    for p, q in zip(resumed, straight):
        np.testing.assert_array_equal(to_np(p), to_np(q))

    flat = optim.AdamW([("p%d" % k, p) for k, p in enumerate(make_params())])  # one group: a mismatch
    with pytest.raises(ValueError, match="parameter groups"):
        flat.load_state_dict(meta, arrays)


def test_a_state_saved_without_groups_still_loads():
    params = make_params()
    opt = optim.SGD([("p%d" % k, p) for k, p in enumerate(params)], lr=0.3, momentum=0.9, weight_decay=0.05)
    step_all(opt, params, gradients()[:2])
    meta = opt.state_meta()
    del meta["param_groups"]  # what a checkpoint written before groups existed holds
    opt2 = optim.SGD([("p%d" % k, p) for k, p in enumerate(make_params())], lr=1.0, momentum=0.9)
    opt2.load_state_dict(meta, opt.state_arrays())
    assert opt2.lr == 0.3 and opt2.weight_decay == 0.05 and opt2.momentum == 0.9


def test_group_errors_are_clear():
    params = make_params()
    with pytest.raises(ValueError, match="groups 0 and 1"):
        optim.AdamW([{"params": params[:2]}, {"params": params[1:]}])
    with pytest.raises(ValueError, match="may set"):
        optim.SGD([{"params": params, "momentum": 0.9}], lr=0.1)
    with pytest.raises(ValueError, match="no 'params'"):
        optim.AdamW([{"lr": 0.1}])
    with pytest.raises(ValueError, match="lr must be"):
        optim.AdamW([{"params": params, "lr": -1.0}])
    with pytest.raises(ValueError, match="betas"):
        optim.AdamW([{"params": params, "betas": (0.9, 1.0)}])
    opt = optim.AdamW(grouped(params, ADAMW_GROUPS))
    with pytest.raises(AttributeError, match=r"param_groups\[i\]"):
        opt.lr = 0.5
    single = optim.AdamW(make_params(), lr=0.1)
    single.lr = 0.5  # one group: setting lr directly still works
    assert single.param_groups[0]["lr"] == 0.5


# ----------------------------------------------------------------------------- LoRA+
def tiny_lora_model(bias="none"):
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, d_model=8, dropout=0.0))
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v"), bias=bias))
    lora.mark_only_lora_as_trainable(model)
    return model


def test_lora_plus_groups_have_lr_b_ratio_times_lr_a():
    model = tiny_lora_model(bias="lora_only")
    groups = optim.lora_plus_param_groups(model, lr=1e-3, ratio=16, weight_decay=0.01)
    assert [g["name"] for g in groups] == ["lora_A", "lora_B", "other"]
    assert groups[1]["lr"] == 16 * groups[0]["lr"] == 16e-3 and groups[2]["lr"] == 1e-3
    assert all(g["weight_decay"] == 0.01 for g in groups)
    names = [[n for n, _ in g["params"]] for g in groups]
    assert all(".lora_A." in n for n in names[0]) and all(".lora_B." in n for n in names[1])
    assert len(names[0]) == len(names[1]) == 4 and all(".lora_bias." in n for n in names[2])  # the bias deltas
    trainable = {n for n, _ in model.named_parameters(trainable_only=True)}
    assert set(sum(names, [])) == trainable
    opt = optim.AdamW(groups)
    assert [g["name"] for g in opt.param_groups] == ["lora_A", "lora_B", "other"]
    assert opt.names == sum(names, [])


def test_lora_plus_b_moves_ratio_times_further_with_sgd():
    """With plain SGD the update is lr·g, so B's first step is exactly ratio × what one lr gives."""
    model = tiny_lora_model().to(dtype="float64")
    idx = np.random.default_rng(0).integers(0, 16, (2, 8))
    for _, p in model.named_parameters(trainable_only=True):
        p.data[...] = np.random.default_rng(p.size).standard_normal(p.shape) * 0.1  # B ≠ 0 so A gets gradients
    before = {n: to_np(p).copy() for n, p in model.named_parameters(trainable_only=True)}
    model.loss(idx[:, :-1], idx[:, 1:]).backward()
    grads = {n: to_np(p.grad).copy() for n, p in model.named_parameters(trainable_only=True)}
    optim.SGD(optim.lora_plus_param_groups(model, lr=0.01, ratio=4), lr=0.01).step()
    for name, p in model.named_parameters(trainable_only=True):
        lr = 0.04 if ".lora_B." in name else 0.01
        np.testing.assert_allclose(before[name] - to_np(p), lr * grads[name], rtol=1e-10, atol=1e-15)


def test_lora_plus_errors():
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, d_model=8))
    with pytest.raises(ValueError, match="apply_lora"):
        optim.lora_plus_param_groups(model, lr=1e-3)
    with pytest.raises(ValueError, match="ratio"):
        optim.lora_plus_param_groups(tiny_lora_model(), lr=1e-3, ratio=0)


# ----------------------------------------------------------------------------- torch.optim oracle
@pytest.mark.parametrize(
    ("ours", "theirs_name", "options", "defaults"),
    [(optim.AdamW, "AdamW", ADAMW_GROUPS, {"weight_decay": 0.01}),
     (optim.SGD, "SGD", SGD_GROUPS, {"lr": 0.1, "momentum": 0.9})],
    ids=["adamw", "sgd"],
)
def test_groups_equal_torch_param_groups(ours, theirs_name, options, defaults):
    torch = pytest.importorskip("torch", reason="PyTorch oracle not installed: pip install torch")
    params = make_params()
    twins = [torch.tensor(to_np(p).copy(), requires_grad=True) for p in params]
    opt = ours(grouped(params, options), **defaults)
    theirs = getattr(torch.optim, theirs_name)(grouped(twins, options), **defaults)
    schedule = functools.partial(optim.warmup_linear, total=STEPS, warmup=2)
    sched = optim.LRScheduler(opt, schedule)
    torch_sched = torch.optim.lr_scheduler.LambdaLR(theirs, schedule)
    for step_grads in gradients():
        for p, q, g in zip(params, twins, step_grads):
            p.grad, q.grad = g.copy(), torch.from_numpy(g.copy())
        opt.step()
        theirs.step()
        sched.step()
        torch_sched.step()
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in theirs.param_groups]
    for p, q in zip(params, twins):
        np.testing.assert_allclose(to_np(p), q.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_checkpoints_of_lora_plus_groups_round_trip_through_train(tmp_path):
    """train.save_checkpoint / load_checkpoint keep each group's lr; restore_hyperparameters=False keeps the new ones."""
    from minilora.train import load_checkpoint, save_checkpoint

    def setup(lr):
        ml.manual_seed(0)  # the same base each time: a checkpoint of LoRA matrices refuses another base
        model = tiny_lora_model()
        opt = optim.AdamW(optim.lora_plus_param_groups(model, lr=lr, ratio=16))
        return model, opt, optim.LRScheduler(opt, functools.partial(optim.warmup_linear, total=10, warmup=2))

    model, opt, sched = setup(1e-3)
    idx = np.random.default_rng(0).integers(0, 16, (2, 8))
    for _ in range(3):
        opt.zero_grad()
        model.loss(idx[:, :-1], idx[:, 1:]).backward()
        opt.step()
        sched.step()
    save_checkpoint(tmp_path / "c.safetensors", model, opt, 3, scheduler=sched)
    model2, opt2, sched2 = setup(5e-2)
    load_checkpoint(tmp_path / "c.safetensors", model2, opt2, sched2)
    assert sched2.base_lrs == [1e-3, 16e-3] and [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    model3, opt3, sched3 = setup(5e-2)
    load_checkpoint(tmp_path / "c.safetensors", model3, opt3, sched3, restore_hyperparameters=False)
    assert sched3.base_lrs == [5e-2, 16 * 5e-2] and sched3.last_step == 3
    assert opt3.param_groups[1]["lr"] == pytest.approx(16 * opt3.param_groups[0]["lr"], rel=1e-15)
