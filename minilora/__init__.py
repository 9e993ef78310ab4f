"""minilora: learn LoRA (Hu et al. 2021, arXiv 2106.09685) by building it.

    >>> import minilora as ml
    >>> x = ml.tensor([[1.0, 2.0]], requires_grad=True, dtype="float64")
    >>> (x @ x.T).sum().backward()
    >>> x.grad
    array([[2., 4.]])

One link is made here, once and openly, because the modules cannot import each other
without a cycle: Tensor's operators get the primitive ops (``tensor.install_ops``; the ops
are Functions, which import Tensor).
"""

from . import backend, functional, lora, nn, ops, tensor as _tensor
from ._version import __version__  # noqa: F401 (minilora.__version__)
from .backend import BackendUnavailableError, get_backend, manual_seed, set_backend
from .function import Function
from .gradcheck import GradcheckError, gradcheck
from .ops import (
    add, astype, broadcast_to, concatenate, div, exp, log, masked_fill, matmul, maximum, mul, neg, pow, relu,
    reshape, split, sqrt, stack, sub, swapaxes, tanh, transpose, where,
)
from .tensor import Tensor, enable_grad, is_grad_enabled, no_grad, tensor

_tensor.install_ops(ops)  # x + y, x @ w, x.sum(), ... call minilora.ops

__all__ = [
    "backend", "functional", "lora", "nn", "ops",
    "BackendUnavailableError", "get_backend", "manual_seed", "set_backend",
    "Function", "GradcheckError", "gradcheck",
    "Tensor", "enable_grad", "is_grad_enabled", "no_grad", "tensor",
    "add", "astype", "broadcast_to", "concatenate", "div", "exp", "log", "masked_fill", "matmul", "maximum", "mul",
    "neg", "pow", "relu", "reshape", "split", "sqrt", "stack", "sub", "swapaxes", "tanh", "transpose", "where",
]
