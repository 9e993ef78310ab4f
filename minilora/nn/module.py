"""Module and Parameter: containers that find their parameters by attribute assignment."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .. import backend as bk
from ..tensor import Tensor

__all__ = ["Parameter", "Module"]


class Parameter(Tensor):
    """A leaf Tensor that a Module owns; requires grad unless frozen."""

    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True, dtype=None, backend=None):
        super().__init__(data, requires_grad=requires_grad, dtype=dtype, backend=backend)

    def __repr__(self) -> str:
        frozen = "" if self.requires_grad else ", frozen"
        return f"Parameter(shape={tuple(self.shape)}, dtype={self.dtype}{frozen})"


class Module:
    """Base class: assign Parameters and sub-Modules as attributes; they are found by name.

    ``named_parameters()`` yields dotted names (``blocks.0.attn.q.weight``) that are also
    the keys of ``state_dict()``, GPT-2 style, so checkpoints line up with PyTorch's.
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() before assigning attributes")
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    def __call__(self, *args, **kwargs):
        out = self.forward(*args, **kwargs)
        for hook in self.__dict__.get("_forward_hooks", ()):  # none on plain modules: one dict lookup
            out = hook(self, out)
        return out

    def register_forward_hook(self, hook) -> None:
        """Call ``hook(module, output)`` after every forward; its return value replaces the output.

        How code outside a model changes what one of its modules computes, without editing the
        model (LoRA's per-adapter bias deltas use it). ``remove_forward_hook`` undoes it.
        """
        hooks = self.__dict__.get("_forward_hooks", ())
        object.__setattr__(self, "_forward_hooks", (*hooks, hook))

    def remove_forward_hook(self, hook) -> None:
        object.__setattr__(self, "_forward_hooks", tuple(h for h in self.__dict__.get("_forward_hooks", ()) if h is not hook))

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    # ------------------------------------------------------------------ traversal
    def named_modules(self, prefix: str = ""):
        """(dotted name, module) for this module and every descendant, depth first."""
        stack = [(prefix, self)]
        while stack:
            name, module = stack.pop()
            yield name, module
            children = [(f"{name}.{n}" if name else n, m) for n, m in module._modules.items()]
            stack.extend(reversed(children))

    def modules(self):
        return (m for _, m in self.named_modules())

    def replace_submodule(self, path: str, new: "Module") -> None:
        """Put ``new`` at dotted ``path``, keeping the parent's child order (so parameter order is unchanged)."""
        parent_path, _, attr = path.rpartition(".")
        parent = dict(self.named_modules())[parent_path] if parent_path else self
        parent._modules[attr] = new  # an existing key keeps its place in the OrderedDict
        object.__setattr__(parent, attr, new)

    def children(self):
        return iter(self._modules.values())

    def named_parameters(self, trainable_only: bool = False):
        seen = set()
        for mod_name, module in self.named_modules():
            for name, p in module._parameters.items():
                if id(p) in seen or (trainable_only and not p.requires_grad):
                    continue
                seen.add(id(p))
                yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self, trainable_only: bool = False):
        return [p for _, p in self.named_parameters(trainable_only)]

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.size for p in self.parameters(trainable_only))

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True):
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self):
        return self.train(False)

    def requires_grad_(self, flag: bool = True):
        for p in self.parameters():
            p.requires_grad = flag
        return self

    # ------------------------------------------------------------------ state
    def state_dict(self) -> "OrderedDict[str, object]":
        """{dotted name: array} of every parameter (the arrays themselves, not copies)."""
        return OrderedDict((name, p.data) for name, p in self.named_parameters())

    def _load_refusal(self, names) -> str | None:
        """Why this module may not have its parameters ``names`` (names local to it) overwritten now, or None.

        A subclass whose parameters hold a derived state (a LoRA layer with an adapter merged into
        its weight) overrides it; ``load_state_dict`` asks every module before it writes anything.
        """
        return None

    def check_load(self, names, source: str = "state dict") -> None:
        """RuntimeError if a module refuses to have the parameters ``names`` (dotted, from here) loaded now."""
        names = list(names)
        for path, module in self.named_modules():
            if type(module)._load_refusal is Module._load_refusal:
                continue
            local = [n[len(path) + 1:] if path else n for n in names if not path or n.startswith(path + ".")]
            reason = module._load_refusal(local) if local else None
            if reason:
                raise RuntimeError(f"{source}: {reason}")

    def load_state_dict(self, state: dict, strict: bool = True, source: str = "state dict"):
        """Copy arrays into the parameters (in place, keeping dtype and backend).

        Everything is checked before anything is written: a missing or unexpected
        name, or a shape that differs, raises ValueError naming it and leaves the
        module untouched; a module that refuses the load in its present state (``check_load``:
        a LoRA layer with a merged adapter) raises RuntimeError, also before any write. With ``strict=False`` missing and unexpected names are allowed.
        Returns (missing, unexpected) name lists.
        """
        params = dict(self.named_parameters())
        missing = [n for n in params if n not in state]
        unexpected = [n for n in state if n not in params]
        if strict and (missing or unexpected):
            raise ValueError(
                f"{source} does not match {type(self).__name__}: missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            )
        def shape(value):  # a device array's own .shape: np.shape() would convert it to the host
            return tuple(value.shape) if hasattr(value, "shape") else tuple(np.shape(value))

        for name, p in params.items():
            if name in state and shape(state[name]) != tuple(p.shape):
                raise ValueError(f"{source}: {name} has shape {shape(state[name])} but the model expects {tuple(p.shape)}")
        self.check_load([n for n in state if n in params], source)
        for name, p in params.items():
            if name in state:
                p.data[...] = bk.asarray(state[name], dtype=p.dtype, backend=p.backend)
        return missing, unexpected

    def to(self, dtype=None, backend: str | None = None):
        """Convert every parameter (dtype: e.g. 'float64'; backend: 'numpy', 'cupy' or 'strict'), in place."""
        for p in self.parameters():
            data = p.data
            if backend is not None and p.backend != backend:
                data = bk.asarray(bk.to_numpy(data), backend=backend)
            if dtype is not None and np.issubdtype(data.dtype, np.floating):
                data = data.astype(dtype)
            p.data, p.grad = data, None
        return self

    @property
    def dtype(self):
        for p in self.parameters():
            return p.dtype
        return np.dtype(np.float32)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, m in self._modules.items():
            child = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child}")
        return "\n".join(lines) + ("\n)" if self._modules else ")")
