"""Exercises of tutorial 09 (after the paper): DoRA's ∂L/∂m, PiSSA's start, the bytes of an NF4 weight."""

from __future__ import annotations

import numpy as np

from ..lora.function import dora_linear
from ..quant import quantize_nf4
from ..tensor import tensor
from .harness import Wrong, as_array, call, compare, exercise, num, register, rng

__all__ = ["check_dora_dm", "check_nf4_bytes", "check_pissa_init"]

register(
    "09.1", "DoRA's ∂L/∂m", "check_dora_dm",
    hints=("h = c ⊙ P + b with c = m / n and P = x·Vᵀ, V = W + s·B·A, n = the row norms of V. m enters only "
           "through c: first ∂L/∂c, then the chain rule through c_i = m_i / n_i.",
           "∂L/∂c_i = Σ_rows grad_h ⊙ P, and ∂L/∂m_i = (∂L/∂c_i) / n_i: "
           "(grad_h * (x @ V.T)).sum(axis=0) / np.linalg.norm(V, axis=1)."),
    solution='''
    def solution_dm(x, W, A, B, m, grad_h, s):
        V = W + s * B @ A                  # (d, k)
        n = np.linalg.norm(V, axis=1)      # (d,): one norm per output row
        P = x @ V.T                        # (N, d): the direction part of h
        return (grad_h * P).sum(axis=0) / n
    ''')

register(
    "09.2", "PiSSA's start", "check_pissa_init",
    hints=("np.linalg.svd(W, full_matrices=False) gives U, S, Vᵀ with S descending; the top-r part of W is "
           "U_r·diag(S_r)·V_rᵀ. Split each singular value evenly between A and B, and remember s in s·B·A.",
           "root = √(S_r / s); A = root[:, None] · Vt[:r], B = U[:, :r] · root[None, :], W_res = W − s·B·A."),
    solution='''
    def solution_pissa(W, r, s):
        U, S, Vt = np.linalg.svd(W, full_matrices=False)
        root = np.sqrt(S[:r] / s)
        A = root[:, None] * Vt[:r]        # (r, k)
        B = U[:, :r] * root[None, :]      # (d, r)
        return A, B, W - s * B @ A
    ''')

register(
    "09.3", "bytes of an NF4 weight", "check_nf4_bytes",
    hints=("Count two things: the 4-bit codes (the last block is padded to a whole block) and the block "
           "scales. Without double quantization a scale is a float32; with it, a byte, plus a float32 per "
           "256 blocks and one float32 offset.",
           "n_blocks = ceil(n / block); codes = n_blocks·block / 2 bytes; + 4·n_blocks, or with double "
           "quantization + n_blocks + 4·ceil(n_blocks / 256) + 4."),
    solution='''
    def solution_nf4_bytes(n_values, block_size, double_quant):
        n_blocks = -(-n_values // block_size)
        codes = n_blocks * block_size // 2
        if double_quant:
            return codes + n_blocks + 4 * -(-n_blocks // 256) + 4
        return codes + 4 * n_blocks
    ''')


def _dora_problem(seed, n=5, k=6, d=4, r=2):
    g = rng(seed)
    W = g.standard_normal((d, k))
    return (g.standard_normal((n, k)), W, g.standard_normal((r, k)), g.standard_normal((d, r)) * 0.3,
            np.linalg.norm(W, axis=1) * g.uniform(0.7, 1.3, d), g.standard_normal((n, d)))


@exercise("09.1")
def check_dora_dm(fn) -> str:
    """fn(x, W, A, B, m, grad_h, s) -> ∂L/∂m (d,) for h = m ⊙ (W + s·B·A)x / ‖W + s·B·A‖_row.

    Compared with the hand-written backward of ``lora.dora_linear`` (gradchecked in the tests).
    """
    for seed, s in ((0, 2.0), (1, 0.5)):
        x, W, A, Bm, m, g = _dora_problem(seed)
        mt = tensor(m, requires_grad=True, dtype="float64")
        dora_linear(tensor(x, dtype="float64"), tensor(W, dtype="float64"), None, tensor(A, dtype="float64"),
                    tensor(Bm, dtype="float64"), mt, s).backward(g)
        got = as_array(call(fn, {"x": x.copy(), "W": W.copy(), "A": A.copy(), "B": Bm.copy(), "m": m.copy(),
                                 "grad_h": g.copy(), "s": s}), "∂L/∂m", m.shape)
        expected = np.asarray(mt.grad)
        n = np.linalg.norm(W + s * Bm @ A, axis=1)
        if np.allclose(got, expected * n * n, rtol=1e-6):
            raise Wrong(f"(s = {num(s)}) your ∂L/∂m is n² ⊙ the right one: divide by n_i = ‖V_i‖, do not multiply.")
        compare(got, expected, f"∂L/∂m (s = {num(s)})")
    return "your ∂L/∂m equals DoRA's hand-written backward"


@exercise("09.2")
def check_pissa_init(fn) -> str:
    """fn(W, r, s) -> (A, B, W_res): A (r, k), B (d, r), s·B·A the top-r singular part of W, W_res = W − s·B·A."""
    for seed, (d, k, r, s) in enumerate([(6, 5, 2, 2.0), (4, 7, 3, 0.5), (5, 5, 1, 1.0)]):
        W = rng(seed).standard_normal((d, k))
        result = call(fn, {"W": W.copy(), "r": r, "s": s})
        if not (isinstance(result, tuple) and len(result) == 3):
            raise Wrong(f"return three arrays (A, B, W_res), got {type(result).__name__}")
        A, Bm, W_res = (as_array(a, what, shape) for a, what, shape in
                        zip(result, ("A", "B", "W_res"), ((r, k), (d, r), (d, k))))
        U, S, Vt = np.linalg.svd(W, full_matrices=False)
        top = (U[:, :r] * S[:r]) @ Vt[:r]
        if np.allclose(Bm @ A, top, atol=1e-9) and s != 1.0:
            raise Wrong(f"(d={d}, k={k}, r={r}, s={num(s)}) B·A is the top-{r} part, but the layer adds s·B·A: "
                        "divide the singular values by s before splitting them.")
        compare(s * Bm @ A, top, f"s·B·A for d={d}, k={k}, r={r}, s={num(s)} (the top-{r} singular part of W)")
        compare(W_res + s * Bm @ A, W, "W_res + s·B·A (it must be W: the model starts at the base)")
        if not np.allclose(np.linalg.norm(A, axis=1), np.linalg.norm(Bm, axis=0), rtol=1e-6):
            raise Wrong("A and B should carry the same share, √(S_r / s), of each singular value")
    return "s·B·A is the top-r SVD part, W_res + s·B·A = W, and A, B are balanced as PiSSA (and PEFT) make them"


@exercise("09.3")
def check_nf4_bytes(fn) -> str:
    """fn(n_values, block_size, double_quant) -> bytes of the NF4 form (codes + scales), as ``quantize_nf4`` stores it."""
    for n, block, dq in [(64, 64, False), (4096, 64, False), (100, 64, False), (65536, 64, True), (1000, 32, True)]:
        got = call(fn, {"n_values": n, "block_size": block, "double_quant": dq})
        expected = quantize_nf4(np.ones(n, dtype=np.float32), block, double_quant=dq).nbytes
        if got != expected:
            why = ""
            if not dq and got == n // 2 + 4 * (n // block):
                why = " The last block is padded to a whole block: round the number of blocks up."
            raise Wrong(f"n_values={n}, block_size={block}, double_quant={dq}: you give {num(got)}, quantize_nf4 "
                        f"stores {num(expected)} bytes.{why}")
    return "right, with and without double quantization (4.5 and ≈4.127 bits per value at block 64)"
