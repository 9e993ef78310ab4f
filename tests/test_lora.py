"""Specs of LoRA (Hu et al. 2021): the fused layer, adapters, merge, mixed-task batches, adapter files.

h = W₀x + b + s·B A drop(x), s = α/r (eq. 3). Gradients are checked in float64 against central
differences and against autograd through the primitives; the frozen-W₀ backward is instrumented
to prove it never forms the d×k product; merge/unmerge, mixed batches and files are checked
against the unmerged / one-adapter-at-a-time / in-memory models they must equal.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import ClassVar

import numpy as np
import pytest
from conftest import assert_close, to_np
from hypothesis import given
from hypothesis import strategies as st
from lora_helpers import assert_mixed_batch_equals_each_adapter_alone, ids_batch, tiny_gpt

import minilora as ml
from minilora import backend as bk
from minilora import functional as F
from minilora import lora, nn
from minilora.models import GPT, GPTConfig


# ============================================================================ helpers
def T(a, grad=True):
    """A float64 leaf Tensor on the current backend (None stays None)."""
    return None if a is None else ml.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad, dtype="float64")


@st.composite
def lora_cases(draw, max_side=5):
    """(x, W, b, A, B, scaling, weight_trainable, bias) with any number of leading batch dims."""
    d, k = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    r = draw(st.integers(1, min(d, k)))
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    alpha = draw(st.floats(0.25, 16.0))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    with_bias, trainable = draw(st.booleans()), draw(st.booleans())
    x = rng.standard_normal(batch + (k,))
    W, A, Bm = rng.standard_normal((d, k)), rng.standard_normal((r, k)), rng.standard_normal((d, r))
    b = rng.standard_normal(d) if with_bias else None
    return x, W, b, A, Bm, alpha / r, trainable


def primitive_lora(x, W, b, A, Bm, s, x_adapter=None):
    """The same layer through primitive ops only (autograd differentiates it); x_adapter: drop(x)."""
    h = x @ W.swapaxes(-1, -2)
    if b is not None:
        h = h + b
    x_adapter = x if x_adapter is None else x_adapter
    return h + ((x_adapter @ A.swapaxes(-1, -2)) @ Bm.swapaxes(-1, -2)) * s


def randomize_lora(model, seed=1, scale=0.3):
    """A fresh adapter has B = 0, which hides bugs: give every LoRA matrix random values."""
    rng = np.random.default_rng(seed)
    params = dict(model.named_parameters())
    for name in lora.lora_parameter_names(model):
        p = params[name]
        p.data[...] = bk.asarray(rng.standard_normal(p.shape) * scale, dtype=p.dtype, backend=p.backend)


def snapshot(model):
    return {n: to_np(p.data).copy() for n, p in model.named_parameters()}


def assert_same_params(model, before):
    now = snapshot(model)
    assert list(now) == list(before)
    for n in now:
        assert now[n].dtype == before[n].dtype and np.array_equal(now[n], before[n], equal_nan=True), n


CFG = lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v"))


# ============================================================================ F.lora_linear
@given(lora_cases())
def test_lora_linear_gradcheck(backend, case):
    """x, A, B always; W₀ and b too when they are trainable (full fine-tuning + LoRA)."""
    x, W, b, A, Bm, s, trainable = case
    inputs = [T(x), T(W, trainable), T(b, trainable), T(A), T(Bm)]
    assert ml.gradcheck(lambda *t: F.lora_linear(*t, s), inputs, atol=1e-7, rtol=1e-6)


@given(lora_cases(), st.sampled_from([0.1, 0.5]))
def test_lora_linear_gradcheck_with_dropout(backend, case, p):
    """The mask is fixed by reseeding before each evaluation, so finite differences see one function."""
    x, W, b, A, Bm, s, trainable = case

    def fn(*t):
        ml.manual_seed(123)
        return F.lora_linear(*t, s, dropout=p, training=True)

    assert ml.gradcheck(fn, [T(x), T(W, trainable), T(b, trainable), T(A), T(Bm)], atol=1e-7, rtol=1e-6)


@given(lora_cases(), st.sampled_from([0.0, 0.3]))
def test_fused_backward_equals_autograd_through_primitives(backend, case, p):
    x, W, b, A, Bm, s, trainable = case
    g = np.random.default_rng(0).standard_normal(x.shape[:-1] + (W.shape[0],))
    results = []
    for fused in (True, False):
        inputs = [T(x), T(W, trainable), T(b, trainable), T(A), T(Bm)]
        ml.manual_seed(7)  # the same dropout mask for both: drawn for x's elements in C order
        if fused:
            h = F.lora_linear(*inputs, s, dropout=p, training=True)
        else:
            xi, Wi, bi, Ai, Bi = inputs
            h = primitive_lora(xi, Wi, bi, Ai, Bi, s, x_adapter=F.dropout(xi, p, True))
        h.backward(bk.asarray(g, dtype=np.float64))
        results.append((to_np(h.data), [None if t is None or t.grad is None else to_np(t.grad) for t in inputs]))
    (h1, g1), (h2, g2) = results
    assert_close(h1, h2, rtol=1e-12, atol=1e-12)
    for name, a, bb in zip(["x", "W", "b", "A", "B"], g1, g2):
        assert (a is None) == (bb is None), name
        if a is not None:
            assert_close(a, bb, rtol=1e-10, atol=1e-10, what=name)


class CountingArray(np.ndarray):
    """An honest instrument: an ndarray that records the result shape of every matmul it takes part in.

    Results of ops on it are CountingArrays too, so everything the op derives from its inputs
    stays instrumented, and every matmul of the op involves one of its inputs.
    """

    products: ClassVar[list] = []

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        raw = [i.view(np.ndarray) if isinstance(i, CountingArray) else i for i in inputs]
        if out is not None:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, CountingArray) else o for o in out)
        result = getattr(ufunc, method)(*raw, **kwargs)
        if ufunc is np.matmul:
            CountingArray.products.append(tuple(result.shape))
        if out is not None:
            return out[0] if len(out) == 1 else out
        return result.view(CountingArray) if isinstance(result, np.ndarray) else result


@pytest.mark.parametrize("weight_trainable", [False, True])
def test_frozen_weight_backward_never_forms_the_d_by_k_product(weight_trainable):
    N_shape, d, k, r = (2, 3), 7, 5, 2  # N = 6, all four sizes distinct: a shape names its product
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(N_shape + (k,)), rng.standard_normal((d, k)), rng.standard_normal(d),
              rng.standard_normal((r, k)), rng.standard_normal((d, r))]
    grads = [True, weight_trainable, weight_trainable, True, True]
    tensors = []
    for a, g in zip(arrays, grads):
        t = ml.tensor(a, requires_grad=g, dtype="float64")
        t.data = t.data.view(CountingArray)
        tensors.append(t)
    h = F.lora_linear(*tensors, 2.0)
    CountingArray.products = []
    h.backward(rng.standard_normal(N_shape + (d,)))
    products = CountingArray.products
    assert (r, k) in products and (d, r) in products and (6, k) in products  # the instrument sees the backward
    assert products.count((d, k)) == (1 if weight_trainable else 0)
    x, W, b, A, Bm = tensors
    if not weight_trainable:
        assert W.grad is None and b.grad is None
    assert x.grad is not None and A.grad is not None and Bm.grad is not None


def test_lora_linear_rejects_bad_shapes():
    x, W = T(np.ones((3, 4))), T(np.ones((5, 4)), False)
    with pytest.raises(ValueError, match=r"lora_A must be \(r, k\) and lora_B \(d, r\).*\(2, 3\)"):
        F.lora_linear(x, W, None, T(np.ones((2, 3))), T(np.ones((5, 2))), 1.0)
    with pytest.raises(ValueError, match="input has 3 features"):
        F.lora_linear(T(np.ones((3, 3))), W, None, T(np.ones((2, 4))), T(np.ones((5, 2))), 1.0)


# ============================================================================ LoRAConfig
def test_config_scaling_and_round_trip():
    cfg = lora.LoRAConfig(r=4, alpha=32, target_modules=("q", "v"))
    assert cfg.scaling == 8.0
    assert lora.LoRAConfig(r=4, alpha=32, target_modules="q", use_rslora=True).scaling == 16.0
    assert lora.LoRAConfig(r=4, alpha=32, target_modules="q").target_modules == ("q",)
    back = lora.LoRAConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert lora.LoRAConfig.from_dict({**cfg.to_dict(), "from_the_future": 1}) == cfg
    with pytest.raises(ValueError, match=r"missing \['alpha'\]"):
        lora.LoRAConfig.from_dict({"r": 1, "target_modules": ["q"]})


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, r"r must be an integer >= 1"),
    ({"r": 2.5}, r"r must be an integer >= 1"),
    ({"r": True}, r"r must be an integer >= 1"),
    ({"alpha": 0}, r"alpha must be a finite number > 0"),
    ({"alpha": -1.0}, r"alpha must be a finite number > 0"),
    ({"alpha": float("nan")}, r"alpha must be a finite number > 0"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
    ({"bias": "some"}, r"bias must be one of \('none', 'all', 'lora_only'\)"),
    ({"init": "xavier"}, r"init must be one of \('kaiming', 'gaussian', 'pissa'\)"),
    ({"target_modules": ()}, r"target_modules must be a non-empty sequence"),
    ({"target_modules": ("q", "")}, r"target_modules must be a non-empty sequence"),
    ({"target_modules": 3}, r"target_modules must be a name or a sequence"),
    ({"use_rslora": "yes"}, r"use_rslora must be True or False"),
])
def test_bad_config_is_rejected_with_a_clear_message(kwargs, message):
    full = {"r": 2, "alpha": 4.0, "target_modules": ("q",)} | kwargs
    with pytest.raises(ValueError, match=message):
        lora.LoRAConfig(**full)


def test_apply_lora_errors_name_the_layers():
    model = tiny_gpt()
    with pytest.raises(ValueError, match=r"'qq' matches no Linear layer of GPT.*named q, k, v, o, fc, proj"):
        lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "qq")))
    with pytest.raises(ValueError, match=r"'attn' names blocks\.0\.attn, blocks\.1\.attn \(CausalSelfAttention\), not a Linear"):
        lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("attn",)))
    with pytest.raises(ValueError, match=r"r=17 is larger than min\(d, k\) = 16 of blocks\.0\.attn\.q \(weight \(16, 16\)\)"):
        lora.apply_lora(model, lora.LoRAConfig(r=17, alpha=4, target_modules=("q",)))
    for bad in ("a.b", "__base__", "", "x y"):
        with pytest.raises(ValueError, match="is not allowed"):
            lora.apply_lora(model, CFG, adapter_name=bad)
    with pytest.raises(TypeError, match="LoRALinear"):
        lora.apply_lora(nn.Linear(4, 4), CFG)
    assert not lora.lora_layers(model)  # every failure above left the model untouched
    lora.apply_lora(model, CFG, "a")
    with pytest.raises(ValueError, match="already has an adapter 'a'"):
        lora.apply_lora(model, CFG, "a")
    with pytest.raises(ValueError, match=r"no adapter 'zz'; its adapters are \['a'\]"):
        lora.set_adapter(model, "zz")
    with pytest.raises(ValueError, match=r"^merge: the model has no adapter 'zz'; its adapters are \['a'\]$"):
        lora.merge(model, ["a", "zz"])
    for ask in (lora.get_adapter_config, lora.lora_state_dict, lora.adapter_unchanged):
        with pytest.raises(ValueError, match=r"^the model has no adapter 'zz'; its adapters are \['a'\]$"):
            ask(model, "zz")
    assert not any(layer.merged for _, layer in lora.lora_layers(model))
    with pytest.raises(ValueError, match=r"r=9 is larger than min\(d, k\) = 8 of LoRALinear \(weight \(8, 20\)\)"):
        lora.LoRALinear(nn.Linear(20, 8)).add_adapter("x", lora.LoRAConfig(r=9, alpha=1, target_modules="q"))


def test_targets_match_the_last_component_or_a_dotted_path():
    model = tiny_gpt(n_layer=2)
    lora.apply_lora(model, lora.LoRAConfig(r=1, alpha=1, target_modules=("q", "blocks.1.mlp.fc", "0.attn.o")))
    assert [p for p, _ in lora.lora_layers(model)] == ["blocks.0.attn.q", "blocks.0.attn.o", "blocks.1.attn.q", "blocks.1.mlp.fc"]


# ============================================================================ the layer
@given(lora_cases(), st.sampled_from(["kaiming", "gaussian"]), st.sampled_from(["float32", "float64"]))
def test_fresh_adapter_gives_exactly_the_base_output(backend, case, init, dtype):
    x, W, b, A, _Bm, _s, _ = case
    r = A.shape[0]
    base = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, dtype=dtype)
    layer = lora.LoRALinear(base)
    layer.add_adapter("a", lora.LoRAConfig(r=r, alpha=2.0 * r, target_modules="q", init=init, dropout=0.2))
    xt = ml.tensor(x, dtype=dtype)
    assert np.array_equal(to_np(layer(xt).data), to_np(F.linear(xt, base.weight, base.bias).data))
    assert not to_np(layer.lora_B["a"].data).any()


def test_init_distributions():
    k, r = 4096, 4
    layer = lora.LoRALinear(nn.Linear(k, 8, dtype="float64"))
    layer.add_adapter("k", lora.LoRAConfig(r=r, alpha=1, target_modules="q"))
    layer.add_adapter("g", lora.LoRAConfig(r=r, alpha=1, target_modules="q", init="gaussian"))
    a_k, a_g = to_np(layer.lora_A["k"].data), to_np(layer.lora_A["g"].data)
    bound = 1 / math.sqrt(k)  # loralib: kaiming_uniform_(A, a=√5) on fan_in = k
    assert np.abs(a_k).max() <= bound and abs(a_k.std() - bound / math.sqrt(3)) < 0.03 * bound
    assert abs(a_g.std() - 1 / r) < 0.03 / r and abs(a_g.mean()) < 0.01  # PEFT's "gaussian": σ = 1/r
    assert layer.lora_A["k"].shape == (r, k) and layer.lora_B["k"].shape == (8, r)


@given(lora_cases())
def test_layer_forward_is_eq3(backend, case):
    x, W, b, A, Bm, s, _ = case
    d, k = W.shape
    r = A.shape[0]
    layer = lora.LoRALinear(nn.Linear(k, d, bias=b is not None, dtype="float64"))
    layer.weight.data[...] = bk.asarray(W)
    if b is not None:
        layer.bias.data[...] = bk.asarray(b)
    layer.add_adapter("a", lora.LoRAConfig(r=r, alpha=s * r, target_modules="q"))
    layer.lora_A["a"].data[...] = bk.asarray(A)
    layer.lora_B["a"].data[...] = bk.asarray(Bm)
    expected = x @ W.T + (0 if b is None else b) + s * (x @ A.T) @ Bm.T
    assert_close(layer(ml.tensor(x, dtype="float64")).data, expected, rtol=1e-12, atol=1e-12)


def test_state_dict_names_and_base_checkpoints():
    model = tiny_gpt()
    base_state = {n: to_np(a).copy() for n, a in model.state_dict().items()}
    lora.apply_lora(model, lora.LoRAConfig(r=3, alpha=3, target_modules=("q", "fc")), "e2e")
    names = list(model.state_dict())
    assert [n for n in names if "lora_" not in n] == list(base_state)  # same names, same order
    assert model.state_dict()["blocks.0.attn.q.lora_A.e2e"].shape == (3, 16)  # (r, in)
    assert model.state_dict()["blocks.1.mlp.fc.lora_B.e2e"].shape == (64, 3)  # (out, r)
    assert list(lora.lora_state_dict(model, "e2e")) == [n for n in names if n.endswith(".e2e")]
    fresh = tiny_gpt(seed=5)
    lora.apply_lora(fresh, lora.LoRAConfig(r=3, alpha=3, target_modules=("q", "fc")), "e2e")
    lora.load_base_state_dict(fresh, base_state)
    assert_same_params(fresh, {**snapshot(fresh), **base_state})
    with pytest.raises(ValueError, match=r"missing \['wte.weight'\]"):
        lora.load_base_state_dict(fresh, {n: a for n, a in base_state.items() if n != "wte.weight"})


@given(st.integers(1, 3), st.sampled_from([8, 16]), st.integers(1, 4))
def test_parameter_count_is_2_L_d_r(n_layer, d, r):
    """|Θ| = 2 × L̂ × d_model × r with L̂ = 2·n_layer adapted square matrices (Wq, Wv)."""
    model = GPT(GPTConfig(vocab_size=10, block_size=4, n_layer=n_layer, n_head=2, d_model=d))
    total = model.num_parameters()
    lora.apply_lora(model, lora.LoRAConfig(r=r, alpha=1, target_modules=("q", "v")))
    lora.mark_only_lora_as_trainable(model)
    summary = lora.trainable_summary(model)
    assert summary["trainable"] == summary["lora"] == 2 * (2 * n_layer) * d * r
    assert summary["total"] == total + summary["lora"]
    assert summary["percent"] == pytest.approx(100 * summary["trainable"] / summary["total"])
    assert f"trainable params: {summary['trainable']:,} || all params: {summary['total']:,}" in str(summary)


def test_parameter_ratio_of_a_1024_layer():
    layer = lora.LoRALinear(nn.Linear(1024, 1024, bias=False))
    layer.add_adapter("a", lora.LoRAConfig(r=4, alpha=8, target_modules="q"))
    lora_params = layer.lora_A["a"].size + layer.lora_B["a"].size
    assert lora_params == 2 * 1024 * 4 and lora_params / layer.weight.size == pytest.approx(0.0078125)


@pytest.mark.parametrize("bias, trainable_biases", [
    ("none", set()),
    ("lora_only", {"blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q", "blocks.1.attn.v"}),
    ("all", "every"),
])
def test_mark_only_lora_as_trainable(bias, trainable_biases):
    """Trained biases are the adapter's own deltas <module>.lora_bias.<adapter>; the base biases stay frozen."""
    model = tiny_gpt()
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v"), bias=bias))
    lora.mark_only_lora_as_trainable(model)  # bias taken from the config
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    biases = {n for n in trainable if ".lora_bias." in n}
    if trainable_biases == "every":
        trainable_biases = {n[: -len(".bias")] for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert biases == {f"{m}.lora_bias.default" for m in trainable_biases}
    assert not any(n.endswith(".bias") for n in trainable)
    assert trainable - biases == set(lora.lora_parameter_names(model))
    # frozen W0: no gradient after backward, and no optimizer state
    idx = ids_batch(3)
    model.loss(idx, idx).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    from minilora import optim

    opt = optim.AdamW(model.parameters(), lr=1e-3)
    assert {id(p) for p in opt.params} == {id(p) for p in model.parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="bias must be one of"):
        lora.mark_only_lora_as_trainable(model, bias="some")


def test_adapters_add_set_delete_disable(backend):
    model = tiny_gpt()
    idx = ids_batch(2)
    with ml.no_grad():
        base = to_np(model(idx).data)
        lora.apply_lora(model, CFG, "a")
        lora.apply_lora(model, lora.LoRAConfig(r=1, alpha=1, target_modules=("q", "o")), "b")
        randomize_lora(model)
        assert lora.list_adapters(model) == ["a", "b"]
        assert model.blocks[0].attn.v.active_adapters == [] and model.blocks[0].attn.q.active_adapters == ["b"]
        out_b = to_np(model(idx).data)
        lora.set_adapter(model, "a")
        out_a = to_np(model(idx).data)
        lora.set_adapter(model, ["a", "b"])  # several active: their updates add up
        out_ab = to_np(model(idx).data)
        lora.merge(model)  # W0 + ΔW_a + ΔW_b must give the same outputs
        assert_close(model(idx).data, out_ab, rtol=1e-10, atol=1e-12)
        with pytest.raises(RuntimeError, match=r"merged into the weights.*call lora\.unmerge\(model\) first"):
            lora.set_adapter(model, "a")
        with pytest.raises(RuntimeError, match="disable the adapters.*unmerge"), lora.disable_adapters(model):
            pass
        lora.unmerge(model)
        with lora.disable_adapters(model):
            assert np.array_equal(to_np(model(idx).data), base)
        assert_close(model(idx).data, out_ab, rtol=1e-10, atol=1e-12)  # restored after the context
        assert not np.allclose(out_a, out_b) and not np.allclose(out_a, base)
        lora.delete_adapter(model, "b")
        assert lora.list_adapters(model) == ["a"]
        assert_close(model(idx).data, out_a, rtol=1e-10, atol=1e-12)
        with pytest.raises(ValueError, match=r"no adapter 'b'; its adapters are \['a'\]"):
            lora.delete_adapter(model, "b")


# ============================================================================ merge
@given(lora_cases(), st.sampled_from(["float32", "float64"]), st.booleans())
def test_merge_layer_equals_unmerged_and_unmerge_restores(backend, case, dtype, keep_original):
    """Merged forward == unmerged: <= 1e-12 relative in float64, <= 1e-5 in float32 (documented).

    unmerge(merge(W)) == W bit-exactly (keep_original, the default); without the saved copy the
    subtraction of ΔW is exact to one ulp of the merged or original weight.
    """
    x, W, b, A, Bm, s, _ = case
    d, k = W.shape
    layer = lora.LoRALinear(nn.Linear(k, d, bias=b is not None, dtype=dtype))
    layer.weight.data[...] = bk.asarray(W)
    layer.add_adapter("a", lora.LoRAConfig(r=A.shape[0], alpha=s * A.shape[0], target_modules="q"))
    layer.lora_A["a"].data[...] = bk.asarray(A)
    layer.lora_B["a"].data[...] = bk.asarray(Bm)
    xt = ml.tensor(x, dtype=dtype)
    with ml.no_grad():
        unmerged = to_np(layer(xt).data).astype(np.float64)
        w_before = to_np(layer.weight.data).copy()
        weight, storage = layer.weight, layer.weight.data
        layer.commit_merge(["a"], layer.plan_merge(["a"]), keep_original=keep_original)
        assert layer.weight is weight and layer.weight.data is storage  # in place: references stay valid
        merged_w = to_np(layer.weight.data).copy()
        merged = to_np(layer(xt).data).astype(np.float64)
    scale = max(np.abs(unmerged).max(), 1.0)
    tol = 1e-12 if dtype == "float64" else 1e-5
    assert np.abs(merged - unmerged).max() <= tol * scale
    layer.unmerge()
    w_after = to_np(layer.weight.data)
    if keep_original:
        assert np.array_equal(w_after, w_before)
    else:
        ulp = np.spacing(np.maximum(np.abs(w_before), np.abs(merged_w)).astype(dtype))
        assert (np.abs(w_after.astype(np.float64) - w_before) <= ulp).all()


def test_merge_model_equals_unmerged_idempotent_and_unmerges_bit_exactly(backend):
    for dtype, tol in (("float64", 1e-12), ("float32", 1e-5)):
        model = tiny_gpt(dtype)
        lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v", "fc")))
        randomize_lora(model)
        model.eval()
        idx = ids_batch(3)
        before = snapshot(model)
        unmerged = to_np(model(idx).data)
        lora.merge(model)
        merged = to_np(model(idx).data)
        assert np.abs(merged - unmerged).max() <= tol * np.abs(unmerged).max(), dtype
        after_first = snapshot(model)
        with pytest.warns(lora.MergeWarning, match="already merged"):
            lora.merge(model)
        assert_same_params(model, after_first)
        lora.unmerge(model)
        assert_same_params(model, before)
        with pytest.warns(lora.MergeWarning, match="nothing is merged"):
            lora.unmerge(model)


@pytest.mark.parametrize("plant", ["nan", "overflow"])
def test_safe_merge_refuses_non_finite_and_leaves_weights_bit_identical(plant):
    model = tiny_gpt("float32")
    lora.apply_lora(model, CFG)
    randomize_lora(model)
    layer = model.blocks[1].attn.v  # the LAST adapted layer: an unsafe merge would have written the others
    if plant == "nan":
        layer.lora_B["default"].data[0, 0] = np.nan
        message = r"ΔW = s·B A of adapter\(s\) \['default'\] in blocks\.1\.attn\.v .*non-finite"
    else:  # ΔW is finite in float64 but W0 + ΔW overflows float32
        layer.lora_B["default"].data[...] = 1e30
        layer.lora_A["default"].data[...] = 1e30
        message = r"W0 \+ ΔW .* blocks\.1\.attn\.v .* is not finite in float32"
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match=message):
        lora.merge(model)
    assert_same_params(model, before)
    assert not any(layer.merged for _, layer in lora.lora_layers(model))


def test_training_a_merged_model_or_merging_with_dropout_raises():
    model = tiny_gpt()
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v"), dropout=0.1))
    lora.mark_only_lora_as_trainable(model)
    idx = ids_batch(2)
    model.train()
    with pytest.raises(RuntimeError, match=r"dropout=0\.1 .*training mode.*model\.eval\(\)"):
        lora.merge(model)
    model.eval()
    lora.merge(model)
    model.train()
    with pytest.raises(RuntimeError, match=r"merged into the weight, so training now.*lora\.unmerge\(model\)"):
        model.loss(idx, idx)
    with ml.no_grad():
        model(idx)  # inference in training mode is fine
    model.eval()
    model(idx)  # and so is eval mode with grad enabled
    with pytest.raises(RuntimeError, match="mixed-task batch.*unmerge"):
        with lora.mixed_batch(model, ["default", "__base__"]):
            model(idx)
    lora.unmerge(model)
    model.train()
    model.loss(idx, idx).backward()


def test_delete_merged_adapter_unmerges_first():
    model = tiny_gpt()
    before = snapshot(model)
    lora.apply_lora(model, CFG, "a")
    randomize_lora(model)
    model.eval()
    lora.merge(model)
    lora.delete_adapter(model, "a")
    assert_same_params(model, before)


def test_merge_and_unload_returns_a_plain_model():
    model = tiny_gpt()
    lora.apply_lora(model, CFG)
    randomize_lora(model)
    model.eval()
    idx = ids_batch(3)
    expected = to_np(model(idx).data)
    base_names = [n for n in model.state_dict() if "lora_" not in n]
    out = lora.merge_and_unload(model)
    assert out is model
    assert not lora.lora_layers(model) and all(type(m) is not lora.LoRALinear for m in model.modules())
    assert list(model.state_dict()) == base_names
    assert_close(model(idx).data, expected, rtol=1e-10, atol=1e-12)


# ============================================================================ mixed-task batches
@st.composite
def mixed_cases(draw):
    rows, t = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    d, k = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    n = draw(st.integers(1, 3))
    names = [f"t{j}" for j in range(n)]
    ids = draw(st.lists(st.sampled_from(names + ["__base__"]), min_size=rows, max_size=rows))
    ranks = [draw(st.integers(1, min(d, k))) for _ in names]
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    x = rng.standard_normal((rows, t, k) if draw(st.booleans()) else (rows, k))
    As = [rng.standard_normal((r, k)) for r in ranks]
    Bs = [rng.standard_normal((d, r)) for r in ranks]
    return x, rng.standard_normal((d, k)), rng.standard_normal(d), As, Bs, [0.5 + j for j in range(n)], ids, names


def _mixed(inputs, case):
    _x, _W, _b, _As, _Bs, scalings, ids, names = case
    groups = lora.group_rows(ids, bk.get_backend())
    order = [names.index(n) for n in groups.names]
    xt, Wt, bt, *ab = inputs
    At, Bt = ab[: len(names)], ab[len(names):]
    return lora.mixed_lora_linear(xt, Wt, bt, [At[j] for j in order], [Bt[j] for j in order],
                                  [scalings[j] for j in order], groups.selectors)


@given(mixed_cases())
def test_mixed_lora_linear_gradcheck(backend, case):
    x, W, b, As, Bs, *_ = case
    inputs = [T(x), T(W), T(b), *[T(a) for a in As], *[T(m) for m in Bs]]
    assert ml.gradcheck(lambda *t: _mixed(t, case), inputs, atol=1e-7, rtol=1e-6)


@given(mixed_cases())
def test_mixed_lora_linear_equals_per_row_lora_linear(backend, case):
    """Row i of the mixed op == lora_linear of row i with its own adapter (W0 x + b for base rows)."""
    x, W, b, As, Bs, scalings, ids, names = case
    out = to_np(_mixed([T(x), T(W), T(b), *[T(a) for a in As], *[T(m) for m in Bs]], case).data)
    for i, name in enumerate(ids):
        xi = T(x[i : i + 1], False)
        if name == "__base__":
            ref = F.linear(xi, T(W, False), T(b, False))
        else:
            j = names.index(name)
            ref = F.lora_linear(xi, T(W, False), T(b, False), T(As[j], False), T(Bs[j], False), scalings[j])
        assert_close(out[i : i + 1], ref.data, rtol=1e-12, atol=1e-12, what=f"row {i} ({name})")


def test_row_grouping_is_cached_and_uses_slices_for_runs():
    ids = ("a", "a", "b", "__base__", "a")
    g = lora.group_rows(list(ids))
    assert lora.group_rows(list(ids)) is g
    assert g.names == ("a", "b") and g.selectors[1] == slice(2, 3)
    assert list(g.selectors[0]) == [0, 1, 4]
    with pytest.raises(TypeError, match="one adapter name per row"):
        lora.group_rows("abc")


def test_mixed_batch_equals_each_adapter_run_separately(backend):
    """Forward and every LoRA gradient: the mixed batch == one adapter at a time on its own rows."""
    model = tiny_gpt()
    lora.apply_lora(model, CFG, "a")
    lora.apply_lora(model, lora.LoRAConfig(r=3, alpha=3, target_modules=("q", "v", "fc")), "b")
    lora.apply_lora(model, lora.LoRAConfig(r=1, alpha=2, target_modules=("v",)), "c")
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=2, target_modules=("q",)), "d")  # absent from v and fc
    lora.mark_only_lora_as_trainable(model)
    randomize_lora(model)
    assert_mixed_batch_equals_each_adapter_alone(model, ["a", "__base__", "b", "a", "c", "d", "b", "c"])


class TwoLinears(nn.Module):
    """A user's own model, written here: nothing in it knows of LoRA or of adapter names."""

    def __init__(self, k=5, hidden=6, d=3):
        super().__init__()
        self.inp = nn.Linear(k, hidden, dtype=np.float64)
        self.out = nn.Linear(hidden, d, dtype=np.float64)

    def forward(self, x):  # x (rows, T, k)
        h = self.inp(x).tanh()  # (rows, T, hidden)
        return self.out(h) + x[..., :3] * 0.5  # (rows, T, d): and a skip path that no adapter touches


def _two_linears_with_adapters():
    ml.manual_seed(4)
    model = TwoLinears()
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("inp", "out")), "a")
    lora.apply_lora(model, lora.LoRAConfig(r=3, alpha=3, target_modules=("out",)), "b")  # absent from inp
    lora.apply_lora(model, lora.LoRAConfig(r=1, alpha=2, target_modules=("inp",)), "c")  # absent from out
    lora.mark_only_lora_as_trainable(model)
    randomize_lora(model, scale=0.5)
    return model


def test_mixed_batch_on_a_module_written_here_forward_and_backward(backend):
    """Any Module with LoRALinear layers: one backward trains every adapter from its own rows only."""
    model = _two_linears_with_adapters()
    model.to(backend=backend)
    ids = ["a", "__base__", "b", "a", "c", "b", "a"]
    rng = np.random.default_rng(5)
    x_np, G = rng.standard_normal((len(ids), 2, 5)), rng.standard_normal((len(ids), 2, 3))
    x = ml.tensor(x_np, requires_grad=True, dtype="float64")
    with lora.mixed_batch(model, ids) as groups:
        out = model(x)
        assert groups.names == ("a", "b", "c")
    assert model.inp.row_groups is None and model.out.row_groups is None  # routing ends with the block
    (out * bk.asarray(G)).sum().backward()
    mixed_out, mixed_dx = to_np(out.data), to_np(x.grad)
    mixed_grads = {n: to_np(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for name in ["a", "b", "c", "__base__"]:
        rows = [i for i, n in enumerate(ids) if n == name]
        x_rows = ml.tensor(x_np[rows], requires_grad=True, dtype="float64")
        if name == "__base__":
            with lora.disable_adapters(model):
                ref = model(x_rows)
        else:
            lora.set_adapter(model, name)
            ref = model(x_rows)
        (ref * bk.asarray(G[rows])).sum().backward()
        assert_close(mixed_out[rows], ref.data, rtol=1e-12, atol=1e-12, what=f"output rows of {name}")
        assert_close(mixed_dx[rows], x_rows.grad, rtol=1e-12, atol=1e-12, what=f"dL/dx rows of {name}")
    separate_grads = {n: to_np(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    assert set(mixed_grads) == set(separate_grads) == set(lora.lora_parameter_names(model))
    for n, grad in mixed_grads.items():
        assert np.abs(grad).max() > 0, n  # every adapter got a gradient from its rows
        assert_close(grad, separate_grads[n], rtol=1e-10, atol=1e-12, what=n)


def test_mixed_batch_on_a_module_written_here_gradcheck(backend):
    model = _two_linears_with_adapters()
    model.to(backend=backend)
    ids = ["c", "a", "__base__", "b", "a"]
    x = ml.tensor(np.random.default_rng(6).standard_normal((len(ids), 2, 5)), requires_grad=True, dtype="float64")
    lora_params = [p for n, p in model.named_parameters() if n in set(lora.lora_parameter_names(model))]

    def routed(x, *_params):  # the parameters are the model's own: gradcheck perturbs them in place
        with lora.mixed_batch(model, ids):
            return model(x)

    assert ml.gradcheck(routed, [x, *lora_params], atol=1e-7, rtol=1e-6)


def test_mixed_batch_nests_and_restores():
    model = _two_linears_with_adapters()
    with lora.mixed_batch(model, ["a", "b"]) as outer:
        with lora.mixed_batch(model, ["c"]) as inner:
            assert model.inp.row_groups is inner and model.out.row_groups is inner
        assert model.inp.row_groups is outer
        with pytest.raises(RuntimeError, match="boom"), lora.mixed_batch(model, ["b"]):
            raise RuntimeError("boom")
        assert model.out.row_groups is outer  # restored on an exception as well
    assert model.inp.row_groups is None
    with pytest.raises(TypeError, match="one adapter name per row"):
        with lora.mixed_batch(model, "a"):
            pass


def test_fit_trains_several_adapters_in_one_mixed_batch():
    """fit with joint.routed_loss: one loss, one backward per step, every named adapter learns from its rows."""
    from minilora import optim
    from minilora.joint import routed_loss
    from minilora.train import fit

    model = tiny_gpt()
    for name in ("a", "b", "idle"):
        lora.apply_lora(model, lora.LoRAConfig(r=4, alpha=8, target_modules=("q", "v", "fc", "proj")), name)
    lora.mark_only_lora_as_trainable(model)
    params = dict(model.named_parameters())
    idle_before = {n: to_np(p.data).copy() for n, p in params.items() if n.endswith(".idle")}
    ids = ["a", "b", "__base__", "a", "b"]
    rng = np.random.default_rng(7)
    idx = rng.integers(0, 24, (len(ids), 8))
    targets = np.where(np.arange(len(ids))[:, None] % 2 == 0, 3, 11) * np.ones((1, 8), dtype=np.int64)  # rows differ

    def row_losses():
        with lora.mixed_batch(model, ids), ml.no_grad():
            logits = to_np(model(idx).data)  # (rows, T, V)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        return -np.take_along_axis(logp, targets[..., None], -1).mean(axis=(1, 2))  # (rows,)

    before = row_losses()
    opt = optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.0)
    history = fit(model, opt, lambda step: (idx, targets, None), steps=30, progress=False, grad_clip=None,
                  loss_fn=routed_loss(ids))
    after = row_losses()
    assert history.losses[-1] < history.losses[0]
    trained = [i for i, n in enumerate(ids) if n != "__base__"]
    # (the tied head of a 0.02-init GPT bounds how far logits can move: about 0.3 nats here in 30 steps)
    assert np.all(after[trained] < before[trained] - 0.15), (before, after)
    assert after[2] == before[2]  # the base row reaches no trainable parameter: its loss cannot move
    for n, p in params.items():
        if ".lora_B." in n:
            moved = np.abs(to_np(p.data)).max() > 0
            assert moved == (not n.endswith(".idle")), n  # a and b learned; the adapter in no row did not
    for n, value in idle_before.items():
        assert np.array_equal(to_np(params[n].data), value), n
    assert all(layer.row_groups is None for _, layer in lora.lora_layers(model))


def test_mixed_batch_errors_and_base_rows():
    model = tiny_gpt()
    lora.apply_lora(model, CFG, "a")
    lora.apply_lora(model, CFG, "b")
    randomize_lora(model)
    idx = ids_batch(3)
    with pytest.raises(ValueError, match=r"unknown adapter 'zz' in adapter_ids; the model's adapters are \['a', 'b'\]"):
        with lora.mixed_batch(model, ["a", "zz", "b"]):
            model(idx)
    with ml.no_grad():
        with lora.disable_adapters(model):
            base = to_np(model(idx).data)
        with lora.mixed_batch(model, ["__base__"] * 3):
            assert np.array_equal(to_np(model(idx).data), base)
        with lora.disable_adapters(model), lora.mixed_batch(model, ["a", "b", "a"]):
            assert np.array_equal(to_np(model(idx).data), base)
        layer = model.blocks[0].attn.q
        with pytest.raises(ValueError, match=r"adapter_ids has 2 names but the input of shape \(3, 16\) has 3 rows"):
            with lora.mixed_batch(layer, ["a", "b"]):
                layer(ml.tensor(np.ones((3, 16))))
        with pytest.raises(ValueError, match=r"adapter_ids has 3 names but the input of shape \(2, 8, 16\) has 2 rows"):
            with lora.mixed_batch(model, ["a", "b", "a"]):  # the batch has 2 rows (moved here from test_gpt)
                model(idx[:2])
    assert all(layer.row_groups is None for _, layer in lora.lora_layers(model))  # every block restored it


# ============================================================================ adapter files
def _trained(dtype="float64", name="e2e", cfg=CFG, d=16):
    model = tiny_gpt(dtype, d=d)
    lora.apply_lora(model, cfg, name)
    randomize_lora(model)
    return model


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = _trained()
    path = tmp_path / "e2e.safetensors"
    assert lora.save_adapter(path, model, "e2e") == str(path)
    assert os.listdir(tmp_path) == ["e2e.safetensors"]  # the temp file was renamed, none left behind
    expected = {n: to_np(a).copy() for n, a in lora.lora_state_dict(model, "e2e").items()}
    assert lora.adapter_nbytes(model, "e2e") == sum(a.nbytes for a in expected.values()) < os.path.getsize(path)
    fresh = tiny_gpt()  # the same base weights, no adapter
    assert lora.load_adapter(path, fresh) == "e2e"
    got = lora.lora_state_dict(fresh, "e2e")
    assert list(got) == list(expected)
    for n, array in expected.items():
        assert np.array_equal(to_np(got[n]), array) and got[n].dtype == array.dtype
    assert lora.get_adapter_config(fresh, "e2e") == CFG
    idx = ids_batch(2)
    assert np.array_equal(to_np(fresh(idx).data), to_np(model(idx).data))
    assert lora.load_adapter(path, fresh, adapter_name="again") == "again"  # under another name
    assert lora.list_adapters(fresh) == ["e2e", "again"]
    assert np.array_equal(to_np(fresh.blocks[1].attn.v.lora_B["again"].data), expected["blocks.1.attn.v.lora_B.e2e"])
    meta = _file_meta(path)
    assert meta["adapter_name"] == "e2e" and meta["config"] == CFG.to_dict() and meta["dtype"] == "float64"
    assert meta["minilora_version"] == ml.__version__


def _file_meta(path) -> dict:
    """The JSON metadata of a safetensors file, read by hand (8-byte header length, then the header)."""
    with open(path, "rb") as f:
        header = f.read(int.from_bytes(f.read(8), "little"))
    return json.loads(json.loads(header)["__metadata__"]["minilora"])


def _corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[:-9]
    elif how == "flipped data byte":
        data[-3] ^= 0xFF
    elif how == "garbage header":
        data[12:20] = b"\x00garbage"
    elif how == "empty":
        data = bytearray()
    elif how == "not safetensors":
        data = bytearray(b"PK\x03\x04 this is a zip file, not an adapter")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, message", [
    ("truncated", "not a readable safetensors file"),
    ("flipped data byte", "the tensor data is corrupt"),
    ("garbage header", "not a readable safetensors file"),
    ("empty", "not a readable safetensors file"),
    ("not safetensors", "not a readable safetensors file"),
])
def test_corrupt_file_raises_naming_it_and_leaves_the_model_untouched(tmp_path, how, message):
    path = tmp_path / "a.safetensors"
    lora.save_adapter(path, _trained(), "e2e")
    _corrupt(path, how)
    for target in (tiny_gpt(), _trained(name="e2e")):  # without and with the adapter already there
        before, adapters = snapshot(target), lora.list_adapters(target)
        with pytest.raises(lora.AdapterFileError, match=f"{path}: {message}"):
            lora.load_adapter(path, target)
        assert_same_params(target, before)
        assert lora.list_adapters(target) == adapters


def test_mismatched_file_raises_naming_the_first_mismatch(tmp_path):
    path = tmp_path / "a.safetensors"
    lora.save_adapter(path, _trained(), "e2e")
    cases = [
        (tiny_gpt(d=24), r"blocks\.0\.attn\.q\.lora_A\.e2e has shape \(2, 16\) in the file but the model expects \(2, 24\)"),
        (tiny_gpt("float32"), r"blocks\.0\.attn\.q\.lora_A\.e2e is float64 in the file but the model's is float32"),
        (_trained(cfg=lora.LoRAConfig(r=2, alpha=8, target_modules=("q", "v"))),
         r"adapter 'e2e' has a different config \(alpha: model 8\.0, file 4\.0\)"),
        (_trained(cfg=lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v")), name="other"), None),  # fits: loads
    ]
    for model, message in cases:
        before, adapters = snapshot(model), lora.list_adapters(model)
        if message is None:
            lora.load_adapter(path, model)
            continue
        with pytest.raises(lora.AdapterFileError, match=f"{path}: .*" + message):
            lora.load_adapter(path, model)
        assert_same_params(model, before)
        assert lora.list_adapters(model) == adapters
    # a file whose tensors do not match the model's adapter of the same config (missing layer)
    model = tiny_gpt()
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v")), "e2e")
    lora.delete_adapter(model, "e2e")
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v", "k")), "x")
    arrays = {n: to_np(a) for n, a in lora.lora_state_dict(_trained(), "e2e").items()}
    del arrays["blocks.1.attn.v.lora_B.e2e"]
    from safetensors.numpy import save_file

    meta = _file_meta(path)
    from minilora.io import digest

    meta["sha256"] = digest(arrays, meta)  # a well-formed file (the SHA-256 covers tensors and metadata)
    save_file(arrays, str(path), metadata={"minilora": json.dumps(meta)})
    before = snapshot(model)
    with pytest.raises(lora.AdapterFileError, match=rf"{path}: the model expects blocks\.1\.attn\.v\.lora_B\.e2e \(16, 2\)"):
        lora.load_adapter(path, model)
    assert_same_params(model, before)


def test_load_rejects_files_that_are_not_adapters(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": np.zeros(3)}, str(path))
    with pytest.raises(lora.AdapterFileError, match=f"{path}: no minilora metadata"):
        lora.load_adapter(path, tiny_gpt())
    save_file({"w": np.zeros(3)}, str(path), metadata={"minilora": json.dumps({"format": "minilora-model"})})
    with pytest.raises(lora.AdapterFileError, match=f"{path}: not a LoRA adapter file"):
        lora.load_adapter(path, tiny_gpt())
    with pytest.raises(lora.AdapterFileError, match="no such file"):
        lora.load_adapter(tmp_path / "missing.safetensors", tiny_gpt())


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    lora.save_adapter(path, _trained(), "e2e")
    good = path.read_bytes()

    def broken(fd):  # the new bytes are in the temp file, the rename has not happened
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        lora.save_adapter(path, _trained(), "e2e")
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["a.safetensors"]


def test_adapter_with_trained_biases_round_trips(tmp_path):
    model = _trained(cfg=lora.LoRAConfig(r=2, alpha=4, target_modules=("q",), bias="lora_only"))
    assert "blocks.0.attn.q.lora_bias.e2e" in lora.lora_state_dict(model, "e2e")  # the adapter's own Δb
    model.blocks[0].attn.q.lora_bias["e2e"].data[...] = 0.5
    path = tmp_path / "b.safetensors"
    lora.save_adapter(path, model, "e2e")
    fresh = tiny_gpt()
    lora.load_adapter(path, fresh)
    assert np.array_equal(to_np(fresh.blocks[0].attn.q.lora_bias["e2e"].data),
                          to_np(model.blocks[0].attn.q.lora_bias["e2e"].data))
    assert np.array_equal(to_np(fresh.blocks[0].attn.q.bias.data), to_np(tiny_gpt().blocks[0].attn.q.bias.data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idx = ids_batch(2)
        assert np.array_equal(to_np(fresh(idx).data), to_np(model(idx).data))


# ----------------------------------------------------------------------------- loads and changes while merged
def _q_v_trained(seed=0):
    model = tiny_gpt("float32", seed=seed)
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v")))
    rng = np.random.default_rng(4)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data[...] = (0.5 * rng.standard_normal(p.shape)).astype(np.float32)
    lora.mark_only_lora_as_trainable(model)
    return model.eval()


@pytest.mark.parametrize("keep_original", [True, False])
def test_load_checkpoint_and_load_state_dict_refuse_a_merged_model(tmp_path, keep_original):
    from minilora.train import load_checkpoint, save_checkpoint

    model = _q_v_trained()
    save_checkpoint(tmp_path / "c.safetensors", model)
    lora.merge(model, keep_original=keep_original)
    before = {n: to_np(a).copy() for n, a in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"c\.safetensors: blocks\.0\.attn\.q: cannot load lora_A\.default while "
                                           r"adapters \['default'\] are merged"):
        load_checkpoint(tmp_path / "c.safetensors", model)
    other = tiny_gpt("float32", seed=3).state_dict()
    with pytest.raises(RuntimeError, match="cannot load weight while adapters .* call lora.unmerge"):
        model.load_state_dict(other, strict=False)
    assert all(np.array_equal(to_np(a), before[n]) for n, a in model.state_dict().items())
    model.load_state_dict({"wte.weight": other["wte.weight"]}, strict=False)  # outside the merged layers: allowed
    lora.unmerge(model)
    with pytest.raises(ValueError, match="another base model: .* frozen parameters differ .*wte.weight"):
        load_checkpoint(tmp_path / "c.safetensors", model)  # the checkpoint knows its base
    model.load_state_dict({"wte.weight": before["wte.weight"]}, strict=False)
    # without a copy, unmerge gives W0 back to 1 ulp only, which the fingerprint sees as another W0
    load_checkpoint(tmp_path / "c.safetensors", model, check_base=keep_original)


@pytest.mark.parametrize("keep_original", [True, False])
def test_unmerge_keeps_a_change_made_to_the_merged_weights_in_every_layer_and_says_how_large(keep_original):
    model = _q_v_trained()
    W0 = {n: to_np(a).astype(np.float64) for n, a in model.state_dict().items() if n.endswith(".weight")}
    lora.merge(model, keep_original=keep_original)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an untouched merge unmerges silently, bit-exact with the copy
        lora.unmerge(model)
    if keep_original:
        assert all(np.array_equal(to_np(model.state_dict()[n]), W0[n]) for n in W0)
    lora.merge(model, keep_original=keep_original)
    step = {n: 0.25 * np.sign(np.random.default_rng(len(n)).standard_normal(W0[n].shape)) for n in W0}
    params = dict(model.named_parameters())
    for n in W0:  # what training the merged base would do: every weight moves, merged (q, v) or not (k, o, ...)
        params[n].data[...] += step[n].astype(np.float32)
    with pytest.warns(lora.MergedWeightChangedWarning) as record:
        lora.unmerge(model)
    messages = [str(w.message) for w in record]
    assert len(messages) == 4 and all("changed after the merge" in m for m in messages)
    assert all(("max |change| 0.25" in m) == keep_original for m in messages)
    for n in W0:  # W0 + the change in every layer alike: the update is not thrown away in q and v only
        assert np.max(np.abs(to_np(model.state_dict()[n]) - (W0[n] + step[n]))) < 1e-5, n


def test_a_plain_adapter_is_refused_on_a_layer_whose_w0_is_a_pissa_residual():
    model = tiny_gpt("float32")
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q",), init="pissa"), "pissa")
    with pytest.raises(ValueError, match="residual of the PiSSA adapter 'pissa'.*lora.pissa_to_lora"):
        lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v")), "plain")
    assert lora.list_adapters(model) == ["pissa"]
    plain = lora.pissa_to_lora(model, "pissa")  # W0 restored: other adapters may join
    lora.apply_lora(plain, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v")), "plain")
