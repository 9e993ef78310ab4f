"""The paper's Section 7 analyses: subspace similarity (Sec. 7.2) and amplification (Sec. 7.3).

These run on the host, in float64 NumPy, after ``backend.to_numpy``. Their inputs are small
matrices such as a LoRA ``A`` of shape (r, k), or a d × k weight. They take NumPy or CuPy
arrays or Tensors.

- ``subspace_similarity(A1, A2, i, j)`` gives φ of eq. 4, and ``subspace_similarity_grid``
  gives φ for every (i, j), for heatmaps like Figs. 3 and 4.
- ``low_rank_svd(lora_B, lora_A, scaling)`` gives the SVD of ΔW = s·B·A without forming the d × k
  matrix: its singular values are the spectrum that ``minilora analyze`` prints, and
  ``energy_share`` / ``effective_rank`` say how much of ‖ΔW‖² its top directions hold.
- ``amplification_factor(delta_W, W, r)`` gives ‖ΔW‖_F / ‖UᵀWVᵀ‖_F of Table 7. Its pieces are
  ``projection_norm`` and ``random_projection_norm``, and ``amplification_report`` returns
  the whole Table 7 row. ``low_rank_amplification(lora_B, lora_A, scaling, W)`` gives the same
  factor from B and A, reading W in row blocks (a 4096-wide W costs one copy of W, no d × k SVD).
- ``weight_change(lora_A, lora_B, scaling, W0, init, magnitude)`` gives the dense ΔW = W − W0 that
  an adapter makes: s·B·A for plain LoRA, the real change for PiSSA and DoRA, where s·B·A is not it.
"""

from __future__ import annotations

import operator

import numpy as np

from . import backend as bk
from .lora.dora import dora_weight

__all__ = [
    "amplification_factor",
    "amplification_report",
    "effective_rank",
    "energy_share",
    "low_rank_amplification",
    "low_rank_projection_norm",
    "low_rank_svd",
    "projection_norm",
    "random_projection_norm",
    "right_singular_vectors",
    "subspace_similarity",
    "subspace_similarity_grid",
    "weight_change",
]


def _matrix(x, what: str) -> np.ndarray:
    a = np.asarray(bk.to_numpy(x), dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{what} must be a 2-D matrix, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} has NaN or inf entries")
    return a


def _index(value, name: str, upper: int, why: str) -> int:
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if isinstance(value, bool) or not 1 <= n <= upper:
        raise ValueError(f"{name}={value!r} is out of range: {why}, so {name} must lie in 1..{upper}")
    return n


def right_singular_vectors(A) -> np.ndarray:
    """The right-singular vectors of ``A`` (r, k) as rows, in order of decreasing singular value.

    The result has shape (min(r, k), k) and orthonormal rows. If A = U Σ Vᵀ, these are the
    rows of Vᵀ, the directions in the input space R^k that A reads. When two singular values
    are equal (or zero), the vectors inside that group are not unique. Only the subspace
    they span is.
    """
    _, _, vh = np.linalg.svd(_matrix(A, "A"), full_matrices=False)
    return vh


def _pair_of_As(A1, A2) -> tuple[np.ndarray, np.ndarray, tuple, tuple]:
    """Right-singular vectors of A1 and A2 (rows), and the two shapes."""
    a1, a2 = _matrix(A1, "A1"), _matrix(A2, "A2")
    if a1.shape[1] != a2.shape[1]:
        raise ValueError(
            f"A1 {a1.shape} and A2 {a2.shape} act on inputs of different sizes ({a1.shape[1]} vs {a2.shape[1]}); "
            "compare LoRA A matrices (r, k) of the same weight, e.g. lora_A of two runs of one layer"
        )
    return right_singular_vectors(a1), right_singular_vectors(a2), a1.shape, a2.shape


def subspace_similarity(A1, A2, i: int, j: int) -> float:
    """φ(A1, A2, i, j) = ‖U₁ⁱᵀ U₂ʲ‖²_F / min(i, j)   (Sec. 7.2, eq. 4).

    U₁ⁱ holds the top-i right-singular vectors of A1 (r1 × k) and U₂ʲ the top-j of A2
    (r2 × k), so Uⁱ is k × i. φ is the overlap of the two subspaces. It is 1 when the
    smaller subspace lies inside the larger, and 0 when they are orthogonal, so φ ∈ [0, 1]
    up to rounding. Equivalently, φ is the mean squared cosine of the principal angles
    between the subspaces. The paper compares A_{r=8} with A_{r=64} of the same layer (Fig. 3)
    and two random seeds (Fig. 4).

    i must lie in 1..min(r1, k) and j in 1..min(r2, k). Otherwise a ValueError names the range.
    """
    v1, v2, shape1, shape2 = _pair_of_As(A1, A2)
    i = _index(i, "i", v1.shape[0], f"A1 has shape {shape1} and so {v1.shape[0]} right-singular vectors")
    j = _index(j, "j", v2.shape[0], f"A2 has shape {shape2} and so {v2.shape[0]} right-singular vectors")
    overlap = v1[:i] @ v2[:j].T  # (i, j): cosines between the basis vectors
    return float(np.sum(overlap * overlap) / min(i, j))


def subspace_similarity_grid(A1, A2) -> np.ndarray:
    """φ(A1, A2, i, j) for every i ≤ r1 and j ≤ r2, as an (r1, r2) float64 array.

    ``grid[i - 1, j - 1]`` is φ(A1, A2, i, j), which is the heatmap of Figs. 3 and 4. The
    squared cosines C² = (V₁V₂ᵀ)² are summed cumulatively in both directions and divided by
    min(i, j). Here r means min(r, k), the number of right-singular vectors.
    """
    v1, v2, _, _ = _pair_of_As(A1, A2)
    cos2 = v1 @ v2.T
    cos2 *= cos2  # (r1, r2): squared cosines
    overlap = cos2.cumsum(axis=0).cumsum(axis=1)  # overlap[i-1, j-1] = ‖U₁ⁱᵀU₂ʲ‖²_F
    i = np.arange(1, v1.shape[0] + 1)[:, None]
    j = np.arange(1, v2.shape[0] + 1)[None, :]
    return overlap / np.minimum(i, j)


# ----------------------------------------------------------------------------- Sec. 7.3
def _pair_of_weights(delta_W, W, r) -> tuple[np.ndarray, np.ndarray, int]:
    dw, w = _matrix(delta_W, "delta_W"), _matrix(W, "W")
    if dw.shape != w.shape:
        raise ValueError(f"delta_W {dw.shape} and W {w.shape} must have the same shape (d, k)")
    r = _index(r, "r", min(w.shape), f"W has shape {w.shape}")
    return dw, w, r


def _project(w: np.ndarray, u: np.ndarray, vh: np.ndarray) -> float:
    """‖Uᵀ W Vᵀ‖_F for U (d, r) and V (r, k) with orthonormal columns and rows."""
    return float(np.linalg.norm(u.T @ w @ vh.T))


def projection_norm(delta_W, W, r: int) -> float:
    """‖Uᵀ W Vᵀ‖_F, where U (d × r) and V (r × k) are the top-r left and right singular vectors of ΔW (Sec. 7.3).

    This measures how much of W lies in the r-dimensional subspace that ΔW acts on. Table 7
    lists it as the "ΔW_q" column. ``projection_norm(W, W, r)`` gives the "W_q" column, which
    is √(σ₁² + … + σ_r²) of W.
    """
    dw, w, r = _pair_of_weights(delta_W, W, r)
    u, _, vh = np.linalg.svd(dw, full_matrices=False)
    return _project(w, u[:, :r], vh[:r])


def random_projection_norm(W, r: int, seed: int = 0) -> float:
    """‖Uᵀ W Vᵀ‖_F for a random r-dimensional U (d × r) and V (r × k) (the "Random" column of Table 7).

    U and V are orthonormal bases, drawn uniformly (Haar) as the Q factors of Gaussian
    matrices, with ``numpy.random.default_rng(seed)``. In expectation
    ‖UᵀWVᵀ‖²_F = r²‖W‖²_F / (d·k). A baseline this small is why the ΔW row stands out.
    """
    w = _matrix(W, "W")
    r = _index(r, "r", min(w.shape), f"W has shape {w.shape}")
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((w.shape[0], r)))
    v, _ = np.linalg.qr(rng.standard_normal((w.shape[1], r)))
    return _project(w, u, v.T)


def amplification_factor(delta_W, W, r: int) -> float:
    """‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F, with U, V the top-r singular vectors of ΔW (Sec. 7.3, Table 7).

    This is how much ΔW amplifies the directions of W that it acts on. The paper finds
    ≈ 21.5 for r = 4 in GPT-3's layer 48. Those directions are not W's top singular
    directions; they are ones that W under-emphasises. Pass the update that is actually
    added to W₀: ΔW = (α/r)·B·A. The scaling leaves U and V unchanged but multiplies the factor.
    The result is ``inf`` when W has nothing in ΔW's subspace, and ``nan`` when ΔW = 0 as well.
    """
    dw, w, r = _pair_of_weights(delta_W, W, r)
    return _factor(float(np.linalg.norm(dw)), projection_norm(dw, w, r))


def _factor(norm_delta_W: float, projection: float) -> float:
    """‖ΔW‖_F / ‖UᵀWVᵀ‖_F; ``inf`` when W has nothing in ΔW's subspace, ``nan`` when ΔW = 0 as well."""
    if projection == 0.0:
        return float("nan") if norm_delta_W == 0.0 else float("inf")
    return norm_delta_W / projection


def amplification_report(delta_W, W, r: int, seed: int = 0) -> dict:
    """One row of Table 7: the three projections of W, the two norms, and the factor.

    Keys: ``r``, ``projection_delta_W`` (‖UᵀWVᵀ‖_F on ΔW's subspace), ``projection_W`` (on
    W's own top-r subspace), ``projection_random`` (on a random one, ``seed``), ``norm_W``
    (‖W‖_F), ``norm_delta_W`` (‖ΔW‖_F) and ``amplification_factor``. All values are Python
    floats.
    """
    dw, w, r = _pair_of_weights(delta_W, W, r)
    return {
        "r": r,
        "projection_delta_W": projection_norm(dw, w, r),
        "projection_W": projection_norm(w, w, r),
        "projection_random": random_projection_norm(w, r, seed),
        "norm_W": float(np.linalg.norm(w)),
        "norm_delta_W": float(np.linalg.norm(dw)),
        "amplification_factor": amplification_factor(dw, w, r),
    }


# ----------------------------------------------------------------------------- the spectrum of ΔW
def low_rank_svd(lora_B, lora_A, scaling: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The thin SVD (U (d, r), S (r,), Vh (r, k)) of ΔW = s·B·A, from B (d, r) and A (r, k), in float64.

    ΔW is never formed: with B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), ΔW = Q_B (s·R_B R_Aᵀ) Q_Aᵀ,
    so the SVD of the r × r core gives ΔW's. The cost is O((d + k)·r²), not O(d·k·r). S holds
    the r singular values in decreasing order (zeros where B A has rank below r); ‖ΔW‖_F = ‖S‖.
    """
    b, a = _matrix(lora_B, "lora_B"), _matrix(lora_A, "lora_A")
    if b.shape[1] != a.shape[0]:
        raise ValueError(f"lora_B {b.shape} and lora_A {a.shape} disagree on the rank r (B is (d, r), A is (r, k))")
    q_b, r_b = np.linalg.qr(b)
    q_a, r_a = np.linalg.qr(a.T)
    u, s, vh = np.linalg.svd(float(scaling) * (r_b @ r_a.T))
    return q_b @ u, s, vh @ q_a.T


def energy_share(singular_values, norm=None) -> np.ndarray:
    """share_k = (σ₁² + … + σ_k²) / ‖ΔW‖²_F for k = 1..len(σ): the part of ΔW its top-k directions hold.

    ``singular_values`` in decreasing order (as ``low_rank_svd`` gives them). ‖ΔW‖_F is ‖σ‖ for a
    low-rank ΔW whose every σ is given (the last share is then 1); pass ``norm`` = ‖ΔW‖_F when the
    σ are only the top ones of a full-rank ΔW. A zero ΔW has no directions: its shares are all 0.
    """
    energy = np.cumsum(np.asarray(singular_values, dtype=np.float64) ** 2)
    total = float(norm) ** 2 if norm is not None else (float(energy[-1]) if energy.size else 0.0)
    if total == 0.0:
        return np.zeros_like(energy)
    return energy / total


def effective_rank(singular_values, share: float = 0.9, norm=None):
    """The smallest k whose top-k directions hold at least ``share`` of ‖ΔW‖²_F (0 for ΔW = 0).

    Sec. 7.2 finds that the top direction of A already carries most of what matters: k = 1 for a
    ΔW whose first singular value dominates, k = r for a flat spectrum. None when the σ given
    (the top ones of a full-rank ΔW, with ``norm``) do not reach ``share``.
    """
    shares = energy_share(singular_values, norm)
    if shares.size == 0 or shares[-1] == 0.0:
        return 0
    k = int(np.searchsorted(shares, share - 1e-12)) + 1
    return k if k <= shares.size else None


def low_rank_projection_norm(U, Vh, W, block_elements: int = 1 << 16) -> float:
    """‖Uᵀ W Vᵀ‖_F for U (d, r), Vh (r, k) and W (d, k), with W read a block of rows at a time.

    Uᵀ W Vᵀ = Σ_blocks U[rows]ᵀ W[rows] Vᵀ, so W is converted to float64 one block of about
    ``block_elements`` entries at a time and never copied whole: W can be a float32 or float16
    array, or a view (the transpose of a Conv1D weight). The (r, k) partial sum is all that is kept.
    """
    u, vh = _matrix(U, "U"), _matrix(Vh, "Vh")
    if W.ndim != 2 or W.shape != (u.shape[0], vh.shape[1]):
        raise ValueError(f"W {tuple(W.shape)} must have the shape (d, k) = ({u.shape[0]}, {vh.shape[1]}) of U Vh")
    partial = np.zeros((u.shape[1], W.shape[1]))  # (r, k): Uᵀ W
    block_rows = max(1, block_elements // max(1, W.shape[1]))
    for start in range(0, W.shape[0], block_rows):
        rows = np.asarray(bk.to_numpy(W[start:start + block_rows]), dtype=np.float64)
        if not np.all(np.isfinite(rows)):
            raise ValueError(f"W has NaN or inf entries (in rows {start}..{start + rows.shape[0] - 1})")
        partial += u[start:start + block_rows].T @ rows
        del rows  # before the next block is read: one block alive at a time
    return float(np.linalg.norm(partial @ vh.T))


def low_rank_amplification(lora_B, lora_A, scaling, W) -> float:
    """``amplification_factor(s·B·A, W, r)`` from B (d, r) and A (r, k), without forming ΔW (Table 7).

    U and V are the r singular vectors of ΔW from ``low_rank_svd``, and ‖ΔW‖_F = ‖S‖, so the only
    d × k array touched is W itself, in row blocks (``low_rank_projection_norm``). ``inf`` when W
    has nothing in ΔW's subspace, ``nan`` when ΔW = 0 as well.
    """
    u, s, vh = low_rank_svd(lora_B, lora_A, scaling)
    return _factor(float(np.linalg.norm(s)), low_rank_projection_norm(u, vh, W))


# ----------------------------------------------------------------------------- the change of the weight
def weight_change(lora_A, lora_B, scaling: float, W0, init: str = "kaiming", magnitude=None) -> np.ndarray:
    """The change ΔW = W − W0 of the original weight W0 that the adapter makes (dense, float64).

    Plain LoRA: s·B·A. PiSSA (``init="pissa"``) trains on the residual W_res = W0 − U_r S_r V_rᵀ
    (the top-r SVD of W0 is where A and B start), so ΔW = W_res + s·B·A − W0 = s·B·A − U_r S_r V_rᵀ,
    rank ≤ 2r and 0 for an untrained adapter (the same update as ``lora.pissa_to_lora``'s rank-2r
    LoRA). DoRA (``magnitude`` m per output row): W = m·V/‖V‖_row with V = W_base + s·B·A, so
    ΔW = m·V/‖V‖_row − W0, in general of full rank.
    """
    w0 = np.asarray(W0, np.float64)
    used = w0
    if init == "pissa":
        U, S, Vt = np.linalg.svd(w0, full_matrices=False)
        r = lora_A.shape[0]
        used = w0 - (U[:, :r] * S[:r]) @ Vt[:r]
    V = used + scaling * (np.asarray(lora_B, np.float64) @ np.asarray(lora_A, np.float64))
    if magnitude is not None:
        V = dora_weight(V, np.asarray(magnitude))
    return V - w0
