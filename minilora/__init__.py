"""minilora: learn LoRA (Hu et al. 2021, arXiv 2106.09685) by building it.

    import minilora as ml
    x = ml.tensor([[1.0, 2.0]], requires_grad=True, dtype="float64")
    (x @ x.T).sum().backward()
    x.grad
"""

from . import backend
from .backend import BackendUnavailableError, manual_seed, set_backend, get_backend
from .tensor import Tensor, tensor, no_grad, enable_grad, is_grad_enabled
from .function import Function
from .gradcheck import gradcheck, GradcheckError
from . import ops, functional, nn
from .ops import (
    add, sub, mul, div, neg, pow, exp, log, tanh, sqrt, maximum, relu, matmul, where, masked_fill,
    reshape, transpose, swapaxes, broadcast_to, concatenate, stack, split, astype,
)

__version__ = "0.1.0"
