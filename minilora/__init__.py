"""minilora: learn LoRA (Hu et al. 2021, arXiv 2106.09685) by building it.

    import minilora as ml
    x = ml.tensor([[1.0, 2.0]], requires_grad=True, dtype="float64")
    (x @ x.T).sum().backward()
    x.grad
"""

# tensor first: the ops import Function, which needs Tensor (the one import-order dependency)
from .tensor import Tensor, enable_grad, is_grad_enabled, no_grad, tensor
from . import backend, functional, nn, ops
from .backend import BackendUnavailableError, get_backend, manual_seed, set_backend
from .function import Function
from .gradcheck import GradcheckError, gradcheck
from .ops import (
    add, astype, broadcast_to, concatenate, div, exp, log, masked_fill, matmul, maximum, mul, neg, pow, relu,
    reshape, split, sqrt, stack, sub, swapaxes, tanh, transpose, where,
)

__version__ = "0.1.0"

__all__ = [
    "backend", "functional", "nn", "ops",
    "BackendUnavailableError", "get_backend", "manual_seed", "set_backend",
    "Function", "GradcheckError", "gradcheck",
    "Tensor", "enable_grad", "is_grad_enabled", "no_grad", "tensor",
    "add", "astype", "broadcast_to", "concatenate", "div", "exp", "log", "masked_fill", "matmul", "maximum", "mul",
    "neg", "pow", "relu", "reshape", "split", "sqrt", "stack", "sub", "swapaxes", "tanh", "transpose", "where",
]
