"""Specs of minilora.analysis: subspace similarity φ (Sec. 7.2, eq. 4) and amplification (Sec. 7.3, Table 7)."""

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minilora as ml
from minilora import analysis


# ----------------------------------------------------------------------------- strategies
@st.composite
def gaussian_matrix(draw, rows, cols):
    """A Gaussian matrix: full rank, with distinct singular values (almost surely; checked)."""
    seed = draw(st.integers(0, 2**32 - 1))
    m = np.random.default_rng(seed).standard_normal((rows, cols))
    s = np.linalg.svd(m, compute_uv=False)
    assume(s[-1] > 1e-3 * s[0])  # well conditioned
    assume(np.all(np.diff(s) < -1e-3 * s[0]))  # distinct: the top-i subspaces are well defined
    return m


@st.composite
def two_lora_As(draw, max_r=6, max_k=10):
    """Two LoRA A matrices (r1, k) and (r2, k) of one layer."""
    k = draw(st.integers(2, max_k))
    r1 = draw(st.integers(1, min(max_r, k)))
    r2 = draw(st.integers(1, min(max_r, k)))
    return draw(gaussian_matrix(r1, k)), draw(gaussian_matrix(r2, k))


any_values = st.floats(-10, 10, allow_nan=False, width=64)


@st.composite
def arbitrary_As(draw):
    """Any two (r, k) matrices, including rank-deficient ones (zeros, repeated rows)."""
    k = draw(st.integers(1, 8))
    r1, r2 = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    a1 = draw(hnp.arrays(np.float64, (r1, k), elements=any_values))
    a2 = draw(hnp.arrays(np.float64, (r2, k), elements=any_values))
    return a1, a2


def projector_onto_top(A, i):
    """An independent route to the top-i right-singular subspace: eigenvectors of AᵀA."""
    _eigenvalues, eigenvectors = np.linalg.eigh(A.T @ A)  # ascending
    top = eigenvectors[:, ::-1][:, :i]
    return top @ top.T


# ----------------------------------------------------------------------------- φ
@given(arbitrary_As(), st.data())
def test_phi_lies_in_unit_interval(As, data):
    a1, a2 = As
    n1, n2 = min(a1.shape), min(a2.shape)
    i, j = data.draw(st.integers(1, n1)), data.draw(st.integers(1, n2))
    phi = analysis.subspace_similarity(a1, a2, i, j)
    assert -1e-12 <= phi <= 1 + 1e-12


@given(two_lora_As(), st.data())
def test_phi_equals_direct_computation(As, data):
    a1, a2 = As
    i, j = data.draw(st.integers(1, a1.shape[0])), data.draw(st.integers(1, a2.shape[0]))
    expected = np.trace(projector_onto_top(a1, i) @ projector_onto_top(a2, j)) / min(i, j)
    assert analysis.subspace_similarity(a1, a2, i, j) == pytest.approx(expected, abs=1e-9)


@given(two_lora_As(), st.data())
def test_phi_is_symmetric(As, data):
    a1, a2 = As
    i, j = data.draw(st.integers(1, a1.shape[0])), data.draw(st.integers(1, a2.shape[0]))
    assert analysis.subspace_similarity(a1, a2, i, j) == pytest.approx(analysis.subspace_similarity(a2, a1, j, i), abs=1e-12)


@given(arbitrary_As(), st.data())
def test_phi_of_a_matrix_with_itself_is_one(As, data):
    a, _ = As
    n = min(a.shape)
    i, j = data.draw(st.integers(1, n)), data.draw(st.integers(1, n))
    assert analysis.subspace_similarity(a, a, i, j) == pytest.approx(1.0, abs=1e-12)


@given(st.integers(1, 5), st.integers(0, 6), st.data())
def test_phi_is_one_for_the_same_row_space(r, extra, data):
    """M·A has A's row space for any invertible M, so φ(A, MA, r, r) = 1."""
    a = data.draw(gaussian_matrix(r, r + extra))
    seed = data.draw(st.integers(0, 2**32 - 1))
    m = np.random.default_rng(seed).standard_normal((r, r))
    assume(np.linalg.cond(m) < 1e4)
    assert analysis.subspace_similarity(a, m @ a, r, r) == pytest.approx(1.0, abs=1e-9)


def test_phi_of_orthogonal_subspaces_is_zero():
    eye = np.eye(6)
    assert analysis.subspace_similarity(eye[:2], eye[2:5], 2, 3) == pytest.approx(0.0, abs=1e-15)


def test_phi_accepts_tensors_and_lists():
    a = np.random.default_rng(0).standard_normal((3, 5))
    expected = analysis.subspace_similarity(a, a[::-1] * 2, 2, 3)
    assert analysis.subspace_similarity(ml.tensor(a), (a[::-1] * 2).tolist(), 2, 3) == pytest.approx(expected, abs=1e-6)


@given(two_lora_As())
def test_grid_matches_pointwise_and_is_monotone_past_the_diagonal(As):
    a1, a2 = As
    grid = analysis.subspace_similarity_grid(a1, a2)
    assert grid.shape == (a1.shape[0], a2.shape[0])
    for i in range(1, a1.shape[0] + 1):
        for j in range(1, a2.shape[0] + 1):
            assert grid[i - 1, j - 1] == pytest.approx(analysis.subspace_similarity(a1, a2, i, j), abs=1e-12)
        # for j ≥ i the denominator min(i, j) = i is fixed and the overlap only grows
        row = grid[i - 1, i - 1 :]
        assert np.all(np.diff(row) >= -1e-12)
    if a2.shape[0] == a2.shape[1]:  # A2's vectors span all of R^k: everything of A1 is inside
        np.testing.assert_allclose(grid[:, -1], 1.0, atol=1e-12)


@pytest.mark.parametrize(
    "i, j, message",
    [(0, 1, "i=0 is out of range"), (4, 1, r"1\.\.3"), (1, 6, "j=6"), (1, -1, "j=-1")],
)
def test_phi_rejects_bad_indices(i, j, message):
    a1, a2 = np.ones((3, 8)), np.ones((5, 8))
    with pytest.raises(ValueError, match=message):
        analysis.subspace_similarity(a1, a2, i, j)


def test_phi_rejects_bad_inputs():
    with pytest.raises(TypeError, match="integer"):
        analysis.subspace_similarity(np.ones((2, 4)), np.ones((2, 4)), 1.5, 1)
    with pytest.raises(ValueError, match="different sizes"):
        analysis.subspace_similarity(np.ones((2, 4)), np.ones((2, 5)), 1, 1)
    with pytest.raises(ValueError, match="2-D"):
        analysis.subspace_similarity(np.ones(4), np.ones((2, 4)), 1, 1)


# ----------------------------------------------------------------------------- amplification
@given(st.integers(2, 8), st.integers(2, 8), st.floats(0.1, 100.0), st.booleans(), st.data())
def test_amplification_of_ws_own_top_direction(d, k, c, negative, data):
    """ΔW = c·u₁v₁ᵀ with (u₁, σ₁, v₁) W's top singular triple: ‖UᵀWVᵀ‖ = σ₁, factor = |c|/σ₁."""
    w = data.draw(gaussian_matrix(d, k))
    u, s, vh = np.linalg.svd(w)
    c = -c if negative else c
    delta_w = c * np.outer(u[:, 0], vh[0])
    assert analysis.projection_norm(delta_w, w, 1) == pytest.approx(s[0], rel=1e-10)
    assert analysis.amplification_factor(delta_w, w, 1) == pytest.approx(abs(c) / s[0], rel=1e-10)


@given(st.integers(2, 8), st.integers(2, 8), st.data())
def test_projection_norm_equals_direct_computation(d, k, data):
    r = data.draw(st.integers(1, min(d, k)))
    w = data.draw(gaussian_matrix(d, k))
    b, a = data.draw(gaussian_matrix(d, r)), data.draw(gaussian_matrix(r, k))
    delta_w = b @ a  # rank r, as a LoRA update
    u, _, vh = np.linalg.svd(delta_w)
    expected = np.sqrt(np.sum((u[:, :r].T @ w @ vh[:r].T) ** 2))
    assert analysis.projection_norm(delta_w, w, r) == pytest.approx(expected, rel=1e-9)
    factor = analysis.amplification_factor(delta_w, w, r)
    assert factor == pytest.approx(np.linalg.norm(delta_w) / expected, rel=1e-9)
    assert analysis.amplification_factor(3.0 * delta_w, w, r) == pytest.approx(3.0 * factor, rel=1e-9)
    # W's own top-r subspace holds the most of W: √(σ₁² + … + σ_r²), the "W_q" column of Table 7
    s = np.linalg.svd(w, compute_uv=False)
    assert analysis.projection_norm(w, w, r) == pytest.approx(np.sqrt(np.sum(s[:r] ** 2)), rel=1e-10)
    assert expected <= np.sqrt(np.sum(s[:r] ** 2)) * (1 + 1e-9)


def test_random_projection_norm_is_seeded_and_matches_its_expectation():
    w = np.random.default_rng(0).standard_normal((12, 10))
    r = 3
    assert analysis.random_projection_norm(w, r, seed=5) == analysis.random_projection_norm(w, r, seed=5)
    assert analysis.random_projection_norm(w, r, seed=5) != analysis.random_projection_norm(w, r, seed=6)
    mean_square = np.mean([analysis.random_projection_norm(w, r, seed=s) ** 2 for s in range(300)])
    expected = r * r * np.sum(w * w) / (w.shape[0] * w.shape[1])  # E‖UᵀWVᵀ‖² for Haar U, V
    assert mean_square == pytest.approx(expected, rel=0.15)


def test_amplification_report_and_edge_cases():
    rng = np.random.default_rng(1)
    w, delta_w = rng.standard_normal((8, 6)), rng.standard_normal((8, 2)) @ rng.standard_normal((2, 6))
    row = analysis.amplification_report(ml.tensor(delta_w, dtype="float64"), w, 2, seed=3)
    assert row["amplification_factor"] == pytest.approx(analysis.amplification_factor(delta_w, w, 2))
    assert row["projection_delta_W"] == pytest.approx(analysis.projection_norm(delta_w, w, 2))
    assert row["projection_random"] == analysis.random_projection_norm(w, 2, seed=3)
    assert row["norm_W"] == pytest.approx(np.linalg.norm(w)) and row["r"] == 2
    assert row["projection_W"] >= row["projection_delta_W"]
    # W orthogonal to ΔW's subspace: nothing to amplify from, the factor is infinite
    e = np.eye(4)
    assert analysis.amplification_factor(np.outer(e[0], e[0]), np.outer(e[1], e[1]), 1) == float("inf")
    with pytest.raises(ValueError, match="same shape"):
        analysis.amplification_factor(np.ones((3, 4)), np.ones((4, 3)), 1)
    with pytest.raises(ValueError, match="r=5"):
        analysis.projection_norm(np.ones((3, 4)), np.ones((3, 4)), 5)
    with pytest.raises(ValueError, match="r=0"):
        analysis.random_projection_norm(np.ones((3, 4)), 0)


# ----------------------------------------------------------------------------- the change of the weight
@pytest.mark.parametrize("variant", [{}, {"init": "pissa"}, {"use_dora": True}])
def test_weight_change_is_what_merging_the_adapter_does_to_the_original_weight(variant):
    """ΔW = W_merged − W0 for LoRA (s·B·A), PiSSA (s·B·A − U_r S_r V_rᵀ) and DoRA (m·V/‖V‖_row − W0)."""
    from minilora import lora
    from minilora.hf.commands import weight_change as from_hf
    from minilora.models import GPT, GPTConfig

    ml.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, d_model=8)).to(dtype="float64")
    W0 = ml.backend.to_numpy(model.blocks[0].attn.q.weight.data).copy()
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=3.0, target_modules=("q",), **variant))
    layer = model.blocks[0].attn.q
    rng = np.random.default_rng(4)
    layer.lora_B["default"].data[...] = rng.standard_normal(layer.lora_B["default"].shape)  # "trained"
    if "use_dora" in variant:
        layer.lora_magnitude["default"].data[...] *= 1.0 + 0.1 * rng.standard_normal(W0.shape[0])
    a, b = (ml.backend.to_numpy(p["default"].data) for p in (layer.lora_A, layer.lora_B))
    magnitude = ml.backend.to_numpy(layer.lora_magnitude["default"].data) if "use_dora" in variant else None
    scaling = lora.get_adapter_config(model, "default").scaling  # alpha / r = 1.5
    delta = analysis.weight_change(a, b, scaling, W0, variant.get("init", "kaiming"), magnitude)
    lora.merge(model)
    np.testing.assert_allclose(delta, ml.backend.to_numpy(layer.weight.data) - W0, rtol=0, atol=1e-12)
    assert from_hf is analysis.weight_change
