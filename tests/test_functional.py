"""Every fused composite of ``minilora.functional``, specified ONCE, checked on every backend.

The table ``FUSED`` holds one ``FusedSpec`` per composite (or per variant that matters: with and
without bias, causal attention with fewer queries than keys, cross-entropy with a mask...). Each
spec says four things about one op:

- ``fused``: the call under test, ONE Function with a hand-written backward;
- ``composed``: the same function written with minilora PRIMITIVES only (Tensor operators, exp,
  log, tanh, sum, max, mean, getitem...), whose gradient autograd derives: the backward reference;
- ``reference``: a plain NumPy forward;
- ``cases``: the hypothesis strategy drawing ``(arrays, params)``; ``arrays`` are the float64
  inputs that require grad, ``params`` the constants (targets, masks, ids, axis, eps, seed...).

``torch_fn`` is the PyTorch counterpart, used by tests/oracle/test_functional_torch.py.

Four tests run over the table on each backend (STYLE.md rules 4, 5 and 8): the forward equals
NumPy; the fused backward equals autograd through the primitives (rtol 1e-10); ``ml.gradcheck``
accepts the fused op in float64; float32 in gives float32 out and float32 gradients. The rest of
the file checks what a table cannot: dropout statistics and seeding, embedding's two backward
paths, the causal offset, and bad inputs with their messages.
"""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from conftest import assert_close, to_np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from strategies import arrays, reals, shapes
from test_ops import make_inputs, on_backend, upstream_for

import minilora as ml
from minilora import backend as bk
from minilora import functional as F

GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715
IGNORE = -100  # the conventional ignore_index (PyTorch's default)


@dataclass(frozen=True)
class FusedSpec:
    """One composite: ``fused(*tensors, **params)`` ≡ ``composed(*tensors, **params)`` ≡ ``reference(*arrays, **params)``."""

    name: str
    fused: Callable
    composed: Callable
    reference: Callable
    cases: st.SearchStrategy
    torch_fn: Callable | None = None  # torch_fn(torch, *torch_tensors, **params); None: no counterpart
    gradcheck_tolerances: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


# ============================================================================= input strategies
def leading(max_dims=2, max_side=3):
    """Leading batch dimensions: 0 to ``max_dims`` axes."""
    return shapes(0, max_dims, max_side=max_side)


@st.composite
def linear_case(draw, bias: bool):
    lead = draw(leading(max_dims=3))
    n_in, n_out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    x = draw(arrays(lead + (n_in,)))
    weight = draw(arrays((n_out, n_in)))
    return ((x, weight, draw(arrays((n_out,)))) if bias else (x, weight)), {}


@st.composite
def elementwise_case(draw, min_dims=1):
    # min_dims=1: a 0-d input breaks F.gelu (see test_gelu_of_a_0d_tensor below)
    return (draw(arrays(draw(shapes(min_dims, 3)), reals(-3.0, 3.0))),), {}


@st.composite
def spread_rows(draw, shape):
    """Rows with variance >= 0.6: a permuted ramp ±1.5 plus a small drawn part.

    LayerNorm divides by the row's standard deviation; a row of (nearly) equal values makes
    the gradient huge and finite differences meaningless. The domain lives here, in the strategy.
    """
    n = shape[-1]
    ramp = np.linspace(-1.5, 1.5, n) if n > 1 else np.zeros(1)
    perm = np.array(draw(st.permutations(range(n))))
    small = draw(arrays(shape, reals(-0.3, 0.3), layout=False))
    values = small + ramp[perm]
    return values if n > 1 else small


@st.composite
def layer_norm_case(draw, affine: bool):
    lead = draw(leading())
    n = draw(st.integers(2, 5))
    x = draw(spread_rows(lead + (n,)))
    if draw(st.booleans()) and x.ndim >= 2:
        x = np.asfortranarray(x)  # a non-contiguous layout too
    eps = draw(st.sampled_from([1e-5, 0.1]))
    inputs = (x, draw(arrays((n,), reals(0.5, 2.0))), draw(arrays((n,)))) if affine else (x,)
    return inputs, {"eps": eps}


@st.composite
def softmax_case(draw, last_axis: bool):
    shape = draw(shapes(1 if last_axis else 2, 3))
    axis = -1 if last_axis else draw(st.integers(-len(shape), len(shape) - 2))
    return (draw(arrays(shape)),), {"axis": axis}


@st.composite
def cross_entropy_case(draw, mask=False, ignore=False, smoothing=False):
    """Logits (..., V), integer targets (...); at least one position always counts."""
    lead = draw(leading())
    vocab = draw(st.integers(2, 5))
    logits = draw(arrays(lead + (vocab,), reals(-3.0, 3.0)))
    target_dtype = draw(st.sampled_from([np.int64, np.int32]))
    targets = draw(hnp.arrays(target_dtype, lead, elements=st.integers(0, vocab - 1)))
    n = targets.size
    keep = draw(st.integers(0, n - 1))  # this position counts whatever else is masked
    params = {"targets": targets}
    if mask:
        m = draw(hnp.arrays(np.bool_, lead, elements=st.booleans()))
        m.reshape(-1)[keep] = True
        params["mask"] = m.astype(draw(st.sampled_from([np.bool_, np.int64, np.float64])))
    if ignore:
        ignored = draw(hnp.arrays(np.bool_, lead, elements=st.booleans()))
        ignored.reshape(-1)[keep] = False
        params["targets"] = np.where(ignored, IGNORE, targets).astype(target_dtype)
        params["ignore_index"] = IGNORE
    if smoothing:
        params["label_smoothing"] = 0.1
    return (logits,), params


@st.composite
def embedding_case(draw):
    vocab, dim = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    id_shape = draw(shapes(0, 2, max_side=4))
    ids = draw(hnp.arrays(np.int64, id_shape, elements=st.integers(0, vocab - 1)))
    if ids.size >= 2:
        ids.reshape(-1)[-1] = ids.reshape(-1)[0]  # always a repeated id: its gradients must add up
    return (draw(arrays((vocab, dim))),), {"ids": ids}


@st.composite
def dropout_case(draw):
    x = draw(arrays(draw(shapes(1, 3))))
    return (x,), {"p": draw(st.sampled_from([0.1, 0.5, 0.9])), "seed": draw(st.integers(0, 2**16))}


@st.composite
def attention_case(draw, causal: bool, fewer_queries: bool):
    """q (..., Tq, d), k (..., Tk, d), v (..., Tk, dv) with Tq == Tk or Tq < Tk (a KV cache)."""
    lead = draw(leading(max_side=2))
    t_key = draw(st.integers(2 if fewer_queries else 1, 4))
    t_query = draw(st.integers(1, t_key - 1)) if fewer_queries else t_key
    d, dv = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    q = draw(arrays(lead + (t_query, d)))
    k = draw(arrays(lead + (t_key, d)))
    v = draw(arrays(lead + (t_key, dv)))
    return (q, k, v), {"causal": causal}


# ============================================================================= the same functions from primitives
def const(array, like):
    """A constant (no gradient) on ``like``'s backend and float dtype."""
    return bk.asarray(np.asarray(array), dtype=like.dtype, backend=like.backend)


def linear_composed(x, weight, bias=None):
    y = x @ weight.swapaxes(-1, -2)
    return y if bias is None else y + bias


def gelu_composed(x):
    return 0.5 * x * (1.0 + ((x + GELU_A * x ** 3) * GELU_C).tanh())


def layer_norm_composed(x, weight=None, bias=None, eps=1e-5):
    centered = x - x.mean(axis=-1, keepdims=True)
    variance = (centered * centered).mean(axis=-1, keepdims=True)
    x_hat = centered / (variance + eps).sqrt()
    if weight is not None:
        x_hat = x_hat * weight
    return x_hat if bias is None else x_hat + bias


def softmax_composed(x, axis=-1):
    e = (x - x.max(axis=axis, keepdims=True)).exp()
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax_composed(x, axis=-1):
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - shifted.exp().sum(axis=axis, keepdims=True).log()


def counted_weights(targets, mask=None, ignore_index=None):
    """Host float64 weights of the positions that count (the y tokens of eq. 2)."""
    targets = to_np(targets)
    w = np.ones(targets.shape) if mask is None else to_np(mask).astype(np.float64)
    if ignore_index is not None:
        w = w * (targets != ignore_index)
    return w


def cross_entropy_composed(logits, targets, mask=None, ignore_index=None, label_smoothing=0.0):
    vocab = logits.shape[-1]
    w = counted_weights(targets, mask, ignore_index).reshape(-1)
    t = np.where(w != 0, to_np(targets).reshape(-1), 0)  # ignored positions may hold -100
    logp = log_softmax_composed(logits.reshape(-1, vocab), axis=-1)  # (N, V)
    rows = np.arange(t.size)
    key = (bk.asarray(rows, backend=logits.backend), bk.asarray(t, backend=logits.backend))
    nll = -logp[key]  # (N,)
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - (label_smoothing / vocab) * logp.sum(axis=-1)
    return (nll * const(w, logits)).sum() / float(w.sum())


def embedding_composed(weight, ids):
    return weight[ids]


def dropout_seeded(x, p, seed):
    """F.dropout in training mode, seeded before each call so that every call draws the same mask."""
    ml.manual_seed(seed)
    return F.dropout(x, p, training=True)


def dropout_composed(x, p, seed):
    ml.manual_seed(seed)  # the same seed gives the same mask as the fused call
    return x * F.dropout_mask(x.shape, p, x.dtype, backend=x.backend)


def causal_additive_mask(t_query, t_key):
    """0 where query i (at absolute position t_key - t_query + i) may see key j, -inf elsewhere."""
    allowed = np.arange(t_key)[None, :] <= np.arange(t_query)[:, None] + (t_key - t_query)
    return np.where(allowed, 0.0, -np.inf)


def attention_composed(q, k, v, causal=True):
    scores = (q @ k.swapaxes(-1, -2)) / math.sqrt(q.shape[-1])  # (..., Tq, Tk)
    if causal:
        scores = scores + const(causal_additive_mask(q.shape[-2], k.shape[-2]), scores)
    return softmax_composed(scores, axis=-1) @ v


# ============================================================================= NumPy forwards
def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_log_softmax(x, axis=-1):
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def np_linear(x, weight, bias=None):
    y = np.einsum("...i,oi->...o", x, weight)
    return y if bias is None else y + bias


def np_gelu(x):
    return 0.5 * x * (1.0 + np.tanh(GELU_C * (x + GELU_A * x ** 3)))


def np_layer_norm(x, weight=None, bias=None, eps=1e-5):
    x_hat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return x_hat * (1.0 if weight is None else weight) + (0.0 if bias is None else bias)


def np_cross_entropy(logits, targets, mask=None, ignore_index=None, label_smoothing=0.0):
    vocab = logits.shape[-1]
    w = counted_weights(targets, mask, ignore_index).reshape(-1)
    t = np.where(w != 0, np.asarray(targets).reshape(-1), 0)
    logp = np_log_softmax(logits.reshape(-1, vocab))
    q = (1.0 - label_smoothing) * np.eye(vocab)[t] + label_smoothing / vocab  # smoothed targets
    return np.asarray((-(q * logp).sum(-1) * w).sum() / w.sum())


def np_dropout(x, p, seed):
    ml.manual_seed(seed)
    return x * to_np(F.dropout_mask(x.shape, p, x.dtype))


def np_attention(q, k, v, causal=True):
    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores + causal_additive_mask(q.shape[-2], k.shape[-2])
    return np_softmax(scores) @ v


# ============================================================================= PyTorch counterparts (the oracle)
def torch_cross_entropy(torch, logits, targets, mask=None, ignore_index=None, label_smoothing=0.0):
    """F.cross_entropy, reduction="mean"; with a 0/1 mask, the masked mean of reduction="none".

    PyTorch smooths as minilora does: q = (1 - ε) onehot(t) + ε / V (ε spread over ALL V classes).
    """
    tf = torch.nn.functional
    vocab = logits.shape[-1]
    z = logits.reshape(-1, vocab)
    t = torch.as_tensor(np.asarray(targets, dtype=np.int64).reshape(-1))
    index = IGNORE if ignore_index is None else ignore_index
    if mask is None:
        return tf.cross_entropy(z, t, reduction="mean", ignore_index=index, label_smoothing=label_smoothing)
    per_token = tf.cross_entropy(z, t, reduction="none", ignore_index=index, label_smoothing=label_smoothing)
    w = torch.as_tensor(counted_weights(targets, mask, ignore_index).reshape(-1))
    return (per_token * w).sum() / w.sum()


def torch_attention(torch, q, k, v, causal=True):
    tf = torch.nn.functional
    t_query, t_key = q.shape[-2], k.shape[-2]
    if not causal:
        return tf.scaled_dot_product_attention(q, k, v)
    if t_query == t_key:
        return tf.scaled_dot_product_attention(q, k, v, is_causal=True)
    # is_causal aligns the mask top-left; a KV cache needs it bottom-right (the queries are the LAST positions)
    allowed = torch.as_tensor(causal_additive_mask(t_query, t_key) == 0.0)
    return tf.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def _tf(torch):
    return torch.nn.functional


# ============================================================================= THE table
def _ce_spec(name, **variant):
    return FusedSpec(
        name,
        fused=lambda z, **kw: F.cross_entropy(z, **kw),
        composed=cross_entropy_composed,
        reference=np_cross_entropy,
        cases=cross_entropy_case(**variant),
        torch_fn=torch_cross_entropy,
    )


def _sdpa_spec(name, causal, fewer_queries):
    return FusedSpec(
        name,
        fused=F.scaled_dot_product_attention,
        composed=attention_composed,
        reference=np_attention,
        cases=attention_case(causal, fewer_queries),
        torch_fn=torch_attention,
    )


FUSED = [
    FusedSpec("linear[bias]", F.linear, linear_composed, np_linear, linear_case(bias=True),
              lambda torch, x, w, b: _tf(torch).linear(x, w, b)),
    FusedSpec("linear[no-bias]", F.linear, linear_composed, np_linear, linear_case(bias=False),
              lambda torch, x, w: _tf(torch).linear(x, w)),
    FusedSpec("gelu", F.gelu, gelu_composed, np_gelu, elementwise_case(),
              lambda torch, x: _tf(torch).gelu(x, approximate="tanh")),
    FusedSpec("layer_norm[affine]", lambda x, w, b, eps: F.layer_norm(x, w, b, eps=eps), layer_norm_composed,
              np_layer_norm, layer_norm_case(affine=True),
              lambda torch, x, w, b, eps: _tf(torch).layer_norm(x, x.shape[-1:], w, b, eps=eps)),
    FusedSpec("layer_norm[no-affine]", lambda x, eps: F.layer_norm(x, None, None, eps=eps), layer_norm_composed,
              np_layer_norm, layer_norm_case(affine=False),
              lambda torch, x, eps: _tf(torch).layer_norm(x, x.shape[-1:], eps=eps)),
    FusedSpec("softmax[last-axis]", F.softmax, softmax_composed, np_softmax, softmax_case(last_axis=True),
              lambda torch, x, axis: torch.softmax(x, dim=axis)),
    FusedSpec("softmax[other-axis]", F.softmax, softmax_composed, np_softmax, softmax_case(last_axis=False),
              lambda torch, x, axis: torch.softmax(x, dim=axis)),
    FusedSpec("log_softmax[last-axis]", F.log_softmax, log_softmax_composed, np_log_softmax,
              softmax_case(last_axis=True), lambda torch, x, axis: torch.log_softmax(x, dim=axis)),
    FusedSpec("log_softmax[other-axis]", F.log_softmax, log_softmax_composed, np_log_softmax,
              softmax_case(last_axis=False), lambda torch, x, axis: torch.log_softmax(x, dim=axis)),
    _ce_spec("cross_entropy"),
    _ce_spec("cross_entropy[mask]", mask=True),
    _ce_spec("cross_entropy[ignore_index]", ignore=True),
    _ce_spec("cross_entropy[label_smoothing]", smoothing=True),
    _ce_spec("cross_entropy[mask+ignore_index+label_smoothing]", mask=True, ignore=True, smoothing=True),
    FusedSpec("embedding", lambda w, ids: F.embedding(ids, w), embedding_composed, lambda w, ids: w[ids],
              embedding_case(),
              lambda torch, w, ids: _tf(torch).embedding(torch.as_tensor(np.asarray(ids, dtype=np.int64)), w)),
    FusedSpec("dropout[training]", dropout_seeded, dropout_composed, np_dropout, dropout_case()),  # no torch counterpart: another RNG
    _sdpa_spec("attention[causal]", causal=True, fewer_queries=False),
    _sdpa_spec("attention[causal,Tq<Tk]", causal=True, fewer_queries=True),
    _sdpa_spec("attention[full]", causal=False, fewer_queries=False),
    _sdpa_spec("attention[full,Tq<Tk]", causal=False, fewer_queries=True),
]
FUSED_BY_NAME = {spec.name: spec for spec in FUSED}


# ============================================================================= running a spec
def functions_in_graph(out):
    """Every Function that produced ``out`` (iterative walk over the creators)."""
    seen, stack = {}, [out.creator]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen[id(fn)] = fn
        stack.extend(getattr(x, "creator", None) for x in fn.inputs)
    return list(seen.values())


def run(fn, arrays_, params, backend, upstream=None, dtype=None):
    """fn on fresh leaf tensors, then backward with ``upstream`` (random by default): (out, grads, g)."""
    inputs = make_inputs(arrays_, backend, dtype=dtype)
    out = fn(*inputs, **params)
    g = upstream_for([out])[0] if upstream is None else upstream
    out.backward(g)
    return out, [x.grad for x in inputs], g


def assert_grads_equal(what, ours, expected, rtol=1e-10):
    for i, (a, e) in enumerate(zip(ours, expected)):
        assert a is not None and e is not None, f"{what}: input {i} got no gradient"
        a, e = to_np(a), to_np(e)
        assert a.shape == e.shape and a.dtype == e.dtype, f"{what}: input {i}: {a.shape} {a.dtype} vs {e.shape} {e.dtype}"
        scale = max(1.0, float(np.abs(e).max(initial=0.0)))  # an absolute floor where terms cancel
        np.testing.assert_allclose(a, e, rtol=rtol, atol=1e-13 * scale, err_msg=f"{what}: gradient of input {i}")


# ============================================================================= the four table tests
@pytest.mark.parametrize("spec", FUSED, ids=str)
@given(data=st.data())
def test_forward_matches_numpy(spec, backend, data):
    arrays_, params = data.draw(spec.cases, label="(inputs, params)")
    before = [a.copy() for a in arrays_]
    out = spec.fused(*make_inputs(arrays_, backend), **on_backend(params, backend))
    expected = np.asarray(spec.reference(*arrays_, **params))
    assert isinstance(out, ml.Tensor) and out.backend == backend
    assert tuple(out.shape) == expected.shape and out.dtype == np.float64
    assert out.requires_grad
    # fused = ONE node of the graph, whose inputs are the leaves themselves
    assert type(out.creator).__module__ == "minilora.functional", f"{spec.name} is not one fused Function"
    assert all(x is None or not isinstance(x, ml.Tensor) or x.is_leaf for x in out.creator.inputs)
    assert_close(out.data, expected, rtol=1e-12, atol=1e-12, what=spec.name)
    for a, b in zip(arrays_, before):
        np.testing.assert_array_equal(a, b, err_msg=f"{spec.name} modified its input in place")


@pytest.mark.parametrize("spec", FUSED, ids=str)
@given(data=st.data())
def test_fused_backward_equals_autograd_through_primitives(spec, backend, data):
    arrays_, params = data.draw(spec.cases, label="(inputs, params)")
    params = on_backend(params, backend)
    composed_out, composed_grads, g = run(spec.composed, arrays_, params, backend)
    modules = {type(fn).__module__ for fn in functions_in_graph(composed_out)}
    assert modules and all(m.startswith("minilora.ops") for m in modules), f"{spec.name}: composed uses {modules}"
    fused_out, fused_grads, _ = run(spec.fused, arrays_, params, backend, upstream=g)
    assert_close(fused_out.data, composed_out.data, rtol=1e-12, atol=1e-12, what=f"{spec.name} forward")
    assert_grads_equal(spec.name, fused_grads, composed_grads)


@pytest.mark.parametrize("spec", FUSED, ids=str)
@given(data=st.data())
def test_fused_backward_passes_gradcheck(spec, backend, data):
    arrays_, params = data.draw(spec.cases, label="(inputs, params)")
    params = on_backend(params, backend)
    inputs = make_inputs(arrays_, backend)
    assert ml.gradcheck(lambda *xs: spec.fused(*xs, **params), inputs, **spec.gradcheck_tolerances)


@pytest.mark.parametrize("spec", FUSED, ids=str)
@settings(max_examples=4)
@given(data=st.data())
def test_float32_in_float32_out_and_grads(spec, backend, data):
    arrays_, params = data.draw(spec.cases, label="(inputs, params)")
    out, grads, _ = run(spec.fused, arrays_, on_backend(params, backend), backend, dtype=np.float32)
    assert out.dtype == np.float32, f"{spec.name}: float32 inputs gave a {out.dtype} output"
    for i, g in enumerate(grads):
        assert g is not None, f"{spec.name}: input {i} got no gradient"
        assert g.dtype == np.float32, f"{spec.name}: input {i} got a {g.dtype} gradient"
        assert tuple(g.shape) == arrays_[i].shape
    assert_close(out.data, spec.reference(*arrays_, **params), rtol=1e-4, atol=1e-5, what=f"{spec.name} float32")


def test_table_covers_every_composite():
    aliases = {"attention": "scaled_dot_product_attention"}
    covered = {aliases.get(name, name) for name in (spec.name.split("[")[0] for spec in FUSED)}
    elsewhere = {"lora_linear": "tests/test_lora.py", "dropout_mask": "the dropout spec's reference"}
    missing = set(F.__all__) - covered - set(elsewhere)
    assert not missing, f"composites without a spec: {sorted(missing)}"


# ============================================================================= fixed cases the table cannot express
def T(values, backend="numpy", dtype="float64", grad=True):
    return ml.tensor(np.asarray(values, dtype=np.float64), dtype=dtype, requires_grad=grad, backend=backend)


def test_gelu_of_a_0d_tensor(backend):
    x = T(0.3, backend)
    y = F.gelu(x)
    y.backward()
    assert_close(y.data, np_gelu(np.float64(0.3)), rtol=1e-12)


def test_linear_without_leading_dims_is_a_vector_times_matrix(backend):
    x, w, b = T([1.0, 2.0], backend), T([[1.0, 0.0], [0.5, -1.0], [2.0, 3.0]], backend), T([0.0, 1.0, -1.0], backend)
    y = F.linear(x, w, b)
    assert tuple(y.shape) == (3,)
    assert_close(y.data, [1.0, -0.5, 7.0], rtol=1e-15)


def test_cross_entropy_is_the_mean_over_counted_tokens_only(backend):
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]))
    targets = np.array([0, 1, 2])
    z = T(logits, backend)
    masked = F.cross_entropy(z, targets, mask=np.array([1, 0, 1]))
    assert_close(masked.data, (-np.log(0.5) - np.log(0.6)) / 2, rtol=1e-12)  # divided by 2 counted, not 3
    ignored = F.cross_entropy(z, np.array([0, IGNORE, 2]), ignore_index=IGNORE)
    assert_close(ignored.data, masked.data, rtol=1e-12)
    ignored.backward()
    assert_close(z.grad[1], np.zeros(3), atol=0)  # an ignored position gets exactly no gradient


def test_cross_entropy_targets_may_be_a_tensor_of_integers(backend):
    z = T([[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]], backend)
    targets = ml.tensor(np.array([2, 0]), backend=backend)
    loss = F.cross_entropy(z, targets)
    assert_close(loss.data, np_cross_entropy(to_np(z.data), np.array([2, 0])), rtol=1e-12)
    loss.backward()
    assert targets.grad is None and z.grad is not None


def test_embedding_repeated_ids_accumulate_and_ids_get_no_gradient(backend):
    weight = T(np.arange(12.0).reshape(4, 3), backend)
    ids = ml.tensor(np.array([[3, 1], [3, 3]]), backend=backend)
    out = F.embedding(ids, weight)
    assert tuple(out.shape) == (2, 2, 3)
    out.backward(np.ones((2, 2, 3)))
    assert_close(weight.grad, [[0, 0, 0], [1, 1, 1], [0, 0, 0], [3, 3, 3]], atol=0)
    assert ids.grad is None
    assert out.creator.needs_input_grad == (False, True)  # the ids are an input, never differentiated


@pytest.mark.parametrize("vocab, one_hot", [(5, True), (256, True), (257, False), (5000, False)],
                         ids=["one-hot-path", "one-hot-largest", "scatter-add-smallest", "scatter-add-path"])
def test_embedding_backward_both_paths_add_repeated_rows(vocab, one_hot, backend, monkeypatch):
    """Up to 256 rows (and a small N·V) the backward is a one-hot matmul, else a scatter-add: both agree."""
    scatters = []
    real_scatter_add = bk.scatter_add
    monkeypatch.setattr(bk, "scatter_add", lambda *args: (scatters.append(1), real_scatter_add(*args)))
    rng = np.random.default_rng(1)
    ids = rng.integers(0, vocab, size=(3, 7))
    ids[0, :3] = ids[2, 6]  # repeats
    weight = T(rng.standard_normal((vocab, 2)), backend)
    g = rng.standard_normal((3, 7, 2))
    F.embedding(ids, weight).backward(g)
    expected = np.zeros((vocab, 2))
    np.add.at(expected, ids.reshape(-1), g.reshape(-1, 2))
    assert_close(weight.grad, expected, rtol=1e-12, atol=1e-12)
    assert bool(scatters) is not one_hot, "the backward took the other path"


def test_embedding_backward_at_gpt2_vocab_never_builds_an_n_by_v_array():
    """V = 50,257 (GPT-2), N = 1024 tokens: a one-hot would be N·V·4 = 206 MB; the backward stays near dW."""
    V, N, D = 50_257, 1024, 4
    rng = np.random.default_rng(2)
    ids = rng.integers(0, V, size=(2, N // 2))
    ids[1, :10] = ids[0, 0]  # repeats
    weight = ml.tensor(rng.standard_normal((V, D)), requires_grad=True, dtype="float32", backend="numpy")
    g = rng.standard_normal((2, N // 2, D)).astype(np.float32)
    out = F.embedding(ids, weight)
    tracemalloc.start()
    try:
        out.backward(g)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < N * V * 4 / 50, f"backward peaked at {peak:,} bytes: an N x V array was built"
    expected = np.zeros((V, D), dtype=np.float32)
    np.add.at(expected, ids.reshape(-1), g.reshape(-1, D))
    assert_close(weight.grad, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("order", ["head-first", "lookup-first"])
def test_a_tied_table_gets_the_lookup_rows_added_to_the_heads_gradient_bit_for_bit(order, backend):
    """W used by an embedding and a matmul (GPT-2's tied wte): W.grad is exactly dW_head + the scatter-add.

    The embedding's backward hands the autograd only its rows (``tensor.RowGradient``); added onto
    the head's dense dW they must give the bits that the dense sum gives, whichever comes first.
    """
    rng = np.random.default_rng(4)
    V, D = 300, 5
    ids = rng.integers(0, V, size=(3, 9))
    ids[1, :4] = ids[0, 2]  # repeats
    table, xs = rng.standard_normal((V, D)), rng.standard_normal((3, D))
    g_lookup, g_head = rng.standard_normal((3, 9, D)), rng.standard_normal((3, V))
    W, x = T(table, backend), T(xs, backend)
    (x @ W.T).backward(g_head)
    head = to_np(W.grad).copy()  # the head's dW alone
    W, x = T(table, backend), T(xs, backend)
    looked_up, logits = F.embedding(ids, W), x @ W.T
    if order == "lookup-first":  # the lookup's gradient reaches W before the head's
        looked_up.backward(g_lookup)
        logits.backward(g_head)
    else:  # one graph: the head's gradient arrives first
        ((looked_up * T(g_lookup, backend)).sum() + (logits * T(g_head, backend)).sum()).backward()
    dense = np.zeros((V, D))
    np.add.at(dense, ids.reshape(-1), g_lookup.reshape(-1, D))
    np.testing.assert_array_equal(to_np(W.grad), head + dense)
    assert isinstance(W.grad, type(x.data))  # .grad is always a dense array of the backend


def test_the_tied_tables_gradient_is_built_once_and_an_earlier_grad_is_never_changed():
    """GPT-2's V: the lookup's rows go into the head's fresh dW in place (one (V, D) array at the peak);
    a .grad from an earlier backward, which the caller may hold, is added to as a new array."""
    V, D = 50_257, 32  # the (V, D) gradient (6.4 MB) well above the (4, V) arrays of the head (0.8 MB)
    rng = np.random.default_rng(6)
    W = ml.tensor(rng.standard_normal((V, D)).astype(np.float32), requires_grad=True)
    ids = rng.integers(0, V, size=(4, 16))
    g_lookup = rng.standard_normal((4, 16, D)).astype(np.float32)
    g_head = rng.standard_normal((4, V)).astype(np.float32)

    def tied_loss():  # as in the GPT: the lookup first, the head on what it led to
        pooled = F.embedding(ids, W).sum(axis=1) * ml.tensor(g_lookup[:, 0])
        return (F.linear(pooled, W) * ml.tensor(g_head)).sum()

    loss = tied_loss()
    tracemalloc.start()
    try:
        loss.backward()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * V * D * 4, f"the backward peaked at {peak:,} bytes: the (V, D) gradient was copied"
    pooled = W.data[ids].sum(axis=1) * g_lookup[:, 0]
    dense = np.zeros((V, D), np.float32)
    np.add.at(dense, ids.reshape(-1), np.repeat((g_head @ W.data) * g_lookup[:, 0], 16, axis=0))
    np.testing.assert_allclose(W.grad, g_head.T @ pooled + dense, rtol=1e-4, atol=1e-4)
    first, kept = W.grad, W.grad.copy()
    F.embedding(ids, W).backward(g_lookup)  # a second sweep: accumulates onto the caller's array
    np.testing.assert_array_equal(first, kept)
    assert W.grad is not first
    again = np.zeros((V, D), np.float32)
    np.add.at(again, ids.reshape(-1), g_lookup.reshape(-1, D))
    np.testing.assert_array_equal(W.grad, kept + again)


def test_a_row_gradient_through_an_op_is_made_dense():
    """A table that is not a leaf (here W * 1) passes its gradient on to the op that made it as an array."""
    rng = np.random.default_rng(5)
    W = ml.tensor(rng.standard_normal((400, 3)), requires_grad=True)
    ids = np.array([[5, 7, 5]])
    F.embedding(ids, W * 1.0).backward(np.ones((1, 3, 3)))
    expected = np.zeros((400, 3))
    expected[5], expected[7] = 2.0, 1.0
    np.testing.assert_array_equal(W.grad, expected)


def test_dropout_identity_when_not_training_or_p_zero(backend):
    x = T(np.arange(6.0).reshape(2, 3), backend)
    for out in (F.dropout(x, 0.5, training=False), F.dropout(x, 0.0, training=True)):
        assert out is x  # the same tensor: no mask, no graph node
    g = np.arange(6.0).reshape(2, 3) + 1.0
    F.dropout(x, 0.3, training=False).backward(g)
    assert_close(x.grad, g, atol=0)


def test_dropout_mask_has_mean_one_and_drops_a_fraction_p(backend):
    p, n = 0.3, 1_000_000
    ml.manual_seed(123)
    out = to_np(F.dropout(T(np.ones(n), backend, dtype="float32"), p, training=True).data)
    assert out.dtype == np.float32
    assert set(np.unique(out).tolist()) <= {0.0, float(np.float32(1.0 / (1.0 - p)))}
    # std of one mask element: sqrt(p / (1 - p)) ≈ 0.65, so the mean of 1e6 is within 5 sigma of 1 by 3.3e-3
    assert abs(out.mean() - 1.0) < 3.3e-3, f"E[mask] = {out.mean()}"
    assert abs((out == 0).mean() - p) < 2.5e-3, f"dropped fraction {(out == 0).mean()}"


def test_dropout_is_reproducible_under_the_seed(backend):
    x = T(np.ones((64, 64)), backend)
    ml.manual_seed(7)
    first, second = to_np(F.dropout(x, 0.5, True).data), to_np(F.dropout(x, 0.5, True).data)
    ml.manual_seed(7)
    again = to_np(F.dropout(x, 0.5, True).data)
    ml.manual_seed(8)
    other = to_np(F.dropout(x, 0.5, True).data)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, second), "two calls in a row drew the same mask"
    assert not np.array_equal(first, other), "two seeds gave the same mask"


def test_dropout_backward_uses_the_forward_mask(backend):
    x = T(np.ones((8, 8)), backend)
    ml.manual_seed(3)
    y = F.dropout(x, 0.5, True)
    F.dropout(T(np.ones(3), backend), 0.5, True)  # another draw in between must not change y's backward
    y.backward(np.ones((8, 8)))
    assert_close(x.grad, y.data, atol=0)  # d(x·m)/dx = m, and y = 1·m


@pytest.mark.parametrize("t_query, t_key", [(1, 4), (2, 5), (3, 3)])
def test_causal_attention_queries_are_the_last_positions(t_query, t_key, backend):
    """With a KV cache the queries are positions t_key - t_query ... t_key - 1: query i sees keys 0..offset + i."""
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, t, 3)) for t in (t_query, t_key, t_key))
    # the cached call must equal the last t_query rows of a full causal pass whose queries at those positions are q
    q_full = k.copy()
    q_full[:, t_key - t_query:] = q
    full = F.scaled_dot_product_attention(T(q_full, backend), T(k, backend), T(v, backend), causal=True)
    cached = F.scaled_dot_product_attention(T(q, backend), T(k, backend), T(v, backend), causal=True)
    assert_close(cached.data, to_np(full.data)[:, t_key - t_query:], rtol=1e-12, atol=1e-14)
    # and a single query (generation) sees every key
    last = F.scaled_dot_product_attention(T(q[:, -1:], backend), T(k, backend), T(v, backend), causal=True)
    assert_close(last.data, np_attention(q[:, -1:], k, v, causal=False), rtol=1e-12, atol=1e-14)


# ============================================================================= bad inputs
def test_linear_feature_mismatch_names_both_shapes(backend):
    x, w = T(np.ones((2, 3)), backend), T(np.ones((4, 5)), backend)
    with pytest.raises(ValueError) as info:
        F.linear(x, w)
    assert "(2, 3)" in str(info.value) and "(4, 5)" in str(info.value)


@pytest.mark.parametrize("bad", [5, 7], ids=["== vocab", "> vocab"])
def test_cross_entropy_target_outside_vocab_names_the_id_and_vocab(bad, backend):
    z = T(np.zeros((2, 3, 5)), backend)
    targets = np.array([[0, 1, 2], [3, bad, 4]])
    with pytest.raises(ValueError, match=rf"\b{bad}\b.*\b5\b"):
        F.cross_entropy(z, targets)


def test_cross_entropy_negative_target_that_is_not_ignored_raises(backend):
    z = T(np.zeros((2, 4)), backend)
    with pytest.raises(ValueError, match=r"-100.*4"):
        F.cross_entropy(z, np.array([1, IGNORE]))  # no ignore_index given: -100 is a real (invalid) id


def test_cross_entropy_out_of_range_target_at_a_masked_position_is_allowed(backend):
    z = T(np.zeros((2, 4)), backend)
    loss = F.cross_entropy(z, np.array([1, 99]), mask=np.array([1, 0]))
    assert_close(loss.data, np.log(4.0), rtol=1e-12)


@pytest.mark.parametrize("how", ["mask", "ignore_index", "both"])
def test_cross_entropy_with_every_position_masked_raises(how, backend):
    z = T(np.zeros((2, 3, 4)), backend)
    targets = np.full((2, 3), IGNORE) if how != "mask" else np.ones((2, 3), dtype=np.int64)
    kwargs = {"mask": np.zeros((2, 3))} if how != "ignore_index" else {}
    if how != "mask":
        kwargs["ignore_index"] = IGNORE
    with pytest.raises(ValueError, match="no token is counted"):
        F.cross_entropy(z, targets, **kwargs)


def test_cross_entropy_float_targets_and_bad_smoothing_raise(backend):
    z = T(np.zeros((2, 4)), backend)
    with pytest.raises(TypeError, match="integer"):
        F.cross_entropy(z, np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="label_smoothing"):
        F.cross_entropy(z, np.array([1, 2]), label_smoothing=1.0)
    with pytest.raises(ValueError, match=r"\(3,\).*\(2, 4\)"):
        F.cross_entropy(z, np.array([1, 2, 3]))


@pytest.mark.parametrize("shape", [(3,), (4, 1), (5, 4)])
def test_layer_norm_weight_of_wrong_shape_names_the_shapes(shape, backend):
    x = T(np.ones((2, 4)), backend)
    with pytest.raises(ValueError) as info:
        F.layer_norm(x, T(np.ones(shape), backend), T(np.zeros(4), backend))
    assert str(shape) in str(info.value) and "(2, 4)" in str(info.value)


@pytest.mark.parametrize("bad", [4, 9, -1])
def test_embedding_id_out_of_range_names_the_id_and_rows(bad, backend):
    weight = T(np.ones((4, 2)), backend)
    with pytest.raises(ValueError, match=rf"{bad}\b.*\b4 rows"):
        F.embedding(np.array([0, bad, 1]), weight)
    with pytest.raises(TypeError, match="integers"):
        F.embedding(np.array([0.0, 1.0]), weight)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
@pytest.mark.parametrize("training", [True, False])
def test_dropout_probability_outside_0_1_raises(p, training, backend):
    with pytest.raises(ValueError, match=r"\[0, 1\).*" + str(p)):
        F.dropout(T(np.ones(3), backend), p, training)


def test_attention_shape_mismatch_names_the_shapes(backend):
    q, k, v = T(np.ones((2, 3, 4)), backend), T(np.ones((2, 3, 5)), backend), T(np.ones((2, 3, 4)), backend)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 3, 5\)"):
        F.scaled_dot_product_attention(q, k, v)


# ============================================================================= gaps these tests found (fixed)
def test_attention_refuses_keys_broadcast_over_the_batch(backend):
    """k, v of batch shape (1, ...) against q of (2, ...): the fused backward would return dk, dv of
    q's batch shape, so the forward refuses with a message naming the shapes."""
    rng = np.random.default_rng(9)
    q, k, v = (T(rng.standard_normal(s), backend) for s in ((2, 3, 4), (1, 3, 4), (1, 3, 2)))
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(1, 3, 4\).*same batch"):
        F.scaled_dot_product_attention(q, k, v, causal=True)


def test_causal_attention_with_more_queries_than_keys_raises(backend):
    """Tq > Tk under the causal mask would leave the first Tq - Tk queries no key (NaN rows): it raises."""
    q, k, v = T(np.ones((4, 2)), backend), T(np.ones((2, 2)), backend), T(np.ones((2, 2)), backend)
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(2, 2\)"), np.errstate(invalid="ignore"):
        F.scaled_dot_product_attention(q, k, v, causal=True)


@pytest.mark.parametrize("op", ["linear", "layer_norm"])
def test_bias_of_wrong_shape_names_the_shapes(op, backend):
    """A bias of shape (1,) broadcasts in the forward, then the backward fails with a shape error far away."""
    x, bias = T(np.ones((2, 4)), backend), T(np.ones(1), backend)
    with pytest.raises(ValueError, match=r"\(1,\)"):
        if op == "linear":
            F.linear(x, T(np.ones((4, 4)), backend), bias)
        else:
            F.layer_norm(x, T(np.ones(4), backend), bias)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gelu_in_cache_blocks_equals_gelu_in_one_pass(monkeypatch, dtype):
    """A large input goes through GELU in blocks of rows (the L2-cache fast path): the same bits."""
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((3, 70, 1000)).astype(dtype)  # 210 rows of 1000: 4 blocks, the last one partial
    g_np = rng.standard_normal(x_np.shape).astype(dtype)
    results = []
    for block in (F._BLOCK_ELEMENTS, 10**9):  # blocked, then one pass over the whole array
        monkeypatch.setattr(F, "_BLOCK_ELEMENTS", block)
        x = ml.tensor(x_np, requires_grad=True)
        y = F.gelu(x)
        y.backward(g_np)
        results.append((y.data, x.grad))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    xd = x_np.astype(np.float64)
    t = np.tanh(GELU_C * (xd + GELU_A * xd ** 3))
    dydx = 0.5 * (1 + t) + 0.5 * xd * (1 - t * t) * GELU_C * (1 + 3 * GELU_A * xd * xd)
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(results[0][0], np_gelu(xd), rtol=tol, atol=tol)
    np.testing.assert_allclose(results[0][1], dydx * g_np, rtol=tol, atol=tol)
