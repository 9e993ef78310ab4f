"""Modules: Parameter, Module, Linear, Embedding, LayerNorm, Dropout, ModuleList."""

from .layers import Dropout, Embedding, LayerNorm, Linear, ModuleList  # noqa: F401
from .module import Module, Parameter  # noqa: F401
