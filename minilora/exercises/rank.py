"""Exercises of tutorial 06 (what rank?): the subspace similarity φ of eq. 4, and its random baseline."""

from __future__ import annotations

import math

from ..analysis import subspace_similarity
from .harness import Wrong, as_number, call, exercise, known_mistake, num, register, rng, side

__all__ = ["check_subspace_similarity", "check_random_subspace_baseline"]

register(
    "06.1", "subspace similarity φ (eq. 4)", "check_subspace_similarity",
    paper="eq. 4, φ(A₁, A₂, i, j) = ‖U₁ⁱᵀ U₂ʲ‖²_F / min(i, j) (Sec. 7.2, Fig. 3)",
    hints=("U are the RIGHT singular vectors of A (they live in R^k, like the input x): the rows of Vᵀ from "
           "np.linalg.svd(A, full_matrices=False). Take the top i of A1 and the top j of A2, then apply eq. 4.",
           "φ = ‖U₁ⁱᵀ U₂ʲ‖²_F / min(i, j) = np.sum((V1[:i] @ V2[:j].T) ** 2) / min(i, j), with V = the Vᵀ of the SVD."),
    solution='''
    def solution_phi(A1, A2, i, j):
        U1 = np.linalg.svd(A1, full_matrices=False)[2][:i]   # top-i right-singular vectors, as rows (i, k)
        U2 = np.linalg.svd(A2, full_matrices=False)[2][:j]   # (j, k)
        return float(np.sum((U1 @ U2.T) ** 2) / min(i, j))
    ''')

register(
    "06.2", "φ of random subspaces", "check_random_subspace_baseline",
    paper="Sec. 7.2, Fig. 4: φ of random subspaces, the baseline",
    hints=("‖U₁ⁱᵀU₂ʲ‖²_F adds up one squared cosine per pair (a unit vector of one subspace, one of the other). "
           "How many pairs are there, and what is each one's mean? Then φ divides by min(i, j).",
           "each of the i·j squared cosines has mean 1/k, so E‖U₁ⁱᵀU₂ʲ‖²_F = i·j/k, and E[φ] = i·j/(k·min(i, j)) "
           "= max(i, j)/k."),
    solution='''
    def solution_baseline(i, j, k):
        return max(i, j) / k          # i·j squared cosines of mean 1/k, divided by min(i, j)

    # Check it by simulation: np.mean([ml.analysis.subspace_similarity(np.random.randn(2, 128),
    #     np.random.randn(8, 128), 2, 8) for _ in range(200)]) is close to 8/128 = 0.0625.
    ''')


@exercise("06.1")
def check_subspace_similarity(fn) -> str:
    """fn(A1, A2, i, j) -> φ(A1, A2, i, j) = ‖U₁ⁱᵀ U₂ʲ‖²_F / min(i, j) on the right-singular vectors of A.

    Compared with ``minilora.analysis.subspace_similarity``.
    """
    r = rng(0)
    A1, A2 = r.standard_normal((4, 10)), r.standard_normal((8, 10))
    A2[:2] += 3 * A1[:2]  # some shared directions, so φ is neither ~0 nor 1
    for i, j in ((1, 1), (2, 5), (4, 8), (3, 2)):
        got = as_number(call(fn, {"A1": A1.copy(), "A2": A2.copy(), "i": i, "j": j}), "φ")
        expected = subspace_similarity(A1, A2, i, j)
        if not math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9):
            why = known_mistake(got, [(min(i, j) * expected, "That is min(i, j) × φ: did you forget to divide by "
                                                             "min(i, j)?")], rel_tol=1e-6)
            raise Wrong(f"φ(A1, A2, i={i}, j={j}) with A1 {A1.shape}, A2 {A2.shape}: you give {num(got)}, "
                        f"{side(got, expected, 'larger', 'smaller')} than φ.{why} "
                        "Remember: U holds the RIGHT singular vectors.")
    return "equal to analysis.subspace_similarity for four (i, j)"


@exercise("06.2")
def check_random_subspace_baseline(fn) -> str:
    """fn(i, j, k) -> E[φ] for a random i-dimensional and a random j-dimensional subspace of R^k."""
    for i, j, k in ((1, 1, 128), (8, 64, 128), (4, 2, 16), (3, 3, 12288)):
        value = as_number(call(fn, {"i": i, "j": j, "k": k}), "E[φ]")
        expected = max(i, j) / k
        if not math.isclose(value, expected, rel_tol=1e-9):
            why = known_mistake(value, [
                (i * j / k, "That is E‖U₁ⁱᵀU₂ʲ‖²_F itself; φ then divides by min(i, j)."),
                (min(i, j) / k, "That is min(i, j)/k: count the squared cosines again, then divide by min(i, j)."),
                (1 / k, "1/k is the mean of ONE squared cosine; ‖U₁ⁱᵀU₂ʲ‖²_F adds up i·j of them.")])
            raise Wrong(f"i={i}, j={j}, k={k}: you give {num(value)}, "
                        f"{side(value, expected, 'larger', 'smaller')} than the expectation.{why}")
    return "max(i, j)/k: tiny for GPT-3's k = 12288, but 1/16 already for i = j = 8 at our k = 128"
