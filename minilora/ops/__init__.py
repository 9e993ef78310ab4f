"""Primitive ops: each a Function (forward + hand-written backward) and the function users call.

Composite ops with fused backward passes live in ``minilora.functional``.
"""

from .elementwise import (  # noqa: F401
    add, astype, div, exp, log, masked_fill, maximum, mul, neg, pow, relu, sqrt, sub, tanh, where,
)
from .linalg import matmul  # noqa: F401
from .reduce import max, mean, sum  # noqa: F401
from .shape import (  # noqa: F401
    broadcast_to, concatenate, getitem, reshape, split, stack, swapaxes, transpose,
)
