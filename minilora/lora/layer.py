"""LoRALinear: a Linear layer with named low-rank adapters, h = W₀x + b + (α/r)·B A x (eq. 3).

The wrapped layer keeps its own Parameters under their own names, so the state-dict key of
the frozen weight stays ``blocks.0.attn.q.weight`` and a base checkpoint loads unchanged;
each adapter adds ``blocks.0.attn.q.lora_A.<adapter>`` (r, k) and ``...lora_B.<adapter>`` (d, r),
and a DoRA adapter also ``...lora_magnitude.<adapter>`` (d,).

    layer = LoRALinear(nn.Linear(128, 128))
    layer.add_adapter("e2e", LoRAConfig(r=4, alpha=8, target_modules=("q",)))
    h = layer(x)                       # W0 x + b + 2 · B A x, one fused op (lora.function.lora_linear)
    with layer.disable_adapters():     # the base layer's output
        h0 = layer(x)

States: an adapter is *active* (used by forward), and possibly *merged* (B A already added into
the weight, so forward is a plain F.linear: no extra latency, Sec. 4.2). Changing what is
active while something is merged raises: merging is explicit, never a side effect.
Several active adapters add their updates; inside ``lora.mixed_batch`` (which sets
``row_groups``) row i of the input uses its own adapter instead. Every path is an op built on
the pieces of ``lora/function.py``, where the equation and its backward are written once.

Variants (``LoRAConfig``): each adapter has a variant (``variant.py``) that supplies the parts
where it differs from plain LoRA; ``use_dora`` gives ``dora.DORA`` (its magnitude, ``dora_linear``
and the merged weight m ⊙ V / ‖V‖_row), so this file holds no DoRA code. ``init="pissa"`` starts
A and B at the top-r singular triplets of W₀ and replaces W₀ by the residual (``_pissa_init``);
after ``lora.quantize_base`` the weight is an NF4 ``QuantizedWeight`` (no merging, no PiSSA).
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np

from .. import backend as bk
from .. import functional as F
from ..nn import Linear, Module, Parameter
from ..io import tensor_fingerprint
from ..quant import QuantizedWeight
from ..tensor import is_grad_enabled
from .config import ADAPTER_PARTS, LoRAConfig, as_adapter_names, check_adapter_name, check_rank
from .dora import DORA
from .function import delta_weight
from .mixed_op import mixed_lora_linear
from .quantized import nf4_linear
from .variant import LORA

_VARIANTS = (DORA,)  # an adapter whose config one of these applies to uses its parts; the others are plain LoRA


def variant_for(config: LoRAConfig):
    """The variant of an adapter made with ``config``: the first of ``_VARIANTS`` that applies, else LoRA."""
    return next((v for v in _VARIANTS if v.applies(config)), LORA)

__all__ = ["AdapterDict", "LoRALinear", "MergedWeightChangedWarning"]


class MergedWeightChangedWarning(UserWarning):
    """A merged weight W₀ + ΔW was changed before ``unmerge`` (trained, or loaded into)."""


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
        self.lora_magnitude = AdapterDict()  # DoRA adapters only: adapter name -> (out_features,)
        self.pissa_init: dict = {}  # PiSSA adapters only: name -> (A₀, B₀, original W₀) arrays
        self.lora_config: dict[str, LoRAConfig] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        # [(adapter names, pre-merge weight copy or None, the variant's unmerge state, fingerprint of W0 + ΔW)],
        # oldest first
        self._merge_records: list = []
        self._disabled = 0
        self.layer_name = layer_name or "LoRALinear"
        self.row_groups = None  # set by lora.mixed_batch for its block: one adapter per row of the input

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

    @property
    def quantized(self) -> bool:
        return isinstance(self.weight, QuantizedWeight)

    def _base(self, x):
        """W₀x + b alone (the base layer; NF4 after ``lora.quantize_base``)."""
        if self.quantized:
            return nf4_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def base_weight(self):
        """W₀ as this layer's adapters see it: the array a base fingerprint hashes (None for an NF4 weight).

        PiSSA keeps the original W₀ taken at its init (the weight holds the residual); a merged
        layer, the copy taken at its first merge (``keep_original``). A layer merged without a
        copy holds only W₀ + ΔW: RuntimeError (unmerge first).
        """
        if self.quantized:
            return None
        for _, _, original in self.pissa_init.values():
            return original
        if self._merge_records:
            first = self._merge_records[0][1]
            if first is None:
                raise RuntimeError(self._merged_message("tell its base weight W0 (merged with keep_original=False, so "
                                                        "no copy of W0 is kept)"))
            return first
        return self.weight.data

    def _variant(self, name: str):
        return variant_for(self.lora_config[name])

    def _merge_variant(self, names):
        """The one variant that merges ``names``: plain LoRA's, unless a variant with a merge of its own is among them."""
        return next((v for v in map(self._variant, names) if v is not LORA), LORA)

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
        check_rank(config.r, self.weight.shape, self._where())
        d, k = self.weight.shape
        if activate and self.merged:
            raise RuntimeError(self._merged_message(f"activate the new adapter {name!r}"))
        dtype, backend = self.weight.dtype, self.weight.backend
        r = config.r
        if self.pissa_init and config.init != "pissa":
            raise ValueError(
                f"{self.layer_name}: W0 here is the residual of the PiSSA adapter {next(iter(self.pissa_init))!r}, "
                f"not the base weight that adapter {name!r} (init={config.init!r}) would act on; convert the PiSSA "
                "adapter first (lora.pissa_to_lora(model, name) restores W0 and makes it a plain rank-2r LoRA)"
            )
        if config.init == "pissa":
            lora_A, lora_B = self._pissa_init(name, config)
        else:
            if config.init == "kaiming":  # loralib: kaiming_uniform_(A, a=√5) -> U(-1/√k, 1/√k)
                bound = 1.0 / math.sqrt(k)
                lora_A = bk.random_uniform((r, k), dtype, backend=backend, low=-bound, high=bound)
            else:  # "gaussian": the paper's "random Gaussian", with PEFT's σ = 1/r
                lora_A = bk.random_normal((r, k), dtype, backend=backend, std=1.0 / r)
            lora_B = bk.module_for(backend).zeros((d, r), dtype=dtype)
        self.lora_A[name] = Parameter(lora_A, backend=backend)  # on W0's backend, whatever the current one is
        self.lora_B[name] = Parameter(lora_B, backend=backend)
        variant_for(config).add_parts(self, name, config, lora_A, lora_B)
        self.lora_config[name] = config
        if activate:
            self.active_adapters = [name]

    def _pissa_init(self, name: str, config: LoRAConfig):
        """PiSSA (Meng et al. 2024): W₀ = U S Vᵀ; A = √(S_r/s)·V_rᵀ, B = U_r·√(S_r/s), so s·B·A = U_r S_r V_rᵀ.

        W₀ is replaced, in place, by the residual W₀ − s·B·A (formed in float64), so the layer's
        output is unchanged up to rounding. Returns (A, B) in the weight's dtype; (A₀, B₀, the
        original W₀) are kept in ``pissa_init``, from which ``lora.pissa_to_lora`` restores W₀ exactly.
        """
        if self.quantized:
            raise ValueError(f"{self.layer_name}: init='pissa' rewrites W0 into its residual, but W0 is stored in NF4 "
                             "here; add the PiSSA adapter before lora.quantize_base(model)")
        if self.lora_A:
            raise ValueError(
                f"{self.layer_name}: init='pissa' replaces W0 by its residual, which would change what the adapters "
                f"{self.adapters} were trained on; add the PiSSA adapter {name!r} to a layer without adapters"
            )
        xp = bk.module_for(self.weight.backend)
        original = self.weight.data.copy()
        W = original.astype(np.float64)
        U, S, Vt = xp.linalg.svd(W, full_matrices=False)  # W = U diag(S) Vᵀ, S descending
        r, s = config.r, config.scaling
        root = xp.sqrt(S[:r] / s)  # √(S_r / s)
        lora_A = root[:, None] * Vt[:r]  # (r, k)
        lora_B = U[:, :r] * root[None, :]  # (d, r)
        self.weight.data[...] = (W - s * (lora_B @ lora_A)).astype(self.weight.dtype)
        dtype = self.weight.dtype
        lora_A, lora_B = lora_A.astype(dtype), lora_B.astype(dtype)
        self.pissa_init[name] = (lora_A.copy(), lora_B.copy(), original)
        return lora_A, lora_B

    def set_adapter(self, names) -> None:
        """Make ``names`` (one name or a list: their updates add up) the active adapter(s)."""
        names = as_adapter_names(names)
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
        if name in self.lora_magnitude:
            del self.lora_magnitude[name]
        self.pissa_init.pop(name, None)
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

    def _load_refusal(self, names) -> str | None:
        """Loading into the weight, or into a merged adapter, while merged would mix W₀ + ΔW with new values."""
        if not self.merged:
            return None
        touched = [n for n in names if n == "weight"
                   or any(n == f"{p}.{a}" for p in ADAPTER_PARTS for a in self.merged_adapters)]
        if not touched:
            return None
        return (f"{self.layer_name}: cannot load {touched[0]} while adapters {self.merged_adapters} are merged into the "
                "weight (it holds W0 + ΔW: an unmerge would then subtract ΔW from the loaded values, or restore the "
                "pre-merge copy over them); call lora.unmerge(model) first, then load")

    def _merged_message(self, what: str) -> str:
        return (
            f"{self.layer_name}: cannot {what} while adapters {self.merged_adapters} are merged into the weight; "
            "call lora.unmerge(model) first"
        )

    # ------------------------------------------------------------------ forward
    def forward(self, x):
        """h = W₀x + b + Σ_active s·B·A·drop(x); under ``lora.mixed_batch`` row i uses its own adapter."""
        if self._disabled:
            return self._base(x)
        if self.merged:
            self._check_not_training_merged()
        if self.row_groups is not None:
            return self._forward_mixed(x, self.row_groups)
        pending = [a for a in self.active_adapters if a not in self.merged_adapters]
        if not pending:  # no adapter, or every active one is merged into the weight: the base cost
            return self._base(x)
        if len(pending) == 1:
            return self._fused(x, pending[0])
        # several active adapters: the mixed op with every row in each group (their updates add up)
        if x.ndim < 2:  # the mixed op wants a row axis first
            return self._mixed(x.reshape(1, -1), pending, [slice(None)] * len(pending)).reshape(-1)
        return self._mixed(x, pending, [slice(None)] * len(pending))

    def _check_not_training_merged(self) -> None:
        trainable = [a for a in self.merged_adapters if self.lora_A[a].requires_grad or self.lora_B[a].requires_grad
                     or (a in self.lora_magnitude and self.lora_magnitude[a].requires_grad)]
        if trainable and self.training and is_grad_enabled():
            raise RuntimeError(
                f"{self.layer_name}: adapters {trainable} are merged into the weight, so training now would "
                "give their A and B no gradient (and W0 + BA would drift from A and B). Call lora.unmerge(model) "
                "before training; for inference call model.eval() or run under ml.no_grad()"
            )

    def _fused(self, x, name):
        """One adapter on every row: the fused op of its variant (LoRA's, or DoRA's)."""
        return self._variant(name).linear(self, x, name)

    def _mixed(self, x, names, selectors):
        configs = [self.lora_config[n] for n in names]
        magnitudes, detach_norms = zip(*(self._variant(n).mixed_parts(self, n) for n in names))
        return mixed_lora_linear(
            x, self.weight, self.bias, [self.lora_A[n] for n in names], [self.lora_B[n] for n in names],
            [c.scaling for c in configs], selectors, dropouts=[c.dropout for c in configs], training=self.training,
            magnitudes=list(magnitudes), detach_norms=list(detach_norms),
        )

    def _forward_mixed(self, x, groups):
        if self.merged:
            raise RuntimeError(self._merged_message("run a mixed-task batch (it needs the unmerged W0)"))
        if x.ndim < 2 or groups.n_rows != x.shape[0]:
            raise ValueError(
                f"{self.layer_name}: adapter_ids has {groups.n_rows} names but the input of shape {tuple(x.shape)} "
                f"has {x.shape[0] if x.ndim else 0} rows (one adapter name per row of the first axis)"
            )
        # an adapter that does not adapt this layer (lora.mixed_batch checked every name): W0 x + b for its rows
        chosen = [(name, sel) for name, sel in zip(groups.names, groups.selectors) if name in self.lora_A]
        if not chosen:
            return self._base(x)
        names, selectors = [n for n, _ in chosen], [sel for _, sel in chosen]
        if len(names) == 1 and isinstance(selectors[0], slice) and selectors[0] == slice(0, groups.n_rows):
            return self._fused(x, names[0])  # one adapter for every row: the plain fused op
        return self._mixed(x, names, selectors)

    # ------------------------------------------------------------------ merge
    def delta_weight(self, names) -> object:
        """ΔW = Σ s·B A over ``names``, formed in float64 (an array of shape (d, k))."""
        xp = bk.module_for(self.weight.backend)
        delta = xp.zeros(self.weight.shape, dtype=np.float64)
        for name in as_adapter_names(names):
            delta += delta_weight(self.lora_A[name].data, self.lora_B[name].data, self.lora_config[name].scaling)
        return delta

    def plan_merge(self, names) -> object:
        """W₀ + ΔW in the weight's dtype, checked finite; nothing is written (see ``lora.merge``).

        The adapters' variant checks the merge and makes the weight from W₀ + ΔW (DoRA: the plain
        matrix m ⊙ (W₀ + ΔW) / ‖W₀ + ΔW‖_row, no extra latency either, merged alone into an unmerged W₀).
        """
        names = as_adapter_names(names)
        for name in names:
            self._require(name)
            if self.training and self.lora_config[name].dropout > 0.0:
                raise RuntimeError(
                    f"{self.layer_name}: adapter {name!r} has dropout={self.lora_config[name].dropout} and the layer "
                    "is in training mode, where its update is random; call model.eval() before merging"
                )
        if self.quantized:
            raise RuntimeError(
                f"{self.layer_name}: W0 is stored in NF4 (lora.quantize_base), and W0 + ΔW would have to be "
                "re-quantized, losing the adapter's precision; serve it unmerged, or merge into a float copy of the "
                "model made before quantize_base"
            )
        variant = self._merge_variant(names)
        variant.check_merge(self, names)
        xp = bk.module_for(self.weight.backend)
        delta = self.delta_weight(names)
        if not bool(xp.isfinite(delta).all()):
            bad = int((~xp.isfinite(delta)).sum())
            raise FloatingPointError(
                f"merge refused: ΔW = s·B A of adapter(s) {names} in {self._where()} has {bad} non-finite "
                "values (NaN or inf in lora_A / lora_B); no weight was changed"
            )
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below, with the layer's name
            merged = variant.merged_weight(self, names, self.weight.data.astype(np.float64) + delta)
            merged = merged.astype(self.weight.dtype)
        if not bool(xp.isfinite(merged).all()):
            raise FloatingPointError(
                f"merge refused: W0 + ΔW of adapter(s) {names} in {self._where()} is not finite in "
                f"{self.weight.dtype} (overflow, or a non-finite W0); no weight was changed"
            )
        return merged

    def commit_merge(self, names, merged_weight, keep_original: bool = True) -> None:
        """Write a planned W₀ + ΔW into the weight, in place (references to it stay valid)."""
        names = as_adapter_names(names)
        original = self.weight.data.copy() if keep_original else None
        # the variant's state is kept in either case: a merged weight changed after the merge is unmerged with it
        state = self._merge_variant(names).unmerge_state(self, names)
        self.weight.data[...] = merged_weight
        self._merge_records.append((tuple(names), original, state, tensor_fingerprint(self.weight.data)))
        self.merged_adapters.extend(names)

    def _change_since_merge(self, names, original) -> float:
        """max |W − (W₀ + ΔW)| of the newest merge, recomputed from its pre-merge copy; nan without one."""
        if original is None:
            return float("nan")
        with np.errstate(over="ignore", invalid="ignore"):
            expected = self._merge_variant(names).merged_weight(self, names, original.astype(np.float64)
                                                                + self.delta_weight(names))
            expected = expected.astype(self.weight.dtype).astype(np.float64)
            return float(bk.get_array_module(expected).abs(self.weight.data.astype(np.float64) - expected).max())

    def unmerge(self) -> None:
        """Undo every merge of this layer, newest first.

        A merge made with ``keep_original=True`` restores the saved weight (bit-exact); one made
        without subtracts ΔW recomputed in float64 — exact up to the rounding of the merged
        weight: at most 1 ulp of W₀ + ΔW per element (about 6e-8 relative in float32).
        A merged weight that was changed after the merge (trained, written into) is detected by
        the fingerprint the merge recorded: then ΔW is subtracted in every case, so the change is
        kept alike in every layer, and a MergedWeightChangedWarning gives its size.
        """
        changed = bool(self._merge_records) and tensor_fingerprint(self.weight.data) != self._merge_records[-1][3]
        if changed:  # keep the change (W₀ ← W − ΔW, in every layer alike), never the stale pre-merge copy
            names, original, _, _ = self._merge_records[-1]
            size = self._change_since_merge(names, original)
            warnings.warn(
                f"{self.layer_name}: the merged weight W0 + ΔW of {list(names)} was changed after the merge "
                + (f"(max |change| {size:.3g})" if size == size else "(by how much is unknown: merged with "
                   "keep_original=False)")
                + "; unmerge subtracts ΔW and keeps that change, so W0 is not the pre-merge W0",
                MergedWeightChangedWarning, stacklevel=3,
            )
        for names, original, state, _ in reversed(self._merge_records):
            if original is not None and not changed:
                self.weight.data[...] = bk.asarray(original, dtype=self.weight.dtype, backend=self.weight.backend)
            else:
                restored = self._merge_variant(names).unmerged_weight(self, names, state)
                self.weight.data[...] = restored.astype(self.weight.dtype)
        self._merge_records = []
        self.merged_adapters = []
