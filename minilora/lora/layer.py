"""LoRALinear: a Linear layer with named low-rank adapters, h = W₀x + b + (α/r)·B A x (eq. 3).

The wrapped layer keeps its own Parameters under their own names, so the state-dict key of
the frozen weight stays ``blocks.0.attn.q.weight`` and a base checkpoint loads unchanged;
each adapter adds ``blocks.0.attn.q.lora_A.<adapter>`` (r, k) and ``...lora_B.<adapter>`` (d, r).

    layer = LoRALinear(nn.Linear(128, 128))
    layer.add_adapter("e2e", LoRAConfig(r=4, alpha=8, target_modules=("q",)))
    h = layer(x)                       # W0 x + b + 2 · B A x, one fused Function (F.lora_linear)
    with layer.disable_adapters():     # the base layer's output
        h0 = layer(x)

States: an adapter is *active* (used by forward), and possibly *merged* (B A already added into
the weight, so forward is a plain F.linear: no extra latency, Sec. 4.2). Changing what is
active while something is merged raises: merging is explicit, never a side effect.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from .. import backend as bk
from .. import functional as F
from ..nn import Linear, Module, Parameter
from ..tensor import is_grad_enabled
from .config import BASE_ADAPTER, LoRAConfig, check_adapter_name
from .mixed import group_rows, mixed_lora_linear

__all__ = ["AdapterDict", "LoRALinear"]


class AdapterDict(Module):
    """Parameters by adapter name: ``layer.lora_A["e2e"]`` is the Parameter ``<layer>.lora_A.e2e``.

    Stored in ``_parameters`` only (not as attributes), so an adapter may be called anything
    that ``check_adapter_name`` allows without clashing with Module's own attributes.
    """

    def __getitem__(self, name: str) -> Parameter:
        return self._parameters[name]

    def __setitem__(self, name: str, value: Parameter) -> None:
        if not isinstance(value, Parameter):
            raise TypeError(f"AdapterDict holds Parameters, got {type(value).__name__}")
        self._parameters[name] = value

    def __delitem__(self, name: str) -> None:
        del self._parameters[name]

    def __contains__(self, name) -> bool:
        return name in self._parameters

    def __iter__(self):
        return iter(self._parameters)

    def __len__(self) -> int:
        return len(self._parameters)

    def keys(self):
        return self._parameters.keys()

    def items(self):
        return self._parameters.items()

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {tuple(p.shape)}" for n, p in self._parameters.items())


def _as_names(names) -> list:
    return [names] if isinstance(names, str) else list(names)


class LoRALinear(Module):
    """A Linear layer plus named LoRA adapters; forward adds (α/r)·B A x of the active adapter(s)."""

    def __init__(self, base: Linear, layer_name: str | None = None):
        super().__init__()
        if not isinstance(base, Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: W0 keeps its name and its data
        self.bias = base.bias
        self.lora_A = AdapterDict()  # adapter name -> (r, in_features)
        self.lora_B = AdapterDict()  # adapter name -> (out_features, r)
        self.lora_config: dict[str, LoRAConfig] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._merge_records: list = []  # [(adapter names, pre-merge weight copy or None)], oldest first
        self._disabled = 0
        self.layer_name = layer_name or "LoRALinear"
        self._peers = [self]  # every LoRALinear of the same model (set by apply_lora): adapter names model-wide

    # ------------------------------------------------------------------ facts
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def adapters(self) -> list:
        return list(self.lora_A.keys())

    def scaling(self, name: str) -> float:
        return self.lora_config[self._require(name)].scaling

    def _require(self, name: str) -> str:
        if name not in self.lora_A:
            raise ValueError(f"{self.layer_name} has no adapter {name!r}; its adapters are {self.adapters}")
        return name

    def _where(self) -> str:
        return f"{self.layer_name} (weight {tuple(self.weight.shape)})"

    def extra_repr(self) -> str:
        state = f", active={self.active_adapters}" + (f", merged={self.merged_adapters}" if self.merged else "")
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{state}"

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, config: LoRAConfig, activate: bool = True) -> None:
        """Add adapter ``name``: B = 0 and A random (``config.init``), so outputs do not change.

        With ``activate`` (the default) it becomes the only active adapter of this layer.
        """
        check_adapter_name(name)
        if not isinstance(config, LoRAConfig):
            raise TypeError(f"add_adapter needs a LoRAConfig, got {type(config).__name__}")
        if name in self.lora_A:
            raise ValueError(f"{self.layer_name} already has an adapter {name!r}; delete_adapter({name!r}) first or pick another name")
        d, k = self.weight.shape
        if config.r > min(d, k):
            raise ValueError(
                f"LoRAConfig.r={config.r} is larger than min(d, k) = {min(d, k)} of {self._where()}: "
                f"a rank-r update of a {d}x{k} matrix needs r <= {min(d, k)}"
            )
        if activate and self.merged:
            raise RuntimeError(self._merged_message(f"activate the new adapter {name!r}"))
        dtype, backend = self.weight.dtype, self.weight.backend
        r = config.r
        if config.init == "kaiming":  # loralib: kaiming_uniform_(A, a=√5) -> U(-1/√k, 1/√k)
            bound = 1.0 / math.sqrt(k)
            lora_A = bk.random_uniform((r, k), dtype, backend=backend, low=-bound, high=bound)
        else:  # "gaussian": the paper's "random Gaussian", with PEFT's σ = 1/r
            lora_A = bk.random_normal((r, k), dtype, backend=backend, std=1.0 / r)
        self.lora_A[name] = Parameter(lora_A, backend=backend)  # on W0's backend, whatever the current one is
        self.lora_B[name] = Parameter(bk.module_for(backend).zeros((d, r), dtype=dtype), backend=backend)
        self.lora_config[name] = config
        if activate:
            self.active_adapters = [name]

    def set_adapter(self, names) -> None:
        """Make ``names`` (one name or a list: their updates add up) the active adapter(s)."""
        names = _as_names(names)
        for name in names:
            self._require(name)
        if self.merged and names != self.active_adapters:
            raise RuntimeError(self._merged_message(f"switch the active adapter to {names}"))
        self.active_adapters = list(dict.fromkeys(names))

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (a merged layer is unmerged first, so W returns to W0)."""
        self._require(name)
        if name in self.merged_adapters:
            self.unmerge()
        del self.lora_A[name]
        del self.lora_B[name]
        del self.lora_config[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    @contextlib.contextmanager
    def disable_adapters(self):
        """``with layer.disable_adapters():`` forward gives the base layer's W₀x + b."""
        if self.merged:
            raise RuntimeError(self._merged_message("disable the adapters"))
        self._disabled += 1
        try:
            yield self
        finally:
            self._disabled -= 1

    def _merged_message(self, what: str) -> str:
        return (
            f"{self.layer_name}: cannot {what} while adapters {self.merged_adapters} are merged into the weight; "
            "call lora.unmerge(model) first"
        )

    # ------------------------------------------------------------------ forward
    def forward(self, x, adapter_ids=None):
        """h = W₀x + b + Σ_active s·B A drop(x); ``adapter_ids``: one adapter name per row (mixed batch)."""
        if self._disabled:
            return F.linear(x, self.weight, self.bias)
        if self.merged:
            self._check_not_training_merged()
        if adapter_ids is not None:
            return self._forward_mixed(x, adapter_ids)
        pending = [a for a in self.active_adapters if a not in self.merged_adapters]
        if not pending:  # no adapter, or every active one is merged into the weight: the base cost
            return F.linear(x, self.weight, self.bias)
        first, *rest = pending
        cfg = self.lora_config[first]
        h = F.lora_linear(x, self.weight, self.bias, self.lora_A[first], self.lora_B[first], cfg.scaling,
                          dropout=cfg.dropout, training=self.training)
        for name in rest:  # several active adapters: their low-rank updates add up
            cfg = self.lora_config[name]
            x_dropped = F.dropout(x, cfg.dropout, self.training)
            u = x_dropped @ self.lora_A[name].swapaxes(-1, -2)  # (..., r)
            h = h + (u @ self.lora_B[name].swapaxes(-1, -2)) * cfg.scaling
        return h

    def _check_not_training_merged(self) -> None:
        trainable = [a for a in self.merged_adapters if self.lora_A[a].requires_grad or self.lora_B[a].requires_grad]
        if trainable and self.training and is_grad_enabled():
            raise RuntimeError(
                f"{self.layer_name}: adapters {trainable} are merged into the weight, so training now would "
                "give their A and B no gradient (and W0 + BA would drift from A and B). Call lora.unmerge(model) "
                "before training; for inference call model.eval() or run under ml.no_grad()"
            )

    def _forward_mixed(self, x, adapter_ids):
        if self.merged:
            raise RuntimeError(self._merged_message("run a mixed-task batch (it needs the unmerged W0)"))
        groups = group_rows(adapter_ids, self.weight.backend)
        if x.ndim < 2 or groups.n_rows != x.shape[0]:
            raise ValueError(
                f"{self.layer_name}: adapter_ids has {groups.n_rows} names but the input of shape {tuple(x.shape)} "
                f"has {x.shape[0] if x.ndim else 0} rows (one adapter name per row of the first axis)"
            )
        names, selectors = [], []
        for name, sel in zip(groups.names, groups.selectors):
            if name in self.lora_A:
                names.append(name)
                selectors.append(sel)
            elif not any(name in peer.lora_A for peer in self._peers):
                known = list(dict.fromkeys(n for peer in self._peers for n in peer.lora_A))
                raise ValueError(
                    f"unknown adapter {name!r} in adapter_ids; the model's adapters are {known} "
                    f"(and {BASE_ADAPTER!r} for the base model)"
                )
            # else: the adapter exists but does not adapt this layer: its rows get W0 x + b here
        if not names:
            return F.linear(x, self.weight, self.bias)
        configs = [self.lora_config[n] for n in names]
        if len(names) == 1 and isinstance(selectors[0], slice) and selectors[0] == slice(0, groups.n_rows):
            cfg = configs[0]  # one adapter for every row: the plain fused layer
            return F.lora_linear(x, self.weight, self.bias, self.lora_A[names[0]], self.lora_B[names[0]],
                                 cfg.scaling, dropout=cfg.dropout, training=self.training)
        return mixed_lora_linear(
            x, self.weight, self.bias, [self.lora_A[n] for n in names], [self.lora_B[n] for n in names],
            [c.scaling for c in configs], selectors, dropouts=[c.dropout for c in configs], training=self.training,
        )

    # ------------------------------------------------------------------ merge
    def delta_weight(self, names) -> object:
        """ΔW = Σ s·B A over ``names``, formed in float64 (an array of shape (d, k))."""
        xp = bk.module_for(self.weight.backend)
        delta = xp.zeros(self.weight.shape, dtype=np.float64)
        for name in _as_names(names):
            lora_B = self.lora_B[name].data.astype(np.float64)
            lora_A = self.lora_A[name].data.astype(np.float64)
            delta += (lora_B @ lora_A) * self.lora_config[name].scaling
        return delta

    def plan_merge(self, names) -> object:
        """W₀ + ΔW in the weight's dtype, checked finite; nothing is written (see ``lora.merge``)."""
        names = _as_names(names)
        for name in names:
            self._require(name)
            if self.training and self.lora_config[name].dropout > 0.0:
                raise RuntimeError(
                    f"{self.layer_name}: adapter {name!r} has dropout={self.lora_config[name].dropout} and the layer "
                    "is in training mode, where its update is random; call model.eval() before merging"
                )
        xp = bk.module_for(self.weight.backend)
        delta = self.delta_weight(names)
        if not bool(xp.isfinite(delta).all()):
            bad = int((~xp.isfinite(delta)).sum())
            raise FloatingPointError(
                f"merge refused: ΔW = s·B A of adapter(s) {names} in {self._where()} has {bad} non-finite "
                "values (NaN or inf in lora_A / lora_B); no weight was changed"
            )
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below, with the layer's name
            merged = (self.weight.data.astype(np.float64) + delta).astype(self.weight.dtype)
        if not bool(xp.isfinite(merged).all()):
            raise FloatingPointError(
                f"merge refused: W0 + ΔW of adapter(s) {names} in {self._where()} is not finite in "
                f"{self.weight.dtype} (overflow, or a non-finite W0); no weight was changed"
            )
        return merged

    def commit_merge(self, names, merged_weight, keep_original: bool = True) -> None:
        """Write a planned W₀ + ΔW into the weight, in place (references to it stay valid)."""
        original = self.weight.data.copy() if keep_original else None
        self.weight.data[...] = merged_weight
        self._merge_records.append((tuple(_as_names(names)), original))
        self.merged_adapters.extend(_as_names(names))

    def unmerge(self) -> None:
        """Undo every merge of this layer, newest first.

        A merge made with ``keep_original=True`` restores the saved weight (bit-exact); one made
        without subtracts ΔW recomputed in float64 — exact up to the rounding of the merged
        weight: at most 1 ulp of W₀ + ΔW per element (about 6e-8 relative in float32).
        """
        for names, original in reversed(self._merge_records):
            if original is not None:
                self.weight.data[...] = bk.asarray(original, dtype=self.weight.dtype, backend=self.weight.backend)
            else:
                restored = self.weight.data.astype(np.float64) - self.delta_weight(names)
                self.weight.data[...] = restored.astype(self.weight.dtype)
        self._merge_records = []
        self.merged_adapters = []
