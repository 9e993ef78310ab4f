"""Exercises of tutorial 02 (the LoRA layer): ∂L/∂A, ∂L/∂B, and counting LoRA's parameters."""

from __future__ import annotations


from .. import backend as bk
from .. import functional as F
from ..function import Function
from ..gradcheck import GradcheckError, gradcheck
from ..tensor import tensor
from .harness import Wrong, as_array, call, compare, exercise, num, register, rng

__all__ = ["check_dA", "check_dB", "check_lora_param_count"]

register(
    "02.1", "dA of the LoRA layer", "check_dA",
    paper="eq. 3, h = W₀x + (α/r)·B A x (Sec. 4.1): ∂L/∂A",
    hints=("A is reached only through u = x Aᵀ (N × r). Get ∂L/∂u first (what multiplies u on the way to h, and "
           "with which factor?), then ask what multiplies A in u = x Aᵀ. The result must be (r, k).",
           "∂L/∂u = s·grad_h B (N × r) and ∂L/∂A = (∂L/∂u)ᵀ x = s·(grad_h B)ᵀ x, shape (r, k)."),
    solution='''
    def solution_dA(x, lora_A, lora_B, grad_h, scaling):
        grad_u = scaling * grad_h @ lora_B     # (N, d) @ (d, r): dL/du, u = x Aᵀ
        return grad_u.T @ x                    # (r, N) @ (N, k): A multiplies x in u = x Aᵀ
    ''')

register(
    "02.2", "dB of the LoRA layer", "check_dB",
    paper="eq. 3, h = W₀x + (α/r)·B A x (Sec. 4.1): ∂L/∂B",
    hints=("in h = … + s·u Bᵀ with u = x Aᵀ, B multiplies u. The gradient of a matmul's weight is "
           "(upstream gradient)ᵀ @ (what it multiplied); keep the factor s. The result must be (d, r).",
           "∂L/∂B = s·grad_hᵀ u = s·grad_hᵀ (x Aᵀ), shape (d, r)."),
    solution='''
    def solution_dB(x, lora_A, lora_B, grad_h, scaling):
        u = x @ lora_A.T                       # (N, r): the bottleneck
        return scaling * grad_h.T @ u          # (d, N) @ (N, r)
    ''')

register(
    "02.3", "counting LoRA parameters", "check_lora_param_count",
    paper="Sec. 4.2: |Θ| = 2 × L̂ × d_model × r (GPT-3, r = 1 on Wq, Wv: 4.7M)",
    hints=("count the entries of B and of A separately from their shapes, for one matrix, then multiply by "
           "n_matrices. Not every W₀ is square.",
           "B is d × r and A is r × k: n_matrices · r · (d + k); for square matrices the paper's "
           "2 × L̂ × d_model × r."),
    solution='''
    def solution_count(d, k, r, n_matrices):
        return n_matrices * (d * r + r * k)    # B is d × r, A is r × k
    ''')

_ARGS = ("x", "lora_A", "lora_B", "grad_h", "scaling")


def lora_problem(seed: int, n=5, k=6, d=4, r=3):
    g = rng(seed)
    return (g.standard_normal((n, k)), g.standard_normal((d, k)) * 0.5, g.standard_normal(d) * 0.1,
            g.standard_normal((r, k)) * 0.5, g.standard_normal((d, r)) * 0.5)


def _student_lora_function(fn, which: str):
    """A Function: forward is the LoRA layer; the gradient of ``which`` (A or B) comes from ``fn``."""

    class StudentLoRA(Function):
        def forward(self, lora_A, lora_B, x=None, weight=None, bias=None, scaling=1.0):
            self.save_for_backward(x, lora_A, lora_B)
            self.scaling = scaling
            return x @ weight.T + bias + scaling * (x @ lora_A.T) @ lora_B.T  # h = W0 x + b + s B A x

        def backward(self, grad):
            x, lora_A, lora_B = self.saved
            args = dict(zip(_ARGS, (x.copy(), lora_A.copy(), lora_B.copy(), grad.copy(), self.scaling)))
            target = lora_A if which == "A" else lora_B
            mine = as_array(call(fn, args), f"d{which}", target.shape)
            return (mine, None) if which == "A" else (None, mine)

    return StudentLoRA


def _check_lora_gradient(fn, which: str) -> str:
    StudentLoRA = _student_lora_function(fn, which)
    for seed, scaling in ((0, 2.5), (1, 0.5)):
        x, weight, bias, lora_A, lora_B = lora_problem(seed)
        # first: your formula against the library's fused backward, with a known upstream gradient
        A_lib = tensor(lora_A, requires_grad=True, dtype="float64")
        B_lib = tensor(lora_B, requires_grad=True, dtype="float64")
        g = rng(seed + 10).standard_normal((x.shape[0], weight.shape[0]))
        F.lora_linear(tensor(x, dtype="float64"), tensor(weight, dtype="float64"), tensor(bias, dtype="float64"),
                      A_lib, B_lib, scaling).backward(g)
        expected = bk.to_numpy((A_lib if which == "A" else B_lib).grad)
        args = dict(zip(_ARGS, (x.copy(), lora_A.copy(), lora_B.copy(), g.copy(), scaling)))
        mine = as_array(call(fn, args), f"d{which}", expected.shape)
        factors = {1 / scaling: "did you drop the scaling s?", scaling: "did you apply the scaling s twice?"}
        compare(mine, expected, f"d{which} (scaling s = {num(scaling)}) against F.lora_linear's backward", factors)
        # then: gradcheck on a LoRA layer whose backward is yours
        A = tensor(lora_A, requires_grad=which == "A", dtype="float64")
        B = tensor(lora_B, requires_grad=which == "B", dtype="float64")
        try:
            gradcheck(lambda a, b, x=x, weight=weight, bias=bias, scaling=scaling:
                      StudentLoRA.apply(a, b, x=x, weight=weight, bias=bias, scaling=scaling), [A, B])
        except GradcheckError as exc:
            text = str(exc).replace("input 0", "lora_A").replace("input 1", "lora_B")
            raise Wrong(f"d{which} (scaling s = {num(scaling)}): {text}") from None
    return f"your d{which} equals F.lora_linear's hand-written backward, and gradcheck passes"


@exercise("02.1")
def check_dA(fn) -> str:
    """fn(x, lora_A, lora_B, grad_h, scaling) -> ∂L/∂A (r, k).

    x (N, k) is the layer input, grad_h (N, d) = ∂L/∂h, h = W₀x + b + s·B A x. Compared with
    ``F.lora_linear``'s backward, then ``ml.gradcheck`` runs on a LoRA layer whose backward uses your dA.
    """
    return _check_lora_gradient(fn, "A")


@exercise("02.2")
def check_dB(fn) -> str:
    """fn(x, lora_A, lora_B, grad_h, scaling) -> ∂L/∂B (d, r); checked like ``check_dA``."""
    return _check_lora_gradient(fn, "B")


def _count_problem(got, d, k, r, n) -> str:
    """What a wrong LoRA parameter count usually means, without giving the right count away."""
    if d != k and got == 2 * n * d * r:
        return (f"which is not right. W₀ is not square here (d = {d}, k = {k}): 2·d·r counts B twice "
                "and A not at all.")
    if d != k and got == 2 * n * k * r:
        return (f"which is not right. W₀ is not square here (d = {d}, k = {k}): 2·k·r counts A twice "
                "and B not at all.")
    if got == n * d * k:
        return "that is d·k per matrix, what full fine-tuning trains; LoRA trains B and A only."
    if d == k and got == n * d * r:
        return "that counts one factor alone (B is d × r, A is r × k); both train."
    if got == n * d * r:
        return "that counts B (d × r) alone; A (r × k) trains too."
    if got == n * r * k:
        return "that counts A (r × k) alone; B (d × r) trains too."
    if n > 1 and got == r * (d + k):
        return f"that is the count of one matrix; n_matrices = {n} matrices each get their own A and B."
    side = "more" if got > n * r * (d + k) else "fewer"
    square = "" if d == k else f" W₀ is not square here (d = {d}, k = {k})."
    return f"{side} than LoRA trains for these matrices.{square} Write down the shapes of B and A and count their entries."


@exercise("02.3")
def check_lora_param_count(fn) -> str:
    """fn(d, k, r, n_matrices) -> the number of trainable LoRA parameters.

    n_matrices weight matrices W₀ ∈ R^{d×k} each get B (d × r) and A (r × k).
    """
    cases = [(1024, 1024, 4, 1), (128, 128, 4, 8), (12288, 12288, 1, 2 * 96), (512, 128, 8, 3), (96, 384, 2, 5)]
    for d, k, r, n in cases:
        got = call(fn, {"d": d, "k": k, "r": r, "n_matrices": n})
        expected = n * r * (d + k)
        if got != expected:
            raise Wrong(f"d={d}, k={k}, r={r}, n_matrices={n}: you give {num(got)}, {_count_problem(got, d, k, r, n)}")
    return "right for square and non-square matrices (GPT-3, r = 1 on Wq and Wv of 96 layers: 4,718,592)"
