"""Specs of the variants beyond the paper: DoRA, PiSSA, rsLoRA, and LoRA over an NF4 base.

DoRA: h = m ⊙ (W₀ + s·B·A)x / ‖W₀ + s·B·A‖_row + b (Liu et al. 2024). Its fused op is checked
against central differences (float64, every input) and against autograd through primitives
(exact and detached norm); a fresh DoRA adapter is bit-equal to the base, merged == unmerged,
mixed batches == one adapter at a time, files round-trip exactly. PiSSA: the top-r SVD start,
the residual base, and the rank-2r conversion. NF4: LoRA over a 4-bit base equals LoRA over the
dequantized base, with no gradient for W₀.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from conftest import assert_close, to_np
from hypothesis import given
from hypothesis import strategies as st
from lora_helpers import assert_mixed_batch_equals_each_adapter_alone, ids_batch, tiny_gpt, train_steps

import minilora as ml
from minilora import backend as bk
from minilora import functional as F
from minilora import lora, nn, quant
from minilora.lora.dora import dora_norms


def T(a, grad=True):
    return None if a is None else ml.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad, dtype="float64")


@st.composite
def dora_cases(draw, max_side=5):
    """(x, W, b, A, B, m, s, weight_trainable): rows of W have norms in [1, 2] and B is small, so that
    ‖W₀ + s·B·A‖ stays away from 0 (the norm's kink) — the domain restriction lives here."""
    d, k = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    r = draw(st.integers(1, min(d, k)))
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    W = rng.standard_normal((d, k))
    W *= rng.uniform(1.0, 2.0, (d, 1)) / np.linalg.norm(W, axis=1, keepdims=True)
    s = draw(st.floats(0.25, 4.0)) / r
    A, Bm = rng.standard_normal((r, k)) * 0.5, rng.standard_normal((d, r)) * 0.3 / max(1.0, s)
    b = rng.standard_normal(d) if draw(st.booleans()) else None
    m = rng.uniform(0.5, 2.0, d)
    return rng.standard_normal(batch + (k,)), W, b, A, Bm, m, s, draw(st.booleans())


def primitive_dora(x, W, b, A, Bm, m, s, detach=False, x_adapter=None):
    """DoRA through primitive ops only, in PEFT's form (the base path sees x, DoRA's terms x̃)."""
    V = W + (Bm @ A) * s  # (d, k)
    norms = ((V * V).sum(axis=1, keepdims=True)) ** 0.5  # (d, 1)
    if detach:
        norms = norms.detach()
    c = m.reshape(-1, 1) / norms  # (d, 1)
    x_adapter = x if x_adapter is None else x_adapter
    h = x @ W.swapaxes(-1, -2) + x_adapter @ (V * c - W).swapaxes(-1, -2)
    return h if b is None else h + b


# ============================================================================ the DoRA op
@given(dora_cases(), st.sampled_from([0.0, 0.4]))
def test_dora_linear_gradcheck(backend, case, p):
    """Every input: x, A, B, m, and W₀, b when trainable; with dropout the mask is reseeded per call."""
    x, W, b, A, Bm, m, s, trainable = case

    def fn(*t):
        ml.manual_seed(11)
        return lora.dora_linear(*t, s, dropout=p, training=True)

    inputs = [T(x), T(W, trainable), T(b, trainable), T(A), T(Bm), T(m)]
    assert ml.gradcheck(fn, inputs, atol=1e-7, rtol=1e-6)


@given(dora_cases(), st.sampled_from([0.0, 0.3]), st.booleans())
def test_dora_fused_backward_equals_autograd_through_primitives(backend, case, p, detach):
    """The exact gradient, and with detach_norm the gradient that treats ‖V‖ as a constant (PEFT's)."""
    x, W, b, A, Bm, m, s, trainable = case
    g = np.random.default_rng(0).standard_normal(x.shape[:-1] + (W.shape[0],))
    results = []
    for fused in (True, False):
        inputs = [T(x), T(W, trainable), T(b, trainable), T(A), T(Bm), T(m)]
        ml.manual_seed(7)  # the same dropout mask for both
        if fused:
            h = lora.dora_linear(*inputs, s, dropout=p, training=True, detach_norm=detach)
        else:
            xi, Wi, bi, Ai, Bi, mi = inputs
            h = primitive_dora(xi, Wi, bi, Ai, Bi, mi, s, detach, x_adapter=F.dropout(xi, p, True))
        h.backward(bk.asarray(g))
        results.append((to_np(h.data), [None if t is None or t.grad is None else to_np(t.grad) for t in inputs]))
    (h1, g1), (h2, g2) = results
    assert_close(h1, h2, rtol=1e-12, atol=1e-12)
    for name, a, bb in zip(["x", "W", "b", "A", "B", "m"], g1, g2):
        assert (a is None) == (bb is None), name
        if a is not None:
            assert_close(a, bb, rtol=1e-10, atol=1e-10, what=name)


@given(dora_cases())
def test_dora_norms_without_forming_the_adapted_matrix(case):
    _, W, _, A, Bm, _, s, _ = case
    norms, w0_At, gram = dora_norms(W, A, Bm, s)
    np.testing.assert_allclose(norms, np.linalg.norm(W + s * Bm @ A, axis=1), rtol=1e-12)
    np.testing.assert_allclose(w0_At, W @ A.T, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gram, A @ A.T, rtol=1e-12, atol=1e-14)


def test_dora_linear_rejects_a_bad_magnitude():
    with pytest.raises(ValueError, match=r"needs \(3,\)"):
        lora.dora_linear(T(np.ones((2, 4))), T(np.ones((3, 4))), None, T(np.ones((1, 4))), T(np.ones((3, 1))),
                         T(np.ones(4)), 1.0)


# ---------------------------------------------------------------------------- mixed op with DoRA groups
@st.composite
def mixed_dora_cases(draw):
    x, W, b, A, Bm, m, s, _ = draw(dora_cases())
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    d, k = W.shape
    r2 = draw(st.integers(1, min(d, k)))
    A2, B2 = rng.standard_normal((r2, k)), rng.standard_normal((d, r2))
    rows = 4
    x = rng.standard_normal((rows, 2, k))
    ids = draw(st.lists(st.sampled_from(["dora", "lora", "__base__"]), min_size=rows, max_size=rows))
    return x, W, b, (A, A2), (Bm, B2), m, (s, 0.7), ids, draw(st.booleans())


def _mixed_dora(inputs, ids, scalings, detach):
    xt, Wt, bt, A1, A2, B1, B2, mt = inputs
    groups = lora.group_rows(ids, bk.get_backend())
    params = {"dora": (A1, B1, mt, scalings[0]), "lora": (A2, B2, None, scalings[1])}
    chosen = [params[n] for n in groups.names]
    return lora.mixed_lora_linear(xt, Wt, bt, [c[0] for c in chosen], [c[1] for c in chosen],
                                  [c[3] for c in chosen], groups.selectors, magnitudes=[c[2] for c in chosen],
                                  detach_norms=[detach] * len(chosen))


@given(mixed_dora_cases())
def test_mixed_op_with_dora_groups_gradcheck(backend, case):
    x, W, b, As, Bs, m, scalings, ids, _ = case
    inputs = [T(x), T(W), T(b), T(As[0]), T(As[1]), T(Bs[0]), T(Bs[1]), T(m)]
    assert ml.gradcheck(lambda *t: _mixed_dora(t, ids, scalings, False), inputs, atol=1e-7, rtol=1e-6)


@given(mixed_dora_cases())
def test_mixed_op_with_dora_equals_each_row_alone(backend, case):
    x, W, b, As, Bs, m, scalings, ids, detach = case
    inputs = [T(x), T(W, False), T(b, False), T(As[0]), T(As[1]), T(Bs[0]), T(Bs[1]), T(m)]
    out = _mixed_dora(inputs, ids, scalings, detach)
    g = np.random.default_rng(5).standard_normal(out.shape)
    out.backward(bk.asarray(g))
    mixed_grads = [None if t is None or t.grad is None else to_np(t.grad).copy() for t in inputs]
    for t in inputs:
        if t is not None:
            t.grad = None
    for i, name in enumerate(ids):
        xi = inputs[0][i:i + 1]
        if name == "__base__":
            ref = F.linear(xi, inputs[1], inputs[2])
        elif name == "dora":
            ref = lora.dora_linear(xi, inputs[1], inputs[2], inputs[3], inputs[5], inputs[7], scalings[0],
                                   detach_norm=detach)
        else:
            ref = lora.lora_linear(xi, inputs[1], inputs[2], inputs[4], inputs[6], scalings[1])
        assert_close(out.data[i:i + 1], ref.data, rtol=1e-12, atol=1e-12, what=f"row {i} ({name})")
        ref.backward(bk.asarray(g[i:i + 1]))
    for name, mixed, t in zip(["x", "W", "b", "A1", "A2", "B1", "B2", "m"], mixed_grads, inputs):
        separate = None if t is None or t.grad is None else to_np(t.grad)
        if mixed is None or separate is None:
            assert mixed is None or not np.any(mixed), name  # a group with no rows gets no (or zero) gradient
            continue
        assert_close(mixed, separate, rtol=1e-10, atol=1e-12, what=name)


# ============================================================================ DoRA in a model
def perturb(model, names=None, scale=0.1, seed=1):
    """A fresh adapter hides bugs (B = 0, m = ‖W₀‖): move every trainable parameter a little."""
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters(trainable_only=True):
        if names is None or any(f".{n}" in name for n in names):
            p.data[...] += bk.asarray(rng.standard_normal(p.shape) * scale, dtype=p.dtype, backend=p.backend)


DORA = lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v", "fc"), use_dora=True)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("detach", [False, True])
def test_fresh_dora_is_bit_equal_to_the_base(backend, dtype, detach):
    model, base = tiny_gpt(dtype), tiny_gpt(dtype)
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v", "fc"), use_dora=True,
                                           dora_detach_norm=detach, dropout=0.1))
    model.eval()
    idx = ids_batch(3)
    assert np.array_equal(to_np(model(idx).data), to_np(base(idx).data))
    layer = dict(lora.lora_layers(model))["blocks.0.attn.q"]
    magnitude = to_np(layer.lora_magnitude["default"].data)
    assert magnitude.shape == (16,) and magnitude.dtype == np.dtype(dtype)
    np.testing.assert_allclose(magnitude, np.linalg.norm(to_np(layer.weight.data), axis=1), rtol=1e-6)
    names = [n for n, _ in model.named_parameters()]
    assert "blocks.0.attn.q.lora_magnitude.default" in names


def test_dora_trainable_parameters_and_names():
    model = tiny_gpt()
    lora.apply_lora(model, DORA)
    lora.mark_only_lora_as_trainable(model)
    summary = lora.trainable_summary(model)
    # per adapted layer: r·k + d·r + d (the magnitude); q, v: 16×16, fc: 64×16, two blocks
    assert summary["trainable"] == 2 * (2 * (2 * 16 + 16 * 2 + 16) + (2 * 16 + 64 * 2 + 64))
    assert summary["lora"] == summary["trainable"]
    assert set(lora.lora_state_dict(model)) == {n for n, _ in model.named_parameters(trainable_only=True)}


@pytest.mark.parametrize("keep_original", [True, False])
def test_dora_merged_equals_unmerged_and_unmerge_restores(backend, keep_original):
    model = tiny_gpt()
    lora.apply_lora(model, DORA)
    lora.mark_only_lora_as_trainable(model)
    perturb(model)
    model.eval()
    idx = ids_batch(2)
    before = {n: to_np(p.data).copy() for n, p in model.named_parameters()}
    unmerged = to_np(model(idx).data)
    lora.merge(model, keep_original=keep_original)
    assert_close(model(idx).data, unmerged, rtol=1e-12, atol=1e-13)  # a plain matrix: F.linear
    layer = dict(lora.lora_layers(model))["blocks.0.attn.q"]
    np.testing.assert_allclose(np.linalg.norm(to_np(layer.weight.data), axis=1),
                               np.abs(to_np(layer.lora_magnitude["default"].data)), rtol=1e-12)  # ‖W′_i‖ = |m_i|
    lora.unmerge(model)
    for n, p in model.named_parameters():
        if keep_original:
            np.testing.assert_array_equal(to_np(p.data), before[n], err_msg=n)
        else:
            np.testing.assert_allclose(to_np(p.data), before[n], rtol=1e-13, atol=1e-14, err_msg=n)


def test_dora_merges_alone():
    model = tiny_gpt()
    lora.apply_lora(model, DORA, "d")
    lora.apply_lora(model, lora.LoRAConfig(r=1, alpha=1, target_modules=("q",)), "l", activate=False)
    lora.set_adapter(model, ["d", "l"])
    model.eval()
    with pytest.raises(RuntimeError, match="merges alone"):
        lora.merge(model)


def test_the_layer_asks_an_adapters_variant_for_its_forward_and_merge(monkeypatch):
    """A variant plugged into ``layer._VARIANTS`` gives the layer its forward, merge and unmerge.

    The toy variant flips the update's sign: h = W₀x + b − s·B·A·x, merged as W₀ − ΔW.
    """
    from minilora.lora import layer as layer_module
    from minilora.lora.variant import LoRAVariant

    class Flipped(LoRAVariant):
        def applies(self, config):
            return config.alpha == 3.0

        def linear(self, layer, x, name):
            cfg = layer.lora_config[name]
            return lora.lora_linear(x, layer.weight, layer.bias, layer.lora_A[name], layer.lora_B[name], -cfg.scaling)

        def merged_weight(self, layer, names, V):
            return 2.0 * layer.weight.data.astype(np.float64) - V  # W₀ − ΔW

        def unmerged_weight(self, layer, names, state):
            return layer.weight.data.astype(np.float64) + layer.delta_weight(names)

    monkeypatch.setattr(layer_module, "_VARIANTS", (Flipped(),) + layer_module._VARIANTS)
    model = tiny_gpt()
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=3.0, target_modules=("q",)), "flip")
    perturb(model)
    model.eval()
    idx = ids_batch(2)
    flipped = to_np(model(idx).data)
    with lora.disable_adapters(model):
        base = to_np(model(idx).data)
    layer = dict(lora.lora_layers(model))["blocks.0.attn.q"]
    weight = to_np(layer.weight.data).copy()
    x = np.random.default_rng(1).standard_normal((3, 16))
    update = x @ to_np(layer.delta_weight("flip")).T
    assert_close(layer(ml.tensor(x, dtype="float64")).data, x @ weight.T + to_np(layer.bias.data) - update,
                 rtol=1e-12, atol=1e-12)
    assert np.abs(flipped - base).max() > 1e-6
    lora.merge(model, keep_original=False)
    assert_close(model(idx).data, flipped, rtol=1e-10, atol=1e-11)
    lora.unmerge(model)
    np.testing.assert_allclose(to_np(layer.weight.data), weight, rtol=1e-13, atol=1e-14)


def test_dora_mixed_batch_equals_each_adapter_alone(backend):
    """DoRA, LoRA and base rows in one batch: forward and every gradient as one adapter at a time."""
    model = tiny_gpt()
    lora.apply_lora(model, DORA, "d")
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=2, target_modules=("q", "v")), "l")
    lora.apply_lora(model, lora.LoRAConfig(r=1, alpha=2, target_modules=("v",), use_dora=True,
                                           dora_detach_norm=True), "e")
    lora.mark_only_lora_as_trainable(model)
    perturb(model)
    assert_mixed_batch_equals_each_adapter_alone(model, ["d", "l", "__base__", "e", "d", "l"])


def test_dora_save_load_is_exact(tmp_path):
    model = tiny_gpt()
    lora.apply_lora(model, DORA, "d")
    lora.mark_only_lora_as_trainable(model)
    perturb(model)
    model.eval()
    path = lora.save_adapter(tmp_path / "d.safetensors", model, "d")
    fresh = tiny_gpt()
    assert lora.load_adapter(path, fresh) == "d"
    fresh.eval()
    idx = ids_batch(2)
    np.testing.assert_array_equal(to_np(fresh(idx).data), to_np(model(idx).data))
    state = lora.lora_state_dict(fresh, "d")
    assert "blocks.1.mlp.fc.lora_magnitude.d" in state and lora.get_adapter_config(fresh, "d").use_dora
    plain = tiny_gpt()
    lora.apply_lora(plain, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v", "fc")), "d")  # not DoRA
    with pytest.raises(lora.AdapterFileError, match="use_dora"):
        lora.load_adapter(path, plain)


def test_dora_trains_and_all_bias_modes_work():
    """A few AdamW steps lower the loss; the biases that a bias mode trains get their gradients."""
    for bias in ("none", "all", "lora_only"):
        model = tiny_gpt()
        lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v"), use_dora=True, bias=bias))
        lora.mark_only_lora_as_trainable(model)
        losses, opt = train_steps(model)
        assert losses[-1] < losses[0] - 0.05, (bias, losses)
        assert any(".lora_bias." in n for n in opt.names) == (bias != "none")  # the adapter's own bias deltas


# ============================================================================ PiSSA
PISSA = lora.LoRAConfig(r=3, alpha=6, target_modules=("q", "v", "fc"), init="pissa")


@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_starts_at_the_top_r_svd_and_equals_the_base(backend, use_rslora):
    model, base = tiny_gpt(), tiny_gpt()
    cfg = lora.LoRAConfig(r=3, alpha=6, target_modules=("q", "v", "fc"), init="pissa", use_rslora=use_rslora)
    lora.apply_lora(model, cfg)
    idx = ids_batch(3)
    reference = to_np(base(idx).data)
    assert_close(model(idx).data, reference, rtol=1e-12, atol=1e-12 * np.abs(reference).max())
    W0 = to_np(dict(base.named_parameters())["blocks.1.mlp.fc.weight"].data)
    layer = dict(lora.lora_layers(model))["blocks.1.mlp.fc"]
    A, Bm, s = to_np(layer.lora_A["default"].data), to_np(layer.lora_B["default"].data), cfg.scaling
    U, S, Vt = np.linalg.svd(W0, full_matrices=False)
    np.testing.assert_allclose(s * Bm @ A, (U[:, :3] * S[:3]) @ Vt[:3], atol=1e-12)  # s·B·A = top-r part
    np.testing.assert_allclose(np.linalg.svd(to_np(layer.weight.data), compute_uv=False)[: S.size - 3], S[3:],
                               atol=1e-12)  # the residual keeps the other singular values
    np.testing.assert_allclose(np.linalg.norm(A, axis=1), np.sqrt(S[:3] / s), rtol=1e-12)  # A = √(S_r/s)·V_rᵀ
    np.testing.assert_allclose(np.linalg.norm(Bm, axis=0), np.sqrt(S[:3] / s), rtol=1e-12)  # B = U_r·√(S_r/s)


def test_pissa_in_float32_starts_at_the_base_to_rounding():
    model, base = tiny_gpt("float32"), tiny_gpt("float32")
    lora.apply_lora(model, PISSA)
    idx = ids_batch(3)
    out, ref = to_np(model(idx).data), to_np(base(idx).data)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()  # W_res + s·B·A rounds differently from W₀


def test_pissa_and_dora_together_start_at_the_base():
    model, base = tiny_gpt(), tiny_gpt()
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q",), init="pissa", use_dora=True))
    idx = ids_batch(2)
    assert_close(model(idx).data, base(idx).data, rtol=1e-12, atol=1e-12)


def test_pissa_adapter_file_loads_into_the_original_base(tmp_path):
    model = tiny_gpt()
    lora.apply_lora(model, PISSA)
    lora.mark_only_lora_as_trainable(model)
    perturb(model)
    path = lora.save_adapter(tmp_path / "p.safetensors", model, "default")
    fresh = tiny_gpt()  # the original W₀: load_adapter re-runs the SVD, which gives the same residual
    lora.load_adapter(path, fresh)
    idx = ids_batch(2)
    np.testing.assert_array_equal(to_np(fresh(idx).data), to_np(model(idx).data))


@pytest.mark.parametrize(("use_rslora", "use_dora"), [(False, False), (True, False), (False, True)])
def test_pissa_to_lora_is_a_rank_2r_lora_on_the_original_weights(tmp_path, use_rslora, use_dora):
    model, original = tiny_gpt(), tiny_gpt()
    cfg = lora.LoRAConfig(r=3, alpha=6, target_modules=("q", "v", "fc"), init="pissa", use_rslora=use_rslora,
                          use_dora=use_dora)
    lora.apply_lora(model, cfg)
    lora.mark_only_lora_as_trainable(model)
    perturb(model)
    idx = ids_batch(3)
    trained = to_np(model(idx).data)
    plain = lora.pissa_to_lora(model, "default")
    converted = lora.get_adapter_config(plain, "default")
    assert converted.r == 6 and converted.init == "kaiming" and converted.use_dora == use_dora
    assert converted.alpha == (6 * math.sqrt(2) if use_rslora else 12.0)
    assert converted.scaling == pytest.approx(cfg.scaling, rel=1e-15)
    assert_close(plain(idx).data, trained, rtol=1e-12, atol=1e-12)
    for name, p in original.named_parameters():  # W₀ is back, exactly
        np.testing.assert_array_equal(to_np(dict(plain.named_parameters())[name].data), to_np(p.data))
    path = lora.save_adapter(tmp_path / "plain.safetensors", plain, "default")
    lora.load_adapter(path, original)  # a plain LoRA now: W₀ is not touched
    assert_close(original(idx).data, trained, rtol=1e-12, atol=1e-12)
    assert lora.get_adapter_config(model, "default").init == "pissa"  # the PiSSA model itself is unchanged


def test_pissa_refuses_clearly():
    model = tiny_gpt()
    with pytest.raises(ValueError, match=r"r=17 is larger than min\(d, k\) = 16"):
        lora.apply_lora(model, lora.LoRAConfig(r=17, alpha=1, target_modules=("q",), init="pissa"))
    lora.apply_lora(model, lora.LoRAConfig(r=1, alpha=1, target_modules=("q",)), "first")
    with pytest.raises(ValueError, match="would change what the adapters"):
        lora.apply_lora(model, lora.LoRAConfig(r=1, alpha=1, target_modules=("q",), init="pissa"), "second")
    with pytest.raises(ValueError, match="not 'pissa'"):
        lora.pissa_to_lora(model, "first")
    with pytest.raises(ValueError, match="dora_detach_norm=True only means something for DoRA"):
        lora.LoRAConfig(r=1, alpha=1, target_modules=("q",), dora_detach_norm=True)
    with pytest.raises(ValueError, match="use_dora must be True or False"):
        lora.LoRAConfig(r=1, alpha=1, target_modules=("q",), use_dora="yes")


# ============================================================================ rsLoRA
@pytest.mark.parametrize("r", [1, 4, 16])
def test_rslora_scaling_is_alpha_over_sqrt_r(r):
    assert lora.LoRAConfig(r=r, alpha=8, target_modules=("q",), use_rslora=True).scaling == 8 / math.sqrt(r)
    assert lora.LoRAConfig(r=r, alpha=8, target_modules=("q",)).scaling == 8 / r


# ============================================================================ LoRA over an NF4 base
def quantized_pair(cfg, dtype="float64", block_size=16):
    """(model with an NF4 base, model with the dequantized base as ordinary float weights), same adapters."""
    model = tiny_gpt(dtype)
    lora.apply_lora(model, cfg)
    lora.mark_only_lora_as_trainable(model)
    perturb(model)
    reference = copy.deepcopy(model)
    lora.quantize_base(model, "nf4", block_size=block_size)
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, lora.QuantizedWeight):
            target = dict(reference.named_modules())[path]
            target.weight.data[...] = weight.dequantize()
        elif isinstance(module, lora.NF4Linear):
            dict(reference.named_modules())[path].weight.data[...] = module.qweight.dequantize()
    return model, reference


@pytest.mark.parametrize("cfg", [lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v")), DORA],
                         ids=["lora", "dora"])
def test_lora_on_an_nf4_base_equals_lora_on_the_dequantized_base(cfg):
    model, reference = quantized_pair(cfg)
    idx = ids_batch(3)
    loss = model.loss(idx[:, :-1], idx[:, 1:])
    ref_loss = reference.loss(idx[:, :-1], idx[:, 1:])
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    loss.backward()
    ref_loss.backward()
    ref_params = dict(reference.named_parameters())
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(lora.lora_parameter_names(model))  # A, B (m): no gradient for W₀
    for n, g in grads.items():
        assert_close(g, ref_params[n].grad, rtol=1e-9, atol=1e-12, what=n)
    assert not any(isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.requires_grad
                   for _, m in model.named_modules() if isinstance(m, lora.LoRALinear))


def test_lora_layer_over_nf4_gradcheck_and_mixed_batch():
    model, reference = quantized_pair(lora.LoRAConfig(r=2, alpha=4, target_modules=("q",)), block_size=8)
    lora.apply_lora(model, lora.LoRAConfig(r=1, alpha=2, target_modules=("q",), use_dora=True), "d")
    lora.apply_lora(reference, lora.LoRAConfig(r=1, alpha=2, target_modules=("q",), use_dora=True), "d")
    layer = dict(lora.lora_layers(model))["blocks.0.attn.q"]
    x = T(np.random.default_rng(0).standard_normal((2, 3, 16)))
    A, Bm = layer.lora_A["default"], layer.lora_B["default"]
    A.requires_grad = Bm.requires_grad = True
    fn = lora.lora_linear
    assert ml.gradcheck(lambda x, A, Bm: fn(x, layer.weight, layer.bias, A, Bm, 2.0), [x, A, Bm], atol=1e-7, rtol=1e-6)
    ids = ["default", "d", "__base__"]
    idx = ids_batch(3)
    with lora.mixed_batch(model, ids):
        out = model(idx)
    with lora.mixed_batch(reference, ids):
        ref = reference(idx)
    assert_close(out.data, ref.data, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="NF4"):
        model.eval()
        lora.merge(model)
    with pytest.raises(ValueError, match="before lora.quantize_base"):
        lora.apply_lora(model, lora.LoRAConfig(r=1, alpha=1, target_modules=("q",), init="pissa"), "p")


def test_nf4_base_keeps_the_adapters_bias_deltas():
    """bias="all" gives plain Linear layers a Δb child and hook; quantize_base must carry them over."""
    model, reference = quantized_pair(lora.LoRAConfig(r=2, alpha=4, target_modules=("q",), bias="all"))
    assert isinstance(dict(model.named_modules())["blocks.0.mlp.fc"], lora.NF4Linear)
    assert "blocks.0.mlp.fc.lora_bias.default" in dict(model.named_parameters())
    idx = ids_batch(2)
    assert_close(model(idx).data, reference(idx).data, rtol=1e-12, atol=1e-12)  # perturb() moved every Δb


def test_quantized_lora_model_trains_and_reports_memory():
    model = tiny_gpt("float32")
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v")))
    lora.mark_only_lora_as_trainable(model)
    report = lora.quantize_base(model, "nf4", block_size=16)
    n_linear = 2 * (4 * 16 * 16 + 2 * 64 * 16)
    assert report.values == n_linear and len(report.layers) == 12
    assert report.nf4_bytes == n_linear // 2 + 4 * n_linear // 16
    losses, _ = train_steps(model)
    assert losses[-1] < losses[0] - 0.05, losses
    saved = lora.lora_state_dict(model)
    assert all(".lora_" in n for n in saved)  # the adapter file is unchanged by the 4-bit base
    assert quant.NF4_LEVELS[0] == -1.0


# ============================================================================ tutorial 09's checks
def test_tutorial_09_checks_diagnose_wrong_answers():
    from minilora import exercises as ex

    def dm(x, W, A, B, m, grad_h, s):
        V = W + s * B @ A
        return (grad_h * (x @ V.T)).sum(axis=0) / np.linalg.norm(V, axis=1)

    def dm_without_the_norm(x, W, A, B, m, grad_h, s):
        V = W + s * B @ A
        return (grad_h * (x @ V.T)).sum(axis=0)

    assert ex.check_dora_dm(dm) is True
    with pytest.raises(ex.ExerciseError, match="times the row norms"):
        ex.check_dora_dm(dm_without_the_norm)

    def pissa_without_s(W, r, s):
        U, S, Vt = np.linalg.svd(W, full_matrices=False)
        A, B = np.sqrt(S[:r])[:, None] * Vt[:r], U[:, :r] * np.sqrt(S[:r])
        return A, B, W - B @ A

    with pytest.raises(ex.ExerciseError, match="divide the singular values by s"):
        ex.check_pissa_init(pissa_without_s)
    with pytest.raises(ex.ExerciseError, match="count whole blocks of codes"):
        ex.check_nf4_bytes(lambda n, block, dq: n // 2 + 4 * -(-n // block))
    assert ex.check_nf4_bytes(lambda n, block, dq: quant.quantize_nf4(np.ones(n), block, double_quant=dq).nbytes)
