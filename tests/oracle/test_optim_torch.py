"""minilora.optim against torch.optim: the same float64 trajectories to 1e-12.

Each test feeds both libraries the same parameters and the same gradient sequence, including
steps where a parameter has no gradient and a learning rate that changes mid-run.
"""

import functools

import numpy as np
import pytest

import minilora as ml
from minilora import optim

torch = pytest.importorskip("torch", reason="PyTorch oracle not installed: pip install torch==2.13.0")

SHAPES = [(4, 3), (6,), (2, 3, 2)]
STEPS = 20


def twins(seed=0):
    """The same float64 values as minilora Tensors and torch leaf tensors."""
    rng = np.random.default_rng(seed)
    values = [rng.standard_normal(s) for s in SHAPES]
    ours = [ml.tensor(v.copy(), requires_grad=True, dtype="float64") for v in values]
    theirs = [torch.tensor(v.copy(), dtype=torch.float64, requires_grad=True) for v in values]
    return ours, theirs


def gradients(seed=1):
    """STEPS lists of gradients; parameter 2 has none on every fourth step (it is skipped)."""
    rng = np.random.default_rng(seed)
    return [[None if (k == 2 and t % 4 == 3) else rng.standard_normal(s) for k, s in enumerate(SHAPES)] for t in range(STEPS)]


def lr_at(t, base):
    return base if t < STEPS // 2 else base * 0.3  # a mid-run change, as a schedule makes


def run_both(ours_opt, ours, theirs_opt, theirs, base_lr):
    for t, step_grads in enumerate(gradients()):
        ours_opt.lr = lr_at(t, base_lr)
        for group in theirs_opt.param_groups:
            group["lr"] = lr_at(t, base_lr)
        for p, q, g in zip(ours, theirs, step_grads):
            p.grad = None if g is None else g.copy()
            q.grad = None if g is None else torch.from_numpy(g.copy())
        ours_opt.step()
        theirs_opt.step()
    for p, q in zip(ours, theirs):
        np.testing.assert_allclose(p.data, q.detach().numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "hyper",
    [
        {"lr": 0.1},
        {"lr": 0.05, "momentum": 0.9},
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.1},
        {"lr": 0.05, "momentum": 0.7, "nesterov": True},
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True},
        {"lr": 0.1, "weight_decay": 0.2},
    ],
    ids=["plain", "momentum", "momentum-wd", "nesterov", "nesterov-wd", "wd"],
)
def test_sgd_trajectory_equals_torch(hyper):
    ours, theirs = twins()
    opt = optim.SGD(ours, **hyper)
    run_both(opt, ours, torch.optim.SGD(theirs, **hyper), theirs, hyper["lr"])


@pytest.mark.parametrize(
    "hyper",
    [
        {"lr": 1e-2},
        {"lr": 1e-2, "weight_decay": 0.0},
        {"lr": 3e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1},
        {"lr": 1e-3, "betas": (0.0, 0.5), "eps": 1e-3, "weight_decay": 1.0},
    ],
    ids=["default", "no-wd", "custom", "extreme"],
)
def test_adamw_trajectory_equals_torch(hyper):
    ours, theirs = twins()
    opt = optim.AdamW(ours, **hyper)
    their_opt = torch.optim.AdamW(theirs, **hyper)
    run_both(opt, ours, their_opt, theirs, hyper["lr"])
    for k, q in enumerate(theirs):
        state = their_opt.state[q]
        assert opt.steps[k] == int(state["step"])
        np.testing.assert_allclose(opt.state[k]["exp_avg"], state["exp_avg"].numpy(), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(opt.state[k]["exp_avg_sq"], state["exp_avg_sq"].numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e3], ids=["clips", "clips-a-little", "no-clip"])
def test_clip_grad_norm_equals_torch(max_norm):
    ours, theirs = twins()
    for p, q, g in zip(ours, theirs, gradients()[0]):
        p.grad = g.copy()
        q.grad = torch.from_numpy(g.copy())
    ours[1].grad = None  # a parameter without a gradient is left out of the norm
    theirs[1].grad = None
    norm = optim.clip_grad_norm_(ours, max_norm)
    their_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert norm == pytest.approx(float(their_norm), rel=1e-13)
    for p, q in zip(ours, theirs):
        if q.grad is None:
            assert p.grad is None
        else:
            np.testing.assert_allclose(p.grad, q.grad.numpy(), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    "schedule",
    [
        functools.partial(optim.warmup_linear, total=30, warmup=5),
        functools.partial(optim.warmup_cosine, total=30, warmup=5, min_ratio=0.1),
    ],
    ids=["linear", "cosine"],
)
def test_lr_scheduler_follows_lambda_lr(schedule):
    ours, theirs = twins()
    opt = optim.SGD(ours, lr=0.2)
    their_opt = torch.optim.SGD(theirs, lr=0.2)
    sched = optim.LRScheduler(opt, schedule)
    their_sched = torch.optim.lr_scheduler.LambdaLR(their_opt, schedule)
    for _ in range(35):
        assert opt.lr == pytest.approx(their_opt.param_groups[0]["lr"], rel=1e-15, abs=1e-18)
        their_opt.step()
        sched.step()
        their_sched.step()
