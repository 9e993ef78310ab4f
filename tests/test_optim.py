"""Specs of minilora.optim: update rules, frozen parameters, in-place discipline, checkpoints, schedules.

The update rules are checked here against textbook NumPy formulas written in this file, and in
tests/oracle/test_optim_torch.py against torch.optim itself.
"""

import functools
import itertools
import json
import math

import numpy as np
import pytest
from conftest import to_np

import minilora as ml
from minilora import backend as bk
from minilora import optim

SHAPES = [(3, 4), (5,), (2, 3, 2)]


def make_params(shapes=SHAPES, dtype="float64", seed=0, requires_grad=True):
    rng = np.random.default_rng(seed)
    return [ml.tensor(rng.standard_normal(s), requires_grad=requires_grad, dtype=dtype) for s in shapes]


def grad_sequence(shapes=SHAPES, steps=20, seed=1):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s) for s in shapes] for _ in range(steps)]


def set_grads(params, grads):
    xp = bk.get_array_module(params[0].data)
    for p, g in zip(params, grads):
        p.grad = None if g is None else xp.asarray(g, dtype=p.dtype)


# ----------------------------------------------------------------------------- references (textbook formulas)
def reference_sgd(p0s, grads, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
    ps = [p.copy() for p in p0s]
    bufs = [None] * len(ps)
    for step_grads in grads:
        for k, g in enumerate(step_grads):
            d = g + weight_decay * ps[k]
            if momentum:
                bufs[k] = d.copy() if bufs[k] is None else momentum * bufs[k] + d
                d = d + momentum * bufs[k] if nesterov else bufs[k]
            ps[k] = ps[k] - lr * d
    return ps


def reference_adamw(p0s, grads, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    b1, b2 = betas
    ps = [p.copy() for p in p0s]
    ms = [np.zeros_like(p) for p in ps]
    vs = [np.zeros_like(p) for p in ps]
    ts = [0] * len(ps)
    for step_grads in grads:
        for k, g in enumerate(step_grads):
            if g is None:
                continue
            ts[k] += 1
            ps[k] = ps[k] * (1 - lr * weight_decay)
            ms[k] = b1 * ms[k] + (1 - b1) * g
            vs[k] = b2 * vs[k] + (1 - b2) * g * g
            m_hat = ms[k] / (1 - b1 ** ts[k])
            v_hat = vs[k] / (1 - b2 ** ts[k])
            ps[k] = ps[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return ps, ms, vs


def run(opt, params, grads):
    for step_grads in grads:
        set_grads(params, step_grads)
        opt.step()


# ----------------------------------------------------------------------------- update rules
@pytest.mark.parametrize(
    "hyper",
    [
        {"lr": 0.1},
        {"lr": 0.05, "momentum": 0.9},
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.1},
        {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.01, "nesterov": True},
    ],
    ids=["plain", "momentum", "momentum-wd", "nesterov-wd"],
)
def test_sgd_matches_formula(backend, hyper):
    params = make_params()
    p0 = [to_np(p).copy() for p in params]
    grads = grad_sequence()
    run(optim.SGD(params, **hyper), params, grads)
    for p, expected in zip(params, reference_sgd(p0, grads, **hyper)):
        np.testing.assert_allclose(to_np(p), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "hyper",
    [{"lr": 1e-2}, {"lr": 3e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}, {"lr": 1e-2, "weight_decay": 0.0}],
    ids=["default", "custom", "no-wd"],
)
def test_adamw_matches_formula(backend, hyper):
    params = make_params()
    p0 = [to_np(p).copy() for p in params]
    grads = grad_sequence()
    opt = optim.AdamW(params, **hyper)
    run(opt, params, grads)
    expected_p, expected_m, expected_v = reference_adamw(p0, grads, **hyper)
    for k, p in enumerate(params):
        np.testing.assert_allclose(to_np(p), expected_p[k], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(to_np(opt.state[k]["exp_avg"]), expected_m[k], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(to_np(opt.state[k]["exp_avg_sq"]), expected_v[k], rtol=1e-12, atol=1e-15)
    assert opt.steps == [20, 20, 20]


def test_adamw_skips_params_without_grad_and_counts_steps_per_param():
    params = make_params()
    p0 = [to_np(p).copy() for p in params]
    grads = grad_sequence(steps=12)
    for t, step_grads in enumerate(grads):  # param 1 gets a gradient only every third step
        if t % 3:
            step_grads[1] = None
    opt = optim.AdamW(params, lr=1e-2)
    run(opt, params, grads)
    assert opt.steps == [12, 4, 12]
    expected, _, _ = reference_adamw(p0, grads, lr=1e-2)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(to_np(p), e, rtol=1e-12, atol=1e-12)


def test_lr_change_takes_effect_on_next_step():
    params = make_params(shapes=[(4,)])
    p0 = to_np(params[0]).copy()
    g = np.ones(4)
    opt = optim.SGD(params, lr=0.1)
    set_grads(params, [g])
    opt.step()
    opt.lr = 0.01
    opt.step()
    np.testing.assert_allclose(to_np(params[0]), p0 - 0.11 * g, rtol=1e-14)


# ----------------------------------------------------------------------------- which parameters
def lora_like_params(dtype="float64"):
    """A frozen W0 (d=16, k=12) and trainable A (r=2, k) and B (d, r), as in a LoRA layer."""
    rng = np.random.default_rng(3)
    w0 = ml.tensor(rng.standard_normal((16, 12)), requires_grad=False, dtype=dtype)
    a = ml.tensor(rng.standard_normal((2, 12)), requires_grad=True, dtype=dtype)
    b = ml.tensor(rng.standard_normal((16, 2)), requires_grad=True, dtype=dtype)
    return w0, a, b


@pytest.mark.parametrize("make", [optim.AdamW, functools.partial(optim.SGD, momentum=0.9), optim.SGD])
def test_frozen_params_get_no_state_and_are_untouched(make):
    w0, a, b = lora_like_params()
    w0_before = to_np(w0).copy()
    w0.grad = np.ones_like(w0.data)  # even a stray gradient must not move a frozen weight
    opt = make([("w0", w0), ("lora_A", a), ("lora_B", b)], lr=0.1)
    assert opt.names == ["lora_A", "lora_B"]
    assert all(p is not w0 for p in opt.params)
    for _ in range(3):
        a.grad, b.grad = np.ones_like(a.data), np.ones_like(b.data)
        opt.step()
    np.testing.assert_array_equal(to_np(w0), w0_before)
    opt.zero_grad()
    assert a.grad is None and b.grad is None
    assert w0.grad is not None  # not the optimizer's to clear


def test_state_bytes_lora_vs_full():
    w0, a, b = lora_like_params(dtype="float32")
    lora_opt = optim.AdamW([w0, a, b])
    assert lora_opt.state_bytes() == 2 * (a.data.nbytes + b.data.nbytes)
    w0.requires_grad = True
    full_opt = optim.AdamW([w0, a, b])
    assert full_opt.state_bytes() == 2 * (w0.data.nbytes + a.data.nbytes + b.data.nbytes)
    assert full_opt.state_bytes() == sum(arr.nbytes for arr in full_opt.state_arrays().values())
    assert optim.SGD([a, b], lr=0.1, momentum=0.9).state_bytes() == a.data.nbytes + b.data.nbytes
    assert optim.SGD([a, b], lr=0.1).state_bytes() == 0
    assert "state" in repr(lora_opt)


def test_accepts_tensors_pairs_and_dicts_and_dedupes_tied_weights():
    a, b = make_params(shapes=[(2, 2), (3,)])
    assert optim.SGD([a, b, a], lr=0.1).params == [a, b]  # a tied weight is trained once
    assert optim.SGD({"x": a, "y": b}, lr=0.1).names == ["x", "y"]
    assert optim.SGD(iter([("x", a), ("y", b)]), lr=0.1).names == ["x", "y"]
    assert optim.SGD([a, b], lr=0.1).names == ["0", "1"]


def test_bad_construction_raises_clear_errors():
    (a,) = make_params(shapes=[(2,)])
    frozen = make_params(shapes=[(2,)], requires_grad=False)
    with pytest.raises(TypeError, match="not a single Tensor"):
        optim.AdamW(a)
    with pytest.raises(TypeError, match="position 0"):
        optim.AdamW([np.zeros(2)])
    with pytest.raises(ValueError, match="mark_only_lora_as_trainable"):
        optim.AdamW(frozen)
    with pytest.raises(ValueError, match="share a name"):
        optim.SGD([("x", a), ("x", make_params(shapes=[(2,)])[0])], lr=0.1)
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD([a], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        optim.AdamW([a], betas=(0.9, 1.0))


def test_grad_of_wrong_shape_or_dtype_is_reported_by_name():
    (a,) = make_params(shapes=[(2, 3)])
    opt = optim.AdamW([("layer.lora_A", a)])
    a.grad = np.zeros((3, 2))
    with pytest.raises(ValueError, match="layer.lora_A"):
        opt.step()
    a.grad = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="dtype"):
        opt.step()
    a.data = a.data.astype(np.float32)  # e.g. model.to(dtype=...) after the optimizer was made
    a.grad = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(RuntimeError, match="after model.to"):
        opt.step()


# ----------------------------------------------------------------------------- in-place discipline
@pytest.mark.parametrize(
    "make",
    [optim.AdamW, functools.partial(optim.SGD, momentum=0.9, weight_decay=0.1, nesterov=True), optim.SGD],
    ids=["adamw", "sgd-nesterov", "sgd"],
)
def test_grads_are_never_written_and_params_are_updated_in_place(backend, make):
    xp = bk.xp()
    a, b = make_params(shapes=[(3, 4), (3, 4)])
    shared = xp.asarray(np.random.default_rng(0).standard_normal((3, 4)))
    shared_before = shared.copy()
    data_a, view_a = a.data, a.data[0]  # a reference and a view held "elsewhere"
    a.grad = b.grad = shared  # one gradient array shared by two tensors
    b.data[...] = a.data
    start = to_np(a).copy()
    opt = make([a, b], lr=0.1)
    opt.step()
    np.testing.assert_array_equal(to_np(shared), to_np(shared_before))
    assert a.data is data_a
    np.testing.assert_array_equal(to_np(view_a), to_np(a.data[0]))
    np.testing.assert_array_equal(to_np(a), to_np(b))  # same start, same grad: same result
    assert not np.array_equal(to_np(a), start)


@pytest.mark.parametrize(
    "make",
    [functools.partial(optim.AdamW, lr=1e-2), functools.partial(optim.SGD, lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=True)],
    ids=["adamw", "sgd-nesterov"],
)
def test_float32_stays_float32(backend, make):
    params32 = make_params(dtype="float32")
    params64 = [ml.tensor(to_np(p).astype(np.float64), requires_grad=True, dtype="float64") for p in params32]
    grads = grad_sequence(steps=5)
    opt32, opt64 = make(params32), make(params64)
    run(opt32, params32, grads)
    run(opt64, params64, grads)
    for p32, p64 in zip(params32, params64):
        assert p32.dtype == np.float32
        np.testing.assert_allclose(to_np(p32), to_np(p64), rtol=1e-5, atol=1e-6)
    for state in opt32.state:
        assert all(arr.dtype == np.float32 for arr in state.values())


# ----------------------------------------------------------------------------- checkpoints
def json_and_safetensors_round_trip(opt):
    meta = json.loads(json.dumps(opt.state_meta()))
    arrays = opt.state_arrays()
    try:
        from safetensors.numpy import load, save
    except ImportError:  # the arrays are still checked as plain copies
        return meta, {k: v.copy() for k, v in arrays.items()}
    return meta, load(save(arrays)) if arrays else {}


@pytest.mark.parametrize(
    "make",
    [
        functools.partial(optim.AdamW, lr=1e-2, weight_decay=0.1),
        functools.partial(optim.SGD, lr=0.05, momentum=0.9, nesterov=True),
        functools.partial(optim.SGD, lr=0.05),
    ],
    ids=["adamw", "sgd-nesterov", "sgd"],
)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_save_load_continues_bit_identically(make, dtype):
    grads = grad_sequence(steps=20)
    schedule = functools.partial(optim.warmup_cosine, total=20, warmup=4, min_ratio=0.1)

    straight = make_params(dtype=dtype)
    opt = make([(f"p{k}", p) for k, p in enumerate(straight)])
    sched = optim.LRScheduler(opt, schedule)
    for step_grads in grads:
        set_grads(straight, step_grads)
        opt.step()
        sched.step()

    first = make_params(dtype=dtype)
    opt = make([(f"p{k}", p) for k, p in enumerate(first)])
    sched = optim.LRScheduler(opt, schedule)
    for step_grads in grads[:10]:
        set_grads(first, step_grads)
        opt.step()
        sched.step()
    meta, arrays = json_and_safetensors_round_trip(opt)
    sched_state = json.loads(json.dumps(sched.state_dict()))
    saved_params = [to_np(p).copy() for p in first]  # the model checkpoint
    before = opt.state_dict()
    for step_grads in grads[10:12]:  # keep training: a saved state must not change afterwards
        set_grads(first, step_grads)
        opt.step()
    for key, arr in before["arrays"].items():
        np.testing.assert_array_equal(arr, arrays[key])

    resumed = [ml.tensor(p.copy(), requires_grad=True, dtype=dtype) for p in saved_params]
    opt2 = make([(f"p{k}", p) for k, p in enumerate(resumed)], lr=123.0)  # hyperparameters come from the state
    opt2.load_state_dict(meta, arrays)
    sched2 = optim.LRScheduler(opt2, schedule)
    sched2.load_state_dict(sched_state)
    assert opt2.lr == sched.base_lr * schedule(10)
    for step_grads in grads[10:]:
        set_grads(resumed, step_grads)
        opt2.step()
        sched2.step()
    for p, q in zip(resumed, straight):
        np.testing.assert_array_equal(to_np(p), to_np(q))


def test_state_dict_is_json_able_and_load_checks_before_changing():
    params = make_params()
    opt = optim.AdamW([(f"p{k}", p) for k, p in enumerate(params)])
    set_grads(params, grad_sequence(steps=1)[0])
    opt.step()
    state = opt.state_dict()
    json.dumps(state["meta"])
    assert set(state["arrays"]) == {f"p{k}.{key}" for k in range(3) for key in ("exp_avg", "exp_avg_sq")}

    other = optim.AdamW([(f"q{k}", p) for k, p in enumerate(make_params())])
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="saved by 'AdamW'"):
        optim.SGD([(f"p{k}", p) for k, p in enumerate(make_params())], lr=0.1).load_state_dict(state)
    fresh = optim.AdamW([(f"p{k}", p) for k, p in enumerate(make_params())])
    broken = {"meta": state["meta"], "arrays": dict(state["arrays"], **{"p2.exp_avg": np.zeros(7)})}
    with pytest.raises(ValueError, match="p2.exp_avg"):
        fresh.load_state_dict(broken)
    assert fresh.steps == [0, 0, 0] and not np.any(fresh.state[0]["exp_avg"])  # nothing half-loaded
    with pytest.raises(ValueError, match="unexpected"):
        fresh.load_state_dict(state["meta"], dict(state["arrays"], extra=np.zeros(1)))
    fresh.load_state_dict(state["meta"], dict(state["arrays"], extra=np.zeros(1)), strict=False)
    assert fresh.steps == [1, 1, 1]


# ----------------------------------------------------------------------------- clipping
def test_clip_grad_norm_scales_globally_and_replaces_grads(backend):
    xp = bk.xp()
    params = make_params()
    grads = grad_sequence(steps=1)[0]
    set_grads(params, grads)
    originals = [p.grad for p in params]
    expected_norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
    norm = optim.clip_grad_norm_(params, max_norm=1.0)
    assert isinstance(norm, float)
    assert norm == pytest.approx(expected_norm, rel=1e-14)
    coef = 1.0 / (expected_norm + 1e-6)
    for p, g, original in zip(params, grads, originals):
        assert p.grad is not original
        np.testing.assert_array_equal(to_np(original), g)  # the old arrays are untouched
        np.testing.assert_allclose(to_np(p.grad), g * coef, rtol=1e-14)
    total_after = math.sqrt(sum(float(xp.sum(p.grad * p.grad)) for p in params))
    assert total_after <= 1.0


def test_clip_grad_norm_leaves_small_grads_and_skips_missing():
    params = make_params()
    set_grads(params, [np.full(p.shape, 1e-3) for p in params])
    params[1].grad = None
    before = [p.grad for p in params]
    norm = optim.clip_grad_norm_([(f"p{k}", p) for k, p in enumerate(params)], max_norm=10.0)
    assert norm == pytest.approx(1e-3 * math.sqrt(12 + 12), rel=1e-12)
    assert all(p.grad is g for p, g in zip(params, before))


def test_clip_grad_norm_float32_and_nonfinite():
    params = make_params(dtype="float32")
    set_grads(params, [np.full(p.shape, 100.0) for p in params])
    optim.clip_grad_norm_(params, max_norm=1.0)
    assert all(p.grad.dtype == np.float32 for p in params)
    params[0].grad = params[0].grad.copy()
    params[0].grad[0, 0] = np.nan
    kept = [p.grad for p in params]
    assert math.isnan(optim.clip_grad_norm_(params, max_norm=1.0))
    assert all(p.grad is g for p, g in zip(params, kept))
    with pytest.raises(RuntimeError, match="NaN or inf"):
        optim.clip_grad_norm_(params, max_norm=1.0, error_if_nonfinite=True)


# ----------------------------------------------------------------------------- schedules
def test_warmup_linear_values():
    f = functools.partial(optim.warmup_linear, total=100, warmup=10)
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)
    assert f(10) == 1.0  # the warmup boundary
    assert f(55) == pytest.approx(0.5)
    assert f(100) == 0.0 and f(150) == 0.0  # the end, and after it
    values = [f(s) for s in range(120)]
    assert all(x <= y for x, y in itertools.pairwise(values[:11]))  # warming up
    assert all(x >= y for x, y in itertools.pairwise(values[10:]))  # decaying
    assert optim.warmup_linear(0, 10, 0) == 1.0  # no warmup: start at the full lr


def test_warmup_cosine_values():
    f = functools.partial(optim.warmup_cosine, total=100, warmup=10, min_ratio=0.1)
    assert f(0) == 0.0
    assert f(10) == 1.0
    assert f(55) == pytest.approx(0.55)  # half way down: the mean of 1 and min_ratio
    assert f(100) == pytest.approx(0.1) and f(200) == pytest.approx(0.1)
    values = [f(s) for s in range(120)]
    assert all(x <= y for x, y in itertools.pairwise(values[:11]))  # warming up
    assert all(x >= y - 1e-15 for x, y in itertools.pairwise(values[10:]))  # decaying
    assert optim.warmup_cosine(100, 100, 10) == pytest.approx(0.0)


@pytest.mark.parametrize("fn", [optim.warmup_linear, optim.warmup_cosine])
def test_schedule_arguments_are_checked(fn):
    with pytest.raises(ValueError, match="warmup"):
        fn(0, 10, 11)
    with pytest.raises(ValueError, match="total"):
        fn(0, 0, 0)
    with pytest.raises(ValueError, match="step"):
        fn(-1, 10, 2)


def test_lr_scheduler_sets_and_restores_lr():
    opt = optim.SGD(make_params(), lr=0.5)
    sched = optim.LRScheduler(opt, functools.partial(optim.warmup_linear, total=10, warmup=4))
    assert opt.lr == 0.0 and sched.base_lr == 0.5
    lrs = []
    for _ in range(10):
        sched.step()
        lrs.append(sched.lr)
    assert lrs[3] == 0.5 and lrs[-1] == 0.0
    state = sched.state_dict()
    opt2 = optim.SGD(make_params(), lr=0.5)
    sched2 = optim.LRScheduler(opt2, functools.partial(optim.warmup_linear, total=10, warmup=4))
    sched2.load_state_dict(json.loads(json.dumps(state)))
    assert opt2.lr == opt.lr and sched2.last_step == 10


@pytest.mark.parametrize(
    "make",
    [optim.AdamW, functools.partial(optim.SGD, momentum=0.9, weight_decay=0.1, nesterov=True)],
    ids=["adamw", "sgd-nesterov"],
)
def test_step_allocates_no_arrays(make):
    import tracemalloc

    params = make_params(shapes=[(256, 256), (256,)], dtype="float32")  # 256 KiB of float32
    set_grads(params, grad_sequence(shapes=[(256, 256), (256,)], steps=1)[0])
    opt = make(params, lr=1e-3)
    opt.step()
    tracemalloc.start()
    try:
        opt.step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024, f"step() allocated {peak} bytes; the update should run in preallocated buffers"


def test_adamw_in_cache_sized_pieces_is_bit_for_bit_the_whole_update(monkeypatch):
    """A large parameter is updated piece by piece on NumPy: the same elementwise passes, the same bits."""
    shapes = [(37, 11), (5,), (64, 3)]
    results = []
    for piece in (1 << 30, 16):  # one piece; pieces of 16 values (the last one short)
        monkeypatch.setattr(optim, "_PIECE", piece)
        rng = np.random.default_rng(3)
        params = [ml.tensor(rng.standard_normal(s).astype(np.float32), requires_grad=True) for s in shapes]
        opt = optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        for _ in range(3):
            for p in params:
                p.grad = rng.standard_normal(p.shape).astype(np.float32)
            opt.step()
        results.append([p.data.copy() for p in params] + [s["exp_avg_sq"].copy() for s in opt.state])
    for whole, pieces in zip(*results):
        np.testing.assert_array_equal(whole.view(np.uint32), pieces.view(np.uint32))
    assert optim._in_pieces(*(np.zeros((64, 3), np.float32),) * 4)
    assert not optim._in_pieces(np.zeros((64, 3), np.float32).T, *(np.zeros((3, 64), np.float32),) * 3)
