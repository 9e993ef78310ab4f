"""Exercises of tutorial 09 (after the paper): DoRA's ∂L/∂m, PiSSA's start, the bytes of an NF4 weight."""

from __future__ import annotations

import numpy as np

from .. import backend as bk
from ..lora.dora import dora_linear
from ..quant import quantize_nf4
from ..tensor import tensor
from .harness import Wrong, as_array, call, compare, exercise, num, register, side

__all__ = ["check_dora_dm", "check_nf4_bytes", "check_pissa_init"]

register(
    "09.1", "DoRA's ∂L/∂m", "check_dora_dm",
    paper="DoRA (Liu et al. 2024): W′ = m ⊙ V / ‖V‖_c, V = W₀ + s·B A",
    hints=("m enters h only as a per-row factor c = m / n, where n is the row norm of V = W + s·B·A; so first get "
           "∂L/∂c from grad_h and the un-scaled output P = x Vᵀ, then the one step from c to m.",
           "∂L/∂c_i = Σ_rows grad_h ⊙ P with P = x·Vᵀ (N, d), and ∂L/∂m_i = (∂L/∂c_i) / n_i, n_i = ‖V_i‖."),
    solution='''
    def solution_dm(x, W, A, B, m, grad_h, s):
        V = W + s * B @ A                  # (d, k)
        n = np.linalg.norm(V, axis=1)      # (d,): one norm per output row
        P = x @ V.T                        # (N, d)
        return (grad_h * P).sum(axis=0) / n
    ''')

register(
    "09.2", "PiSSA's start", "check_pissa_init",
    paper="PiSSA (Meng et al. 2024): A and B from the top-r SVD of W",
    hints=("take the top-r singular triplets of W (np.linalg.svd(W, full_matrices=False)); s·B·A must be that part, "
           "W_res the rest, and A and B must carry the same share of each singular value.",
           "U, S, Vt = svd(W); root = √(S[:r] / s); A = root[:, None] · Vt[:r]; B = U[:, :r] · root[None, :]; "
           "W_res = W − s·B·A."),
    solution='''
    def solution_pissa(W, r, s):
        U, S, Vt = np.linalg.svd(W, full_matrices=False)
        root = np.sqrt(S[:r] / s)          # each singular value split evenly between A and B
        A = root[:, None] * Vt[:r]
        B = U[:, :r] * root[None, :]
        return A, B, W - s * B @ A
    ''')

register(
    "09.3", "bytes of an NF4 weight", "check_nf4_bytes",
    paper="QLoRA (Dettmers et al. 2023): NF4 codes, a scale per block, double quantization",
    hints=("count two things per block of block_size values: the 4-bit codes (the last block padded to full), and "
           "the block's scale; with double quantization the scales are themselves quantized.",
           "4 bits per value (padded to whole blocks) + one float32 absmax (4 bytes) per block; with double "
           "quantization one byte per block, plus a float32 per 256 blocks and one float32 offset."),
    solution='''
    def solution_nf4_bytes(n_values, block_size, double_quant):
        n_blocks = -(-n_values // block_size)           # ceil: the last block is padded
        codes = n_blocks * block_size // 2              # two 4-bit codes a byte
        if double_quant:
            return codes + n_blocks + 4 * -(-n_blocks // 256) + 4
        return codes + 4 * n_blocks                     # one float32 absmax per block
    ''')

_DORA_ARGS = ("x", "W", "A", "B", "m", "grad_h", "s")


def _dora_problem(seed, n=5, k=6, d=4, r=2):
    g = np.random.default_rng(seed)
    W = g.standard_normal((d, k))
    return (g.standard_normal((n, k)), W, g.standard_normal((r, k)), g.standard_normal((d, r)) * 0.3,
            np.linalg.norm(W, axis=1) * g.uniform(0.7, 1.3, d), g.standard_normal((n, d)))


@exercise("09.1")
def check_dora_dm(fn) -> str:
    """fn(x, W, A, B, m, grad_h, s) -> ∂L/∂m (d,) for h = m ⊙ (W + s·B·A)x / ‖W + s·B·A‖_row.

    Compared with the hand-written backward of ``lora.dora_linear`` (gradchecked in the tests).
    """
    for seed, s in ((0, 2.0), (1, 0.5)):
        x, W, A, B, m, g = _dora_problem(seed)
        mt = tensor(m, requires_grad=True, dtype="float64")
        out = dora_linear(tensor(x, dtype="float64"), tensor(W, dtype="float64"), None, tensor(A, dtype="float64"),
                          tensor(B, dtype="float64"), mt, s)
        out.backward(g)
        args = dict(zip(_DORA_ARGS, (x.copy(), W.copy(), A.copy(), B.copy(), m.copy(), g.copy(), s)))
        mine = as_array(call(fn, args), "∂L/∂m", m.shape)
        expected = bk.to_numpy(mt.grad)
        n = np.linalg.norm(W + s * B @ A, axis=1)
        if np.allclose(mine, expected * n, rtol=1e-6, atol=1e-9):
            raise Wrong(f"∂L/∂m (s = {num(s)}): yours is the right one times the row norms ‖V_i‖: did you forget "
                        "that m is divided by the norm?")
        compare(mine, expected, f"∂L/∂m (s = {num(s)})")
    return "your ∂L/∂m equals DoRA's hand-written backward"


@exercise("09.2")
def check_pissa_init(fn) -> str:
    """fn(W, r, s) -> (A, B, W_res): A (r, k), B (d, r) with s·B·A the top-r singular part of W, W_res = W − s·B·A."""
    for seed, (d, k, r, s) in enumerate([(6, 5, 2, 2.0), (4, 7, 3, 0.5), (5, 5, 1, 1.0)]):
        W = np.random.default_rng(seed).standard_normal((d, k))
        result = call(fn, {"W": W.copy(), "r": r, "s": s})
        if not (isinstance(result, tuple) and len(result) == 3):
            raise Wrong(f"return three arrays (A, B, W_res), got {type(result).__name__}", with_hints=False)
        A, B, W_res = (as_array(a, what, shape) for a, what, shape in
                        zip(result, ("A", "B", "W_res"), ((r, k), (d, r), (d, k))))
        U, S, Vt = np.linalg.svd(W, full_matrices=False)
        top = (U[:, :r] * S[:r]) @ Vt[:r]
        where = f"d={d}, k={k}, r={r}, s={num(s)}"
        if np.allclose(B @ A, top, atol=1e-9) and s != 1.0:
            raise Wrong(f"{where}: B·A is the top-{r} part, but the adapter adds s·B·A: divide the singular values by s")
        compare(s * B @ A, top, f"{where}: s·B·A against the top-{r} singular part of W")
        compare(W_res + s * B @ A, W, f"{where}: W_res + s·B·A against W (the model must start at the base)")
        if not np.allclose(np.linalg.norm(A, axis=1), np.linalg.norm(B, axis=0), rtol=1e-6):
            raise Wrong(f"{where}: A and B should carry the same share, √(S_r/s), of each singular value")
    return "s·B·A is the top-r SVD part, W_res + s·B·A = W, and A, B are balanced as PiSSA (and PEFT) make them"


@exercise("09.3")
def check_nf4_bytes(fn) -> str:
    """fn(n_values, block_size, double_quant) -> bytes of the NF4 form (codes + scales), as ``quantize_nf4`` stores it."""
    for n, block, dq in [(64, 64, False), (4096, 64, False), (100, 64, False), (65536, 64, True), (1000, 32, True)]:
        got = call(fn, {"n_values": n, "block_size": block, "double_quant": dq})
        expected = quantize_nf4(np.ones(n, dtype=np.float32), block, double_quant=dq).nbytes
        if got != expected:
            why = ""
            if n % block and got == n // 2 + 4 * (-(-n // block)) and not dq:
                why = " The last block is padded to block_size values: count whole blocks of codes."
            elif not dq and got == n // 2:
                why = " That is the codes alone; each block also stores its scale."
            raise Wrong(f"n_values={n}, block_size={block}, double_quant={dq}: you give {num(got)}, "
                        f"{side(got, expected)} bytes than quantize_nf4 stores.{why}")
    return "right, with and without double quantization (4.5 and ≈4.127 bits per value at block 64)"
