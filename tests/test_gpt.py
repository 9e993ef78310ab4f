"""The tiny GPT-2: names, shapes, dtypes, causality, the masked loss, the KV cache, gradients, errors.

The whole-model comparison with PyTorch lives in tests/oracle/test_gpt_torch.py.
"""

import numpy as np
import pytest
from conftest import assert_close, to_np
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora import backend as bk
from minilora.models import GPT, GPTConfig, KVCache

SMALL = GPTConfig(vocab_size=17, block_size=10, n_layer=2, n_head=2, d_model=12)


def expected_names(n_layer):
    names = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}
    for i in range(n_layer):
        for ln in ("ln1", "ln2"):
            names |= {f"blocks.{i}.{ln}.weight", f"blocks.{i}.{ln}.bias"}
        for lin in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc", "mlp.proj"):
            names |= {f"blocks.{i}.{lin}.weight", f"blocks.{i}.{lin}.bias"}
    return names


def sharpen(model, scale=8.0):
    """Multiply the init's 0.02-std weights up so outputs depend visibly on every input."""
    for name, p in model.named_parameters():
        if name.endswith(".weight") and ".ln" not in name and not name.startswith("ln_f"):
            p.data *= scale
    return model


def float64_model(cfg=SMALL, scale=8.0):
    return sharpen(GPT(cfg).to(dtype="float64"), scale)


# ----------------------------------------------------------------------------- structure
def test_state_dict_names_and_shapes_are_gpt2(backend):
    cfg = GPTConfig(vocab_size=11, block_size=7, n_layer=3, n_head=2, d_model=8)
    model = GPT(cfg)
    state = model.state_dict()
    assert set(state) == expected_names(3)  # and nothing else: the LM head is tied to wte
    d, V, T = 8, 11, 7
    assert state["wte.weight"].shape == (V, d) and state["wpe.weight"].shape == (T, d)
    assert state["blocks.2.attn.q.weight"].shape == (d, d) and state["blocks.2.attn.o.bias"].shape == (d,)
    assert state["blocks.0.mlp.fc.weight"].shape == (4 * d, d)  # (out, in)
    assert state["blocks.0.mlp.proj.weight"].shape == (d, 4 * d)
    assert state["ln_f.weight"].shape == (d,)
    assert model.num_parameters() == sum(a.size for a in state.values())
    assert all(bk.backend_of(a) == backend for a in state.values())


def test_logits_shape_and_float32_default(backend):
    model = GPT(SMALL)
    assert all(p.dtype == np.float32 for p in model.parameters())
    logits = model(np.zeros((3, 5), dtype=np.int64))
    assert logits.shape == (3, 5, SMALL.vocab_size) and logits.dtype == np.float32


def test_to_float64_converts_every_parameter_and_the_output(backend):
    model = GPT(SMALL)
    idx = np.arange(6).reshape(1, 6)
    before = to_np(model(idx).data)
    assert model.to(dtype="float64") is model
    assert all(p.dtype == np.float64 for p in model.parameters())
    after = model(idx)
    assert after.dtype == np.float64
    assert_close(after.data, before, rtol=1e-4, atol=1e-5)


def test_head_is_tied_to_the_token_embedding():
    """logits = ln_f(h) wteᵀ: changing one row of wte moves that token's logit everywhere."""
    model = float64_model()
    idx = np.array([[1, 2, 3]])
    before = to_np(model(idx).data)
    model.wte.weight.data[5] += 1.0  # token 5 is not in the input: only the head sees this row
    after = to_np(model(idx).data)
    changed = np.abs(after - before).max(axis=(0, 1)) > 0
    assert changed[5] and changed.sum() == 1


def test_init_is_gpt2():
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=64))
    s = model.state_dict()
    assert np.all(s["blocks.0.ln1.weight"] == 1) and np.all(s["ln_f.bias"] == 0) and np.all(s["blocks.1.attn.q.bias"] == 0)
    assert abs(float(np.std(s["wte.weight"])) - 0.02) < 0.003
    assert abs(float(np.std(s["blocks.0.mlp.proj.weight"])) - 0.02 / np.sqrt(4)) < 0.002  # 1/√(2L)


def test_default_init_is_unchanged_by_init_weights():
    """GPT(cfg) draws what it drew before ``init_weights`` existed (values recorded then, seed 7)."""
    ml.manual_seed(7)
    s = GPT(SMALL).state_dict()
    recorded = {  # first three values and the sum of each, as recorded for seed 7
        "wte.weight": ([0.008124803192913532, -0.0228266641497612, -0.008789327926933765], 0.3238221190767945),
        "wpe.weight": ([-0.017342964187264442, 0.018466224893927574, 0.007762902416288853], -0.09059767734652269),
        "blocks.0.attn.q.weight": ([-0.03834425285458565, 0.017029589042067528, 0.009187169373035431],
                                   -0.38168881298042834),
        "blocks.1.mlp.proj.weight": ([0.00894161593168974, 0.004508035723119974, -0.021741552278399467],
                                     -0.3684763678456875),
    }
    for name, (first, total) in recorded.items():
        a = np.asarray(to_np(s[name]), dtype=np.float64)
        np.testing.assert_array_equal(a.ravel()[:3], first, err_msg=name)
        assert abs(float(a.sum()) - total) < 1e-9, name
    assert abs(float(bk.random_normal((1,), "float64")[0]) - 0.6751062315563504) < 1e-15  # the stream after it


def test_init_weights_false_is_zeros_draws_nothing_and_loads_equal():
    ml.manual_seed(3)
    reference = GPT(SMALL)
    ml.manual_seed(3)
    empty = GPT(SMALL, init_weights=False)
    assert GPT(SMALL).state_dict().keys() == reference.state_dict().keys()
    ml.manual_seed(3)
    GPT(SMALL, init_weights=False)
    again = GPT(SMALL)  # no random numbers were drawn by the empty model: the stream is where seed 3 left it
    for name, value in reference.state_dict().items():
        np.testing.assert_array_equal(to_np(again.state_dict()[name]), to_np(value), err_msg=name)
    for name, value in empty.state_dict().items():
        expected = 1.0 if name.endswith("weight") and (".ln" in name or name.startswith("ln_f")) else 0.0
        assert np.all(to_np(value) == expected) and value.dtype == np.float32, name
    assert all(p.requires_grad for p in empty.parameters())
    empty.load_state_dict(reference.state_dict())
    idx = np.random.default_rng(0).integers(0, SMALL.vocab_size, (2, 6))
    with ml.no_grad():
        np.testing.assert_array_equal(to_np(empty(idx).data), to_np(reference(idx).data))


def test_config_validation_and_round_trip():
    assert GPTConfig.from_dict({**SMALL.to_dict(), "unknown": 1}) == SMALL
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(d_model=10, n_head=3)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.0)


# ----------------------------------------------------------------------------- behaviour
_CAUSAL_MODEL = float64_model()


@given(t=st.integers(0, SMALL.block_size - 2), token=st.integers(0, SMALL.vocab_size - 1), seed=st.integers(0, 99))
def test_changing_a_future_token_leaves_earlier_logits_unchanged(t, token, seed):
    model = _CAUSAL_MODEL
    idx = np.random.default_rng(seed).integers(0, SMALL.vocab_size, size=(2, SMALL.block_size))
    changed = idx.copy()
    changed[:, t + 1] = (idx[:, t + 1] + 1 + token % (SMALL.vocab_size - 1)) % SMALL.vocab_size  # a different token
    a, b = to_np(model(idx).data), to_np(model(changed).data)
    np.testing.assert_array_equal(a[:, : t + 1], b[:, : t + 1])
    assert np.abs(a[:, t + 1 :] - b[:, t + 1 :]).max() > 1e-6  # and the future does see it


def test_masked_loss_counts_only_masked_positions():
    model = float64_model()
    rng = np.random.default_rng(1)
    idx, targets = rng.integers(0, 17, size=(3, 8)), rng.integers(0, 17, size=(3, 8))
    mask = np.zeros((3, 8), dtype=np.int64)
    mask[0, 5:] = 1
    mask[2, 2:6] = 1
    logits = to_np(model(idx).data)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    assert abs(model.loss(idx, targets, mask=mask).item() - nll[mask == 1].mean()) < 1e-12
    assert abs(model.loss(idx, targets).item() - nll.mean()) < 1e-12
    # targets outside the mask are never looked at (padding may hold any id)
    padded = np.where(mask == 1, targets, -100)
    assert abs(model.loss(idx, padded, mask=mask).item() - nll[mask == 1].mean()) < 1e-12


def test_masked_loss_gradient_ignores_unmasked_targets():
    model = float64_model()
    rng = np.random.default_rng(2)
    idx, targets = rng.integers(0, 17, size=(2, 6)), rng.integers(0, 17, size=(2, 6))
    mask = np.array([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 0]])
    model.loss(idx, targets, mask=mask).backward()
    g1 = {n: to_np(p.grad).copy() for n, p in model.named_parameters()}
    model.zero_grad()
    other = np.where(mask == 1, targets, (targets + 3) % 17)
    model.loss(idx, other, mask=mask).backward()
    for n, p in model.named_parameters():
        np.testing.assert_array_equal(to_np(p.grad), g1[n], err_msg=n)


def test_cached_forward_equals_full_forward(backend):
    model = float64_model()
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 17, size=(3, SMALL.block_size))
    with ml.no_grad():
        full = to_np(model(idx).data)
        cache = KVCache(SMALL.n_layer)
        steps = [to_np(model(idx[:, t : t + 1], cache=cache).data) for t in range(SMALL.block_size)]
        assert cache.length == SMALL.block_size
        # a chunk (the prompt), then one token at a time
        cache = KVCache(SMALL.n_layer)
        chunked = [to_np(model(idx[:, :4], cache=cache).data)]
        chunked += [to_np(model(idx[:, t : t + 1], cache=cache).data) for t in range(4, SMALL.block_size)]
    assert_close(np.concatenate(steps, axis=1), full, rtol=1e-10, atol=1e-12)
    assert_close(np.concatenate(chunked, axis=1), full, rtol=1e-10, atol=1e-12)


def test_cache_reorder_follows_rows():
    model = float64_model()
    idx = np.random.default_rng(4).integers(0, 17, size=(3, 6))
    with ml.no_grad():
        cache = KVCache(SMALL.n_layer)
        model(idx[:, :5], cache=cache)
        rows = np.array([2, 0, 0])
        cache.reorder(rows)
        last = to_np(model(idx[rows, 5:6], cache=cache).data)[:, 0]
        full = to_np(model(idx[rows]).data)[:, 5]
    assert_close(last, full, rtol=1e-10, atol=1e-12)


def test_eval_mode_turns_dropout_off():
    model = GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=1, n_head=2, d_model=8, dropout=0.5))
    idx = np.arange(6).reshape(1, 6) % 11
    assert not np.array_equal(to_np(model(idx).data), to_np(model(idx).data))  # training: fresh masks
    model.eval()
    np.testing.assert_array_equal(to_np(model(idx).data), to_np(model(idx).data))


def test_gradcheck_whole_model():
    cfg = GPTConfig(vocab_size=11, block_size=5, n_layer=2, n_head=2, d_model=8)
    model = sharpen(GPT(cfg).to(dtype="float64"), 10.0)
    rng = np.random.default_rng(5)
    idx, targets = rng.integers(0, 11, size=(2, 5)), rng.integers(0, 11, size=(2, 5))
    mask = np.array([[0, 1, 1, 1, 1], [0, 0, 1, 1, 0]])
    for p in (model.ln_f.weight, model.ln_f.bias):  # off their init so every term is exercised
        p.data += rng.standard_normal(p.shape) * 0.3
    checked = [model.wte.weight, model.blocks[1].attn.q.weight, model.ln_f.weight]
    ml.gradcheck(lambda *params: model(idx), checked, eps=1e-6, atol=1e-7, rtol=1e-6)
    ml.gradcheck(
        lambda *params: model.loss(idx, targets, mask=mask),
        [model.wpe.weight, model.blocks[0].attn.v.weight, model.blocks[0].mlp.fc.bias, model.ln_f.bias],
        eps=1e-6, atol=1e-8, rtol=1e-6,
    )


# ----------------------------------------------------------------------------- errors
def test_sequence_longer_than_block_size_is_an_error():
    model = GPT(SMALL)
    with pytest.raises(ValueError, match="block_size=10"):
        model(np.zeros((1, 11), dtype=np.int64))
    with ml.no_grad():
        cache = KVCache(SMALL.n_layer)
        model(np.zeros((1, 8), dtype=np.int64), cache=cache)
        with pytest.raises(ValueError, match="block_size"):
            model(np.zeros((1, 3), dtype=np.int64), cache=cache)


def test_non_integer_ids_are_an_error():
    model = GPT(SMALL)
    with pytest.raises(TypeError, match="integer"):
        model(np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="batch, time"):
        model(np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="outside"):
        model(np.array([[0, 17]]))


def test_cache_needs_no_grad():
    model = GPT(SMALL)
    with pytest.raises(RuntimeError, match="no_grad"):
        model(np.zeros((1, 2), dtype=np.int64), cache=KVCache(SMALL.n_layer))
