"""Per-adapter bias deltas: an adapter that trains biases keeps them as its own Δb, never in the base.

    LoRAConfig(..., bias="lora_only")   # Δb for the bias of every layer the adapter adapts
    LoRAConfig(..., bias="all")         # Δb for every bias of the model (LayerNorm, Linear, ...)

A module whose output ends in ``+ b`` (nn.Linear, nn.LayerNorm, LoRALinear) gets a child
``lora_bias`` holding ``<module>.lora_bias.<adapter>`` (shape of b, starting at 0) and a forward
hook that adds the active adapter's Δb to its output: y = f(x) + b + Δb_a, the same as training
b in place, but b itself stays the base's. So every way back to the base model gives it exactly:
``lora.disable_adapters``, the ``"__base__"`` rows of ``lora.mixed_batch`` (row i adds only its own
adapter's Δb) and ``lora.delete_adapter``. The base model's code knows nothing of this.
"""

from __future__ import annotations

from .. import backend as bk
from ..nn import Module, Parameter
from ..tensor import Tensor
from .layer import AdapterDict

__all__ = ["BiasDeltas", "add_bias_delta", "bias_hosts", "bias_targets"]


class BiasDeltas(AdapterDict):
    """Δb by adapter name for one module, and the forward hook that adds them (see the module docstring)."""

    def __init__(self):
        super().__init__()
        object.__setattr__(self, "active", [])  # set by lora.set_adapter
        object.__setattr__(self, "row_groups", None)  # set by lora.mixed_batch for its block
        object.__setattr__(self, "disabled", 0)  # > 0 inside lora.disable_adapters

    def __call__(self, module, out):
        """out + Δb of the active adapter(s); under a mixed batch, row i gets its own adapter's Δb only."""
        if self.disabled or not len(self):
            return out
        groups = self.row_groups
        if groups is None:
            for name in self.active:
                if name in self:
                    out = out + self[name]
            return out
        xp = bk.get_array_module(out.data)
        for name, rows in zip(groups.names, groups.selectors):
            if name in self:
                mask = xp.zeros((groups.n_rows,) + (1,) * (out.ndim - 1), dtype=out.dtype)  # (N, 1, ..., 1)
                mask[rows] = 1
                mask = Tensor(mask, backend=bk.backend_of(mask))  # on the model's backend, whatever the current one
                out = out + mask * self[name]  # only this adapter's rows move (and reach its Δb's grad)
        return out


def bias_hosts(model: Module) -> list:
    """[(path, module, BiasDeltas)] of every module that holds bias deltas."""
    return [(path, m, m._modules["lora_bias"]) for path, m in model.named_modules()
            if isinstance(m._modules.get("lora_bias"), BiasDeltas)]


def bias_targets(model: Module, mode: str, targets) -> list:
    """[(path, module)] whose bias an adapter with ``LoRAConfig.bias == mode`` trains (as Δb)."""
    if mode == "lora_only":
        return [(p, m) for p, m in targets if getattr(m, "bias", None) is not None]
    if mode == "all":
        return [(p, m) for p, m in model.named_modules()
                if not isinstance(m, AdapterDict) and isinstance(m._parameters.get("bias"), Parameter)]
    return []


def add_bias_delta(module: Module, name: str) -> Parameter:
    """Give ``module`` a zero Δb for adapter ``name`` (and the hook that adds it, once)."""
    deltas = module._modules.get("lora_bias")
    if deltas is None:
        deltas = BiasDeltas()
        module.lora_bias = deltas
        module.register_forward_hook(deltas)
    bias = module.bias
    delta = Parameter(bk.module_for(bias.backend).zeros(bias.shape, dtype=bias.dtype), backend=bias.backend)
    deltas[name] = delta
    return delta
