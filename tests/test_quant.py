"""NF4 quantization (QLoRA): the published levels, nearest-level codes, packing, double quantization, errors."""

import os
from statistics import NormalDist

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora import backend as bk
from minilora import lora, quant
from minilora.lora.quantized import DequantBuffer, QuantizedWeight, nf4_linear
from minilora.models import GPT, GPTConfig
from conftest import to_np

# QLoRA (Dettmers et al. 2023), Appendix E, typed in from the paper.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip


def test_levels_are_the_published_values():
    assert list(quant.NF4_LEVELS) == PUBLISHED_NF4
    assert quant.NF4_LEVELS[quant.ZERO_CODE] == 0.0


def test_levels_follow_the_papers_construction():
    """Quantiles of N(0, 1) at 8 (positive side) and 7 (negative side) equal-probability points from
    δ = ½(1/32 + 1/30) ≈ 0.9677 to ½, plus an exact zero, scaled to [-1, 1] (QLoRA, Sec. 3)."""
    offset, normal = 0.9677083, NormalDist()
    positive = [normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    negative = [-normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    values = np.array(sorted(positive + [0.0] + negative))
    np.testing.assert_allclose(values / values.max(), PUBLISHED_NF4, atol=2e-7)  # the table is float32


def brute_force_codes(W, block_size):
    """Independent reference: per block absmax, then argmin over the 16 levels of |W/c - level|."""
    flat = np.asarray(W, dtype=np.float64).reshape(-1)
    n_blocks = -(-flat.size // block_size)
    padded = np.zeros(n_blocks * block_size)
    padded[: flat.size] = flat
    blocks = padded.reshape(n_blocks, block_size)
    absmax = np.abs(blocks).max(axis=1).astype(np.float32)
    safe = np.where(absmax > 0, absmax, 1.0).astype(np.float64)
    distance = np.abs((blocks / safe[:, None])[..., None] - np.array(PUBLISHED_NF4))
    return distance.argmin(axis=-1).reshape(-1), absmax, distance


weights = st.tuples(st.integers(1, 9), st.integers(1, 40), st.sampled_from([2, 4, 8, 64]), st.integers(0, 2**31 - 1))


@given(weights)
def test_dequantize_is_absmax_times_the_nearest_level(backend, case):
    rows, cols, block_size, seed = case
    W = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    W.reshape(-1)[:: 7] *= 5.0  # outliers: they set their blocks' absmax
    q = quant.quantize_nf4(bk.asarray(W), block_size=block_size)
    codes, absmax, distance = brute_force_codes(W, block_size)
    np.testing.assert_array_equal(to_np(q.absmax), absmax)
    # our code is *a* nearest level: its distance is the minimum (ties may pick either side)
    ours = quant._unpack(q.codes, 0, q.size)
    ours_distance = np.take_along_axis(distance.reshape(-1, 16)[: q.size], to_np(ours)[:, None].astype(np.int64), 1)
    np.testing.assert_array_equal(ours_distance[:, 0], distance.reshape(-1, 16)[: q.size].min(axis=1))
    expected = (np.array(PUBLISHED_NF4, dtype=np.float32)[codes[: W.size]]
                * np.repeat(absmax, block_size)[: W.size]).reshape(W.shape)
    W_hat = quant.dequantize(q)
    assert W_hat.shape == W.shape and W_hat.dtype == W.dtype and bk.backend_of(W_hat) == backend
    np.testing.assert_array_equal(to_np(W_hat), expected)
    # the error bound: half the widest gap between neighbouring levels, times the block's scale
    half_gap = max(b - a for a, b in zip(PUBLISHED_NF4, PUBLISHED_NF4[1:])) / 2
    bound = np.repeat(absmax, block_size)[: W.size].reshape(W.shape) * half_gap * (1 + 1e-6)
    assert (np.abs(W - to_np(W_hat)) <= bound).all()


@given(st.integers(1, 300), st.sampled_from([2, 6, 64]))
def test_packing_round_trip_and_layout(n, block_size):
    W = np.random.default_rng(n).uniform(-1, 1, n)
    q = quant.quantize_nf4(W, block_size=block_size)
    n_padded = -(-n // block_size) * block_size
    assert q.codes.dtype == np.uint8 and q.codes.shape == (n_padded // 2,)
    codes = brute_force_codes(W, block_size)[0]
    high, low = q.codes >> 4, q.codes & 0x0F  # element 2j in the high nibble, 2j+1 in the low one
    np.testing.assert_array_equal(np.stack([high, low], axis=1).reshape(-1)[:n], codes[:n])
    assert (codes[n:] == quant.ZERO_CODE).all()  # padding: the code of 0
    np.testing.assert_array_equal(quant._unpack(q.codes, 0, n), codes[:n])
    for lo, hi in [(0, n), (1, n), (n // 3, n - n // 3), (n - 1, n)]:  # odd starts cut a byte in half
        np.testing.assert_array_equal(quant._unpack(q.codes, lo, hi), codes[lo:hi])
        np.testing.assert_array_equal(quant.dequantize_range(q, lo, hi), quant.dequantize(q).reshape(-1)[lo:hi])


def test_odd_sizes_are_padded_not_refused():
    W = np.arange(1.0, 8.0, dtype=np.float32)  # 7 values: an odd count and less than one block
    q = quant.quantize_nf4(W, block_size=64)
    assert q.n_blocks == 1 and q.codes.size == 32 and q.nbytes == 32 + 4
    np.testing.assert_array_equal(quant.dequantize(q)[-1], np.float32(7.0))  # the absmax maps exactly to ±1
    assert quant.dequantize(q).shape == (7,)


def test_all_zero_block_and_float64():
    W = np.zeros((2, 8))
    W[1] = np.linspace(-3, 3, 8)
    q = quant.quantize_nf4(W, block_size=8)
    assert to_np(q.absmax)[0] == 0.0
    W_hat = quant.dequantize(q)
    assert W_hat.dtype == np.float64 and (W_hat[0] == 0).all()
    assert W_hat[1, 0] == -3.0 and W_hat[1, -1] == 3.0


@pytest.mark.parametrize("block_size", [0, 1, 3, -2, 2.5, True, "64"])
def test_bad_block_sizes_raise(block_size):
    with pytest.raises(quant.QuantizationError, match="block_size must be an even integer"):
        quant.quantize_nf4(np.ones(64), block_size=block_size)


def test_bad_weights_raise():
    with pytest.raises(quant.QuantizationError, match="floats"):
        quant.quantize_nf4(np.ones(64, dtype=np.int64))
    with pytest.raises(quant.QuantizationError, match="empty"):
        quant.quantize_nf4(np.ones((0, 4)))
    bad = np.ones(64)
    bad[3] = np.nan
    with pytest.raises(quant.QuantizationError, match="1 NaN/inf"):
        quant.quantize_nf4(bad)
    with pytest.raises(TypeError, match="NF4Tensor"):
        quant.dequantize(np.ones(4))
    with pytest.raises(quant.QuantizationError, match="dq_block_size"):
        quant.quantize_nf4(np.ones(64), double_quant=True, dq_block_size=255)


@given(st.integers(1, 2000), st.integers(0, 2**31 - 1))
def test_double_quantization(n_blocks, seed):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((n_blocks, 64)) * rng.uniform(0.01, 2.0, (n_blocks, 1))).astype(np.float32)
    q = quant.quantize_nf4(W, 64)
    q2 = quant.quantize_nf4(W, 64, double_quant=True)
    assert q2.absmax is None and q2.absmax_codes.dtype == np.int8 and q2.double_quant
    np.testing.assert_array_equal(q2.codes, q.codes)  # the 4-bit codes are those of the exact scales
    n_groups = -(-n_blocks // 256)
    assert q2.nbytes == q.codes.nbytes + n_blocks + 4 * n_groups + 4
    assert q.nbytes == q.codes.nbytes + 4 * n_blocks
    # each reconstructed scale is within half a step (group absmax / 127 / 2) of the exact one
    centred = q.absmax.astype(np.float64) - q2.absmax_offset
    step = np.repeat(q2.absmax_scales.astype(np.float64), 256)[:n_blocks] / 127
    assert (np.abs(q2.block_scales() - q.absmax) <= step / 2 + 1e-6 * np.abs(q.absmax)).all()
    assert np.abs(centred).max() <= q2.absmax_scales.max() * (1 + 1e-6)
    expected = np.array(PUBLISHED_NF4, np.float32)[quant._unpack(q.codes, 0, W.size)] * np.repeat(q2.block_scales(), 64)
    np.testing.assert_array_equal(quant.dequantize(q2).reshape(-1), expected)


def test_bits_per_value_match_the_paper():
    """4.5 bits per value with float32 scales, ~4.127 with double quantization (QLoRA, Sec. 3)."""
    W = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    bits = 8 * quant.quantize_nf4(W).nbytes / W.size
    bits_dq = 8 * quant.quantize_nf4(W, double_quant=True).nbytes / W.size
    assert bits == 4.5
    assert abs(bits_dq - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-4


def test_accepts_tensors_and_moves_backends():
    W = ml.tensor(np.random.default_rng(1).standard_normal((4, 16)), dtype="float32")
    q = quant.quantize_nf4(W, 16)
    assert q.backend == "numpy" and q.to("numpy").nbytes == q.nbytes
    np.testing.assert_array_equal(quant.dequantize(q.to("numpy")), quant.dequantize(q))
    with pytest.raises(ValueError, match="out has shape"):
        quant.dequantize(q, out=np.empty((16, 4), np.float32))


# ----------------------------------------------------------------------------- the NF4 frozen base (QLoRA)

layer_cases = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 9), st.sampled_from([2, 4, 8]),
                        st.integers(1, 40), st.booleans())


def quantized(d, k, block_size, chunk_values, dtype=np.float64, seed=0):
    W = np.random.default_rng(seed).standard_normal((d, k)).astype(dtype)
    q = quant.quantize_nf4(W, block_size)
    return QuantizedWeight(q, DequantBuffer(chunk_values)), quant.dequantize(q)


@given(layer_cases)
def test_nf4_linear_gradcheck_and_equals_the_dequantized_linear(case):
    n, k, d, block_size, chunk_values, with_bias = case
    weight, W_hat = quantized(d, k, block_size, chunk_values)
    rng = np.random.default_rng(1)
    x = ml.tensor(rng.standard_normal((n, 2, k)), requires_grad=True, dtype="float64")
    b = ml.tensor(rng.standard_normal(d), requires_grad=True, dtype="float64") if with_bias else None
    inputs = [x] + ([b] if with_bias else [])
    assert ml.gradcheck(lambda x, *b: nf4_linear(x, weight, b[0] if b else None), inputs)
    # the same numbers as autograd through primitives with the dequantized weight as a constant
    g = rng.standard_normal((n, 2, d))
    y = nf4_linear(x, weight, b)
    y.backward(g)
    dx, db = x.grad.copy(), (b.grad.copy() if with_bias else None)
    x.grad = None
    if with_bias:
        b.grad = None
    reference = x @ ml.tensor(W_hat.T) + (b if with_bias else 0.0)
    reference.backward(g)
    np.testing.assert_allclose(y.data, reference.data, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(dx, x.grad, rtol=1e-13, atol=1e-13)
    if with_bias:
        np.testing.assert_allclose(db, b.grad, rtol=1e-13, atol=1e-13)


def test_chunks_share_one_buffer():
    buffer = DequantBuffer(chunk_values=24)
    w1, W1 = quantized(10, 8, 8, 24)
    w2, W2 = quantized(6, 8, 8, 24, seed=3)
    w1.buffer = w2.buffer = buffer
    x = np.random.default_rng(0).standard_normal((5, 8))
    np.testing.assert_allclose(w1.matmul_t(x), x @ W1.T, rtol=1e-13)
    np.testing.assert_allclose(w2.matmul_t(x), x @ W2.T, rtol=1e-13)
    assert buffer.nbytes == 24 * 8  # chunks of 3 rows of 8 float64 values, reused by both layers
    g = np.random.default_rng(1).standard_normal((5, 10))
    np.testing.assert_allclose(w1.matmul(g), g @ W1, rtol=1e-13)


def tiny_gpt(dtype="float32"):
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, d_model=64, dropout=0.0))
    return model.to(dtype=dtype)


def test_quantize_base_on_a_frozen_gpt_matches_dequantized_weights_and_reports_bytes():
    model, reference = tiny_gpt(), tiny_gpt()
    reference.load_state_dict(model.state_dict())
    model.requires_grad_(False)
    report = lora.quantize_base(model, "nf4", block_size=64)
    linear_names = [n for n, p in reference.named_parameters() if p.ndim == 2 and n.startswith("blocks.")]
    assert report.layers == [n.removesuffix(".weight") for n in linear_names]
    for name in linear_names:
        p = dict(reference.named_parameters())[name]
        p.data[...] = quant.dequantize(quant.quantize_nf4(p.data, 64))
    idx = np.random.default_rng(0).integers(0, 32, (2, 16))
    np.testing.assert_allclose(to_np(model(idx)), to_np(reference(idx)), rtol=1e-5, atol=1e-6)
    n = sum(dict(reference.named_parameters())[name].size for name in linear_names)
    assert report.values == n and report.original_bytes == 4 * n
    assert report.nf4_bytes == n // 2 + 4 * (n // 64)  # 4.5 bits per value
    sizes = [dict(reference.named_parameters())[name].size for name in linear_names]  # each layer: its own scales
    assert report.nf4_double_quant_bytes == sum(s // 2 + s // 64 + 4 * -(-(s // 64) // 256) + 4 for s in sizes)
    assert report.nf4_double_quant_bytes == sum(quant.quantize_nf4(np.ones(s), double_quant=True).nbytes for s in sizes)
    assert "4.500 bits/value" in str(report)
    assert not any(name in dict(model.named_parameters()) for name in linear_names)  # no longer Parameters


@pytest.mark.parametrize("adapted", [False, True])
def test_saving_a_model_with_an_nf4_base_is_refused_before_any_file_is_written(tmp_path, adapted):
    """W0 in NF4 is in no state_dict: save_model / hf.save_gpt2 would write a file without it."""
    from minilora import hf
    from minilora.models import save_model

    model = tiny_gpt()
    if adapted:  # LoRALinear over a QuantizedWeight (QLoRA), not only NF4Linear
        lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4.0, target_modules=("q", "v")))
        lora.mark_only_lora_as_trainable(model)
    else:
        model.requires_grad_(False)
    save_model(model, tmp_path / "before.safetensors", tmp_path / "before.json")  # a float base saves
    lora.quantize_base(model)
    match = r"the base is NF4-quantized \(blocks\.0\.attn\.q and \d+ more .*before lora\.quantize_base"
    with pytest.raises(ValueError, match=r"save_model\(.*" + match):
        save_model(model, tmp_path / "m.safetensors", tmp_path / "m.json")
    with pytest.raises(ValueError, match=r"save_gpt2\(.*" + match):
        hf.save_gpt2(tmp_path / "hf", model)
    assert sorted(os.listdir(tmp_path)) == ["before.json", "before.safetensors"]  # nothing half-written


def test_quantize_base_refuses_clearly():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="mark_only_lora_as_trainable"):
        lora.quantize_base(model)  # nothing is frozen
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        lora.quantize_base(model, "int3")
    with pytest.raises(quant.QuantizationError, match="block_size"):
        lora.quantize_base(model, block_size=63)
    assert "blocks.0.attn.q.weight" in dict(model.named_parameters())  # a refusal changes nothing


class _ProductsWeight:
    """A W₀ that is no array: it answers x·W₀ᵀ, g·W₀ and ‖W₀_i‖² (the weight protocol), and counts the calls."""

    requires_grad = False

    def __init__(self, W):
        self.W, self.shape, self.dtype, self.calls = W, W.shape, W.dtype, []

    def matmul_t(self, x):
        self.calls.append("matmul_t")
        return x @ self.W.T

    def matmul(self, g):
        self.calls.append("matmul")
        return g @ self.W

    def row_norms_sq(self):
        self.calls.append("row_norms_sq")
        return (self.W * self.W).sum(axis=1)


@pytest.mark.parametrize("dora", [False, True])
def test_the_lora_ops_compute_with_any_weight_of_the_protocol(dora):
    """lora_linear / dora_linear on a weight object with matmul_t / matmul equal them on its array."""
    rng = np.random.default_rng(3)
    W, b = rng.standard_normal((5, 4)), rng.standard_normal(5)
    x0, A0, B0, m0, up = (rng.standard_normal(s) for s in ((2, 3, 4), (2, 4), (5, 2), (5,), (2, 3, 5)))
    outs = []
    for weight in (ml.tensor(W, dtype="float64"), _ProductsWeight(W)):
        x, A, Bm, m = (ml.tensor(a, requires_grad=True, dtype="float64") for a in (x0, A0, B0, m0))
        bias = ml.tensor(b, requires_grad=True, dtype="float64")
        if dora:
            h = lora.dora_linear(x, weight, bias, A, Bm, m, 0.5)
        else:
            h = lora.lora_linear(x, weight, bias, A, Bm, 0.5)
        h.backward(up)  # a random upstream gradient
        outs.append([to_np(h)] + [to_np(t.grad) for t in (x, A, Bm, bias) + ((m,) if dora else ())])
    for got, want in zip(outs[1], outs[0]):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert {"matmul_t", "matmul"} | ({"row_norms_sq"} if dora else set()) <= set(weight.calls)
