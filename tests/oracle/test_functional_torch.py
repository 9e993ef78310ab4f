"""The fused composites against PyTorch: forward and every gradient, float64, rtol 1e-10.

The composites come from the ONE table in tests/test_functional.py (its ``torch_fn`` column):
F.linear, F.gelu(approximate="tanh"), F.layer_norm, softmax, log_softmax, F.cross_entropy
(reduction="mean", ignore_index, label_smoothing; with a 0/1 mask, the masked mean of
reduction="none"), F.embedding and F.scaled_dot_product_attention (is_causal=True when
Tq == Tk; with a KV cache, Tq < Tk, an explicit bottom-right mask, see below). Dropout has no
counterpart: PyTorch draws its masks from another generator.

Fixed cases then pin the conventions where the two libraries could differ: label smoothing
spreads ε over all V classes (the target included), ignored tokens leave the mean's
denominator, and PyTorch's ``is_causal`` aligns the mask top-left while minilora's queries are
the LAST positions of the keys.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="PyTorch oracle not installed: pip install torch==2.13.0")

from test_functional import FUSED, FUSED_BY_NAME, IGNORE, causal_additive_mask

from oracle.test_ops_torch import _assert_equal_to_torch  # one comparison rule for every oracle

import minilora as ml
from minilora import backend as bk
from minilora import functional as F

RTOL = 1e-10
WITH_TORCH = [spec for spec in FUSED if spec.torch_fn is not None]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation (50 ms a call on a busy 2-core box)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- running both engines
def _run_minilora(fn, arrays_, params, upstream):
    inputs = [ml.tensor(a, requires_grad=True, backend="numpy") for a in arrays_]
    out = fn(*inputs, **params)
    out.backward(upstream)
    return bk.to_numpy(out.data), [None if x.grad is None else bk.to_numpy(x.grad) for x in inputs]


def _run_torch(fn, arrays_, params, upstream):
    inputs = [torch.tensor(np.array(a, order="C"), dtype=torch.float64, requires_grad=True) for a in arrays_]
    out = fn(torch, *inputs, **params)
    out.backward(torch.as_tensor(upstream))
    return out.detach().numpy(), [None if x.grad is None else x.grad.numpy() for x in inputs]


def compare_with_torch(name, ours_fn, torch_fn, arrays_, params, seed=0):
    """Forward and the gradient of every input, minilora vs torch, for one random upstream gradient."""
    arrays_ = tuple(np.asarray(a, dtype=np.float64) for a in arrays_)
    with torch.no_grad():
        out_shape = tuple(torch_fn(torch, *[torch.as_tensor(np.array(a, order="C")) for a in arrays_], **params).shape)
    upstream = np.asarray(np.random.default_rng(seed).standard_normal(out_shape))
    ours_out, ours_grads = _run_minilora(ours_fn, arrays_, params, upstream)
    theirs_out, theirs_grads = _run_torch(torch_fn, arrays_, params, upstream)
    _assert_equal_to_torch(f"{name} output", ours_out, theirs_out)
    for i, (g, t) in enumerate(zip(ours_grads, theirs_grads)):
        _assert_equal_to_torch(f"{name} gradient of input {i}", g, t)
    return ours_out, ours_grads


# ----------------------------------------------------------------------------- each composite on drawn inputs
@pytest.mark.parametrize("spec", WITH_TORCH, ids=str)
@settings(max_examples=10)
@given(data=st.data())
def test_each_composite_matches_torch(spec, data):
    arrays_, params = data.draw(spec.cases, label="(inputs, params)")
    compare_with_torch(spec.name, spec.fused, spec.torch_fn, arrays_, params)


def test_every_composite_but_dropout_has_a_torch_counterpart():
    assert {spec.name for spec in FUSED if spec.torch_fn is None} == {"dropout[training]"}


# ----------------------------------------------------------------------------- conventions, pinned
def _ce(torch_, z, targets, **kw):
    return FUSED_BY_NAME["cross_entropy"].torch_fn(torch_, z, targets, **kw)


def test_label_smoothing_is_torch_definition_over_all_classes():
    """loss = (1 - ε)·(-ℓ_t) + ε·mean_v(-ℓ_v): ε/V goes to EVERY class, the target's included."""
    logits = np.array([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    targets = np.array([0, 3])
    eps = 0.1
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    by_hand = np.mean((1 - eps) * -logp[[0, 1], targets] + eps * -logp.mean(-1))
    out, _ = compare_with_torch(
        "cross_entropy[label_smoothing]",
        lambda z: F.cross_entropy(z, targets, label_smoothing=eps),
        lambda torch_, z: torch_.nn.functional.cross_entropy(z, torch_.as_tensor(targets), label_smoothing=eps),
        (logits,), {},
    )
    np.testing.assert_allclose(out, by_hand, rtol=1e-13)


def test_ignore_index_with_smoothing_divides_by_the_counted_tokens_as_torch_does():
    logits = np.random.default_rng(4).standard_normal((2, 3, 5))
    targets = np.array([[1, IGNORE, 4], [IGNORE, 0, 2]])
    compare_with_torch(
        "cross_entropy[ignore_index+label_smoothing]",
        lambda z: F.cross_entropy(z, targets, ignore_index=IGNORE, label_smoothing=0.2),
        lambda torch_, z: torch_.nn.functional.cross_entropy(
            z.reshape(-1, 5), torch_.as_tensor(targets.reshape(-1)), ignore_index=IGNORE, label_smoothing=0.2),
        (logits,), {},
    )


def test_a_0_1_mask_equals_ignore_index_on_the_same_positions():
    """The prompt mask of eq. 2 and PyTorch's ignore_index are two spellings of one loss."""
    logits = np.random.default_rng(5).standard_normal((2, 4, 6))
    targets = np.array([[1, 2, 3, 4], [5, 0, 1, 2]])
    mask = np.array([[0, 0, 1, 1], [0, 1, 1, 1]])
    compare_with_torch(
        "cross_entropy[mask] vs torch ignore_index",
        lambda z: F.cross_entropy(z, targets, mask=mask),
        lambda torch_, z: torch_.nn.functional.cross_entropy(
            z.reshape(-1, 6), torch_.as_tensor(np.where(mask == 1, targets, IGNORE).reshape(-1)), ignore_index=IGNORE),
        (logits,), {},
    )


@pytest.mark.parametrize("t", [1, 4])
def test_causal_attention_equals_torch_is_causal_when_tq_equals_tk(t):
    rng = np.random.default_rng(6)
    q, k, v = rng.standard_normal((2, 3, t, 4)), rng.standard_normal((2, 3, t, 4)), rng.standard_normal((2, 3, t, 2))
    compare_with_torch(
        "attention[causal]",
        lambda *x: F.scaled_dot_product_attention(*x, causal=True),
        lambda torch_, *x: torch_.nn.functional.scaled_dot_product_attention(*x, is_causal=True),
        (q, k, v), {},
    )


def test_with_fewer_queries_the_causal_mask_is_bottom_right_unlike_torch_is_causal():
    """A KV cache: the 2 queries are positions 3 and 4 of 5 keys. minilora aligns the mask
    bottom-right (query i sees keys 0..3+i), which is PyTorch with an explicit mask; PyTorch's
    ``is_causal=True`` aligns it top-left (query i sees keys 0..i) and so differs."""
    rng = np.random.default_rng(7)
    q, k, v = rng.standard_normal((1, 2, 3)), rng.standard_normal((1, 5, 3)), rng.standard_normal((1, 5, 3))
    allowed = torch.as_tensor(causal_additive_mask(2, 5) == 0.0)
    assert allowed.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    ours, _ = compare_with_torch(
        "attention[causal,Tq<Tk]",
        lambda *x: F.scaled_dot_product_attention(*x, causal=True),
        lambda torch_, *x: torch_.nn.functional.scaled_dot_product_attention(*x, attn_mask=allowed),
        (q, k, v), {},
    )
    top_left = torch.nn.functional.scaled_dot_product_attention(*map(torch.as_tensor, (q, k, v)), is_causal=True)
    assert not np.allclose(ours, top_left.numpy())
