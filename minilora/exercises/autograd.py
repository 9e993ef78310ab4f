"""Exercises of tutorial 01 (autograd): a backward pass by hand, and the sigmoid as a Function."""

from __future__ import annotations

import numpy as np

from .. import backend as bk
from ..function import Function
from ..gradcheck import GradcheckError, gradcheck
from ..tensor import tensor
from .harness import NotYet, Wrong, as_array, call, compare, crash, exercise, register, rng

__all__ = ["check_backward_by_hand", "check_sigmoid"]

register(
    "01.1", "backward by hand", "check_backward_by_hand",
    paper="the chain rule, the tool behind every gradient of eq. 1 and eq. 2",
    hints=("go backwards one Function at a time through a = tanh(x), h = a @ w, L = Σ h²: first dL/dh, then the "
           "two halves of the matmul's backward, then tanh's backward (it uses a, the saved output).",
           "dL/dh = 2h, dL/dw = aᵀ @ (dL/dh), dL/da = (dL/dh) @ wᵀ, dL/dx = dL/da ⊙ (1 − a²)."),
    solution='''
    def solution_backward(x, w):
        a = np.tanh(x)                 # (N, k)
        h = a @ w                      # (N, m)
        dL_dh = 2 * h                  # L = Σ h²
        dL_dw = a.T @ dL_dh            # (k, N) @ (N, m)
        dL_da = dL_dh @ w.T            # (N, m) @ (m, k)
        dL_dx = dL_da * (1 - a * a)    # tanh' = 1 − tanh²
        return dL_dx, dL_dw
    ''')

register(
    "01.2", "Sigmoid as a Function", "check_sigmoid",
    paper="a Function with its forward and backward, as every op of the course",
    hints=("write dσ/dx in terms of y = σ(x) itself, and save y in forward so that backward can use it.",
           "with y = σ(x), dy/dx = y (1 − y): save y (self.save_for_backward(y)) and return grad * y * (1 − y)."),
    solution='''
    class SolutionSigmoid(ml.Function):
        def forward(self, x):
            xp = ml.backend.get_array_module(x)
            y = 1.0 / (1.0 + xp.exp(-x))
            self.save_for_backward(y)          # backward needs only the output
            return y

        def backward(self, grad):
            (y,) = self.saved
            return grad * y * (1.0 - y)        # dσ/dx = σ (1 − σ)
    ''')


@exercise("01.1")
def check_backward_by_hand(fn) -> str:
    """fn(x, w) -> (dx, dw): the gradients of L = Σ (tanh(x) @ w)², x (N, k), w (k, m), on NumPy arrays.

    Compared with minilora's autograd (``L.backward()``, then ``x.grad`` and ``w.grad``).
    """
    for seed, (n, k, m) in enumerate([(3, 4, 2), (5, 2, 3), (1, 3, 1)]):
        r = rng(seed)
        x_np, w_np = r.standard_normal((n, k)), r.standard_normal((k, m)) * 0.7
        x, w = tensor(x_np, requires_grad=True, dtype="float64"), tensor(w_np, requires_grad=True, dtype="float64")
        h = x.tanh() @ w
        (h * h).sum().backward()
        result = call(fn, {"x": x_np.copy(), "w": w_np.copy()})
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise Wrong(f"your function must return two arrays (dx, dw), got {type(result).__name__}", with_hints=False)
        dx, dw = as_array(result[0], "dx", (n, k)), as_array(result[1], "dw", (k, m))
        dx_ok = np.allclose(dx, bk.to_numpy(x.grad), rtol=1e-6, atol=1e-9)
        dw_ok = np.allclose(dw, bk.to_numpy(w.grad), rtol=1e-6, atol=1e-9)
        if dw_ok and not dx_ok:
            compare(dx, bk.to_numpy(x.grad), f"dx (x of shape {(n, k)}) is wrong while dw is right — so the "
                    "mistake is in the last step back, through tanh; dx", {0.5: "did you forget the 2 of h²?"})
        compare(dw, bk.to_numpy(w.grad), f"dw (w of shape {(k, m)})", {0.5: "did you forget the 2 of h²?"})
        compare(dx, bk.to_numpy(x.grad), f"dx (x of shape {(n, k)})", {0.5: "did you forget the 2 of h²?"})
    return "dx and dw equal minilora's x.grad and w.grad on three shapes"


@exercise("01.2")
def check_sigmoid(function_class) -> str:
    """function_class: a subclass of ``ml.Function`` with forward(x) = 1 / (1 + e^(−x)) and its backward.

    The forward is compared with NumPy; the backward is checked with ``ml.gradcheck``.
    """
    if not (isinstance(function_class, type) and issubclass(function_class, Function)):
        raise Wrong(f"pass your Function subclass itself (the class), got {function_class!r}", with_hints=False)
    x_np = rng(0).uniform(-4, 4, size=(3, 5))
    x = tensor(x_np, requires_grad=True, dtype="float64")
    name = function_class.__name__
    try:
        y = function_class.apply(x)
    except NotImplementedError:
        raise NotYet() from None
    except Exception as exc:
        raise crash(function_class, exc, {"x": x_np}) from exc
    compare(as_array(y, "forward", x_np.shape), 1.0 / (1.0 + np.exp(-x_np)),
            "forward(x) should return 1 / (1 + exp(−x)) on the raw array x; forward")
    try:
        gradcheck(lambda t: function_class.apply(t), [x])
    except NotImplementedError:
        raise NotYet() from None
    except GradcheckError as exc:
        raise Wrong(f"{name}.backward is wrong: {str(exc).replace('input 0', 'x')}") from None
    except Exception as exc:
        raise crash(function_class, exc, {"grad": np.ones_like(x_np)}) from exc
    return "forward matches 1/(1+e^(−x)) and gradcheck passes"
