"""LoRA on a whole model: apply, freeze, count, merge, switch adapters.

    lora.apply_lora(model, LoRAConfig(r=4, alpha=32, target_modules=("q", "v")))  # adapter "default"
    lora.mark_only_lora_as_trainable(model)     # W0 frozen: only A and B train (eq. 2)
    print(lora.trainable_summary(model))        # |Θ| = 2 × L̂ × d_model × r for square W0
    lora.merge(model); lora.unmerge(model)      # W = W0 + (α/r) B A, and back
    model = lora.merge_and_unload(model)        # a plain model: every LoRALinear is a Linear again
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict

from .. import backend as bk
from ..nn import Linear, Module
from .bias import add_bias_delta, bias_hosts, bias_targets
from .config import ADAPTER_PARTS, BIAS_MODES, LoRAConfig, as_adapter_names, check_adapter_name, check_rank
from .layer import LoRALinear, variant_for

__all__ = [
    "MergeWarning",
    "TrainableSummary",
    "adapter_unchanged",
    "apply_lora",
    "bias_delta_names",
    "check_adapters",
    "check_unmerged",
    "delete_adapter",
    "disable_adapters",
    "get_adapter_config",
    "layers_with",
    "list_adapters",
    "load_base_state_dict",
    "lora_layers",
    "lora_parameter_names",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge",
    "merge_and_unload",
    "set_adapter",
    "trainable_summary",
    "unmerge",
]


class MergeWarning(UserWarning):
    """A merge or unmerge that had nothing to do (already merged / nothing merged)."""


# ----------------------------------------------------------------------------- finding layers
def lora_layers(model: Module) -> list:
    """[(dotted path, LoRALinear)] in module order."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALinear)]


def list_adapters(model: Module) -> list:
    """Adapter names in the model, in the order they first appear."""
    return list(dict.fromkeys(n for _, layer in lora_layers(model) for n in layer.lora_A))


def check_adapters(model: Module, names, what: str = "") -> list:
    """The model's adapters (``list_adapters``); ValueError for the first of ``names`` that is not one of them.

    ``what`` (e.g. "merge") opens the message.
    """
    known = list_adapters(model)
    for name in names:
        if name not in known:
            raise ValueError(f"{what + ': ' if what else ''}the model has no adapter {name!r}; its adapters are {known}")
    return known


def layers_with(model: Module, name: str) -> list:
    """[(dotted path, LoRALinear)] of the layers that adapter ``name`` adapts; ValueError if none does."""
    check_adapters(model, [name])
    return [(p, layer) for p, layer in lora_layers(model) if name in layer.lora_A]


def get_adapter_config(model: Module, name: str) -> LoRAConfig:
    return layers_with(model, name)[0][1].lora_config[name]


def _matches(path: str, target: str) -> bool:
    """"q" matches "blocks.0.attn.q" (last component); "attn.q" or a full path match as dotted suffixes."""
    return path == target or path.endswith("." + target)


def resolve_targets(model: Module, config: LoRAConfig) -> list:
    """[(path, Linear or LoRALinear)] that ``config.target_modules`` names; checks names and ranks."""
    modules = list(model.named_modules())
    linears = [(p, m) for p, m in modules if p and isinstance(m, (Linear, LoRALinear))]
    chosen = OrderedDict()
    for target in config.target_modules:
        hits = [(p, m) for p, m in linears if _matches(p, target)]
        if not hits:
            names = list(dict.fromkeys(p.rsplit(".", 1)[-1] for p, _ in linears))
            others = [(p, m) for p, m in modules if p and _matches(p, target)]
            hint = ""
            if others:
                where = ", ".join(p for p, _ in others[:2]) + (", ..." if len(others) > 2 else "")
                hint = f"; {target!r} names {where} ({type(others[0][1]).__name__}), not a Linear layer"
            raise ValueError(
                f"LoRAConfig.target_modules: {target!r} matches no Linear layer of {type(model).__name__}{hint}. "
                f"The Linear layers are named {', '.join(names)} (e.g. {linears[0][0] if linears else 'none'})"
            )
        for p, m in hits:
            chosen[p] = m
    for p, m in chosen.items():
        check_rank(config.r, m.weight.shape, f"{p} (weight {tuple(m.weight.shape)})")
    return list(chosen.items())


def check_unmerged(model: Module, what: str) -> None:
    """RuntimeError, naming a merged layer, when ``what`` would run while adapters are merged into the weights."""
    merged = [p for p, layer in lora_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(
            f"cannot {what} while adapters are merged into the weights (e.g. {merged[0]}); call lora.unmerge(model) first"
        )


# ----------------------------------------------------------------------------- adapters
def apply_lora(model: Module, config: LoRAConfig, adapter_name: str = "default", activate: bool = True) -> Module:
    """Add adapter ``adapter_name`` to the Linear layers ``config.target_modules`` names (in place).

    Plain Linears are wrapped in LoRALinear (their weight and bias keep their names); layers
    wrapped already get one more adapter. Everything is checked before the model changes.
    With ``activate`` the new adapter becomes the model's active adapter. Returns ``model``.
    """
    check_adapter_name(adapter_name)
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"apply_lora needs a LoRAConfig, got {type(config).__name__}")
    if isinstance(model, (Linear, LoRALinear)):
        raise TypeError(
            "apply_lora adapts the Linear layers inside a model; for a single layer use "
            "lora.LoRALinear(layer) and layer.add_adapter(name, config)"
        )
    targets = resolve_targets(model, config)
    if adapter_name in list_adapters(model):
        raise ValueError(
            f"the model already has an adapter {adapter_name!r}; pick another adapter_name or "
            f"lora.delete_adapter(model, {adapter_name!r}) first"
        )
    check_unmerged(model, f"add adapter {adapter_name!r}")
    wrapped = []
    for path, module in targets:
        if isinstance(module, Linear):
            deltas = getattr(module, "lora_bias", None)
            module = LoRALinear(module, layer_name=path)
            if deltas is not None:  # bias deltas of other adapters (bias="all") move with the layer
                module.lora_bias = deltas
                module.register_forward_hook(deltas)
            model.replace_submodule(path, module)
        module.add_adapter(adapter_name, config, activate=False)
        wrapped.append((path, module))
    for _, module in bias_targets(model, config.bias, wrapped):
        add_bias_delta(module, adapter_name)  # Δb = 0: the outputs do not change
    if activate:
        set_adapter(model, adapter_name)
    return model


def set_adapter(model: Module, names) -> None:
    """Make ``names`` (one name, or a list whose updates add up) the active adapter(s) of every layer.

    Layers that a named adapter does not adapt use only the others (or act as the base layer).
    """
    names = as_adapter_names(names)
    check_adapters(model, names)
    check_unmerged(model, f"set the active adapter to {names}")
    for _, layer in lora_layers(model):
        layer.active_adapters = [n for n in dict.fromkeys(names) if n in layer.lora_A]
    for _, _, deltas in bias_hosts(model):
        deltas.active[:] = [n for n in dict.fromkeys(names) if n in deltas]


def delete_adapter(model: Module, name: str) -> None:
    """Remove adapter ``name`` from every layer; where it is merged, the layer is unmerged first.

    Refused (RuntimeError, nothing changed) where ``name`` is merged together with other
    adapters: unmerging would silently unmerge them too. Deleting the only active adapter
    leaves the model computing the base model's outputs, and a warning says so.
    """
    layers = layers_with(model, name)
    for path, layer in layers:
        others = [a for a in layer.merged_adapters if a != name]
        if name in layer.merged_adapters and others:
            raise RuntimeError(
                f"cannot delete adapter {name!r}: in {path} it is merged into the weight together with {others}, "
                "and deleting it would unmerge those too. Call lora.unmerge(model) first (then merge again what "
                "should stay merged)"
            )
    was_active = any(name in layer.active_adapters for _, layer in lora_layers(model))
    for _, layer in layers:
        layer.delete_adapter(name)
    for _, _, deltas in bias_hosts(model):  # the base biases were never changed: dropping Δb is enough
        if name in deltas:
            del deltas[name]
            deltas.active[:] = [a for a in deltas.active if a != name]
    if was_active and list_adapters(model) and not any(layer.active_adapters for _, layer in lora_layers(model)):
        warnings.warn(
            f"deleted adapter {name!r}, which was active: no adapter is active now, so the model computes the base "
            f"model's outputs; lora.set_adapter(model, name) activates one of {list_adapters(model)}",
            UserWarning, stacklevel=2,
        )


@contextlib.contextmanager
def disable_adapters(model: Module):
    """``with lora.disable_adapters(model):`` the model computes the base model's outputs."""
    check_unmerged(model, "disable the adapters")
    hosts = [deltas for _, _, deltas in bias_hosts(model)]
    with contextlib.ExitStack() as stack:
        for _, layer in lora_layers(model):
            stack.enter_context(layer.disable_adapters())
        for deltas in hosts:
            deltas.disabled += 1
            stack.callback(lambda d=deltas: setattr(d, "disabled", d.disabled - 1))
        yield model


# ----------------------------------------------------------------------------- training
def lora_parameter_names(model: Module) -> list:
    """Names of every lora_A / lora_B (and DoRA lora_magnitude) parameter (all adapters)."""
    return [f"{path}.{part}.{name}" for path, layer in lora_layers(model)
            for part in ADAPTER_PARTS for name in getattr(layer, part)]


def bias_delta_names(model: Module, adapter_name: str | None = None) -> list:
    """Names of the bias deltas ``<module>.lora_bias.<adapter>`` (of one adapter, or of all)."""
    return [f"{path}.lora_bias.{name}" for path, _, deltas in bias_hosts(model) for name in deltas
            if adapter_name is None or name == adapter_name]


def mark_only_lora_as_trainable(model: Module, bias: str | None = None) -> Module:
    """Freeze everything but the LoRA matrices (and the biases ``bias`` names): eq. 2 trains Θ only.

    bias: None takes the adapters' ``LoRAConfig.bias``: an adapter with bias "all" or "lora_only"
    trains its own bias deltas ``<module>.lora_bias.<adapter>`` (see ``lora.bias``), never the base
    biases; "none" freezes the deltas too. Frozen parameters have requires_grad=False and grad
    None, so backward never computes their gradient and optimizers keep no state for them.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; call lora.apply_lora(model, config) first")
    if bias is None:
        modes = sorted({cfg.bias for _, layer in layers for cfg in layer.lora_config.values()})
        if len(modes) > 1:
            raise ValueError(f"the adapters disagree on LoRAConfig.bias ({modes}); pass bias= explicitly")
        bias = modes[0] if modes else "none"
    if bias not in BIAS_MODES:
        raise ValueError(f"mark_only_lora_as_trainable: bias must be one of {BIAS_MODES}, got {bias!r}")
    trainable = set(lora_parameter_names(model)) | (set(bias_delta_names(model)) if bias != "none" else set())
    for name, p in model.named_parameters():
        p.requires_grad = name in trainable
        if not p.requires_grad:
            p.grad = None
    return model


def lora_state_dict(model: Module, adapter_name: str = "default") -> OrderedDict[str, object]:
    """{name: array} of one adapter: its lora_A / lora_B, DoRA's lora_magnitude, and its bias deltas
    (``...lora_bias.<adapter>``).

    Names are the model's own (``blocks.0.attn.q.lora_A.<adapter>``); the arrays are not copies.
    """
    layers = layers_with(model, adapter_name)
    wanted = {f"{path}.{part}.{adapter_name}" for path, _ in layers for part in ADAPTER_PARTS}
    wanted |= set(bias_delta_names(model, adapter_name))
    return OrderedDict((n, p.data) for n, p in model.named_parameters() if n in wanted)


def adapter_unchanged(model: Module, adapter_name: str) -> bool:
    """True when adapter ``adapter_name`` still computes what it started with: a training run changed nothing.

    Every B is still 0 (PiSSA: A and B still the A₀, B₀ of its SVD start), every bias delta 0,
    and a DoRA magnitude still the row norms of W₀.
    """
    xp_of = bk.get_array_module
    for _, layer in layers_with(model, adapter_name):
        A, B = layer.lora_A[adapter_name].data, layer.lora_B[adapter_name].data
        config = layer.lora_config[adapter_name]
        if adapter_name in layer.pissa_init:
            A0, B0, _ = layer.pissa_init[adapter_name]
            if not (bool(xp_of(A).array_equal(A, A0)) and bool(xp_of(B).array_equal(B, B0))):
                return False
        elif bool(B.any()):
            return False
        if not variant_for(config).at_init(layer, adapter_name):  # DoRA: m as it started
            return False
    params = dict(model.named_parameters())
    return not any(bool(params[n].data.any()) for n in bias_delta_names(model, adapter_name))


class TrainableSummary(dict):
    """{"trainable", "total", "percent", "lora"}; ``str()`` gives the one-line report."""

    def __str__(self) -> str:
        return (f"trainable params: {self['trainable']:,} || all params: {self['total']:,} || "
                f"trainable: {self['percent']:.4f} % (LoRA matrices: {self['lora']:,})")


def trainable_summary(model: Module) -> TrainableSummary:
    """Counts of trainable / all parameters; for LoRA on L̂ square d×d matrices, lora = 2·L̂·d·r."""
    lora_names = set(lora_parameter_names(model))
    params = list(model.named_parameters())
    trainable = sum(p.size for _, p in params if p.requires_grad)
    total = sum(p.size for _, p in params)
    lora = sum(p.size for n, p in params if n in lora_names)
    return TrainableSummary(trainable=int(trainable), total=int(total), lora=int(lora),
                            percent=100.0 * trainable / total if total else 0.0)


def load_base_state_dict(model: Module, state: dict, source: str = "base checkpoint"):
    """Load a base model's state dict into a LoRA model: every non-LoRA name must match, LoRA ones may be absent."""
    check_unmerged(model, "load base weights")
    lora_names = set(lora_parameter_names(model)) | set(bias_delta_names(model))
    params = [n for n, _ in model.named_parameters()]
    missing = [n for n in params if n not in state and n not in lora_names]
    unexpected = [n for n in state if n not in set(params)]
    if missing or unexpected:
        raise ValueError(f"{source} does not fit {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.load_state_dict(state, strict=False, source=source)


# ----------------------------------------------------------------------------- merge
def merge(model: Module, adapter_names=None, safe: bool = True, keep_original: bool = True) -> Module:
    """W ← W₀ + Σ s·B A for the active adapters (or ``adapter_names``), in place: no extra latency (Sec. 4.2).

    Explicit and idempotent: adapters merged already are skipped (a MergeWarning says so if
    nothing is left). ``safe``: every ΔW (formed in float64) and every W₀ + ΔW is computed and
    checked finite before the first weight is written, so a NaN leaves all weights bit-identical.
    ``keep_original``: keep a copy of each pre-merge weight so ``unmerge`` restores it bit-exactly
    (memory: one d×k array per merged layer); without it ``unmerge`` subtracts ΔW, exact to 1 ulp.
    Raises if an adapter with dropout > 0 is merged in training mode (call model.eval() first).
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; call lora.apply_lora(model, config) first")
    if adapter_names is not None:
        adapter_names = as_adapter_names(adapter_names)
        check_adapters(model, adapter_names, "merge")
    todo = []
    for _, layer in layers:
        names = adapter_names if adapter_names is not None else layer.active_adapters
        names = [n for n in names if n in layer.lora_A and n not in layer.merged_adapters]
        if names:
            todo.append((layer, names))
    if not todo:
        merged = list_adapters(model) if any(layer.merged for _, layer in layers) else []
        warnings.warn(
            "merge: nothing to do — " + ("already merged" if merged else "no active adapter to merge"),
            MergeWarning, stacklevel=2,
        )
        return model
    if safe:
        plans = [(layer, names, layer.plan_merge(names)) for layer, names in todo]  # raises before any write
        for layer, names, weight in plans:
            layer.commit_merge(names, weight, keep_original)
    else:  # one layer at a time: memory for one merged weight, but a failure leaves the earlier layers merged
        for done, (layer, names) in enumerate(todo):
            try:
                weight = layer.plan_merge(names)
            except FloatingPointError as exc:
                reason = str(exc).replace("; no weight was changed", "")
                raise FloatingPointError(
                    f"merge(safe=False) stopped at {layer.layer_name}: {done} of {len(todo)} layers were merged before "
                    f"it and stay merged (lora.unmerge(model) restores them; safe=True checks every layer before "
                    f"writing any); this layer and the {len(todo) - done - 1} after it are unchanged. {reason}"
                ) from None
            layer.commit_merge(names, weight, keep_original)
    return model


def unmerge(model: Module) -> Module:
    """Undo ``merge``: W returns to W₀ (bit-exact with keep_original, the default)."""
    merged = [layer for _, layer in lora_layers(model) if layer.merged]
    if not merged:
        warnings.warn("unmerge: nothing is merged", MergeWarning, stacklevel=2)
    for layer in merged:
        layer.unmerge()
    return model


def _plain_linear(layer: LoRALinear) -> Linear:
    """A Linear around the layer's own weight and bias Parameters (no new random init)."""
    linear = Linear.__new__(Linear)
    Module.__init__(linear)
    linear.in_features, linear.out_features = layer.in_features, layer.out_features
    linear.weight = layer.weight
    linear.bias = layer.bias
    return linear


def merge_and_unload(model: Module, adapter_names=None, safe: bool = True) -> Module:
    """Merge, then replace every LoRALinear by a plain Linear holding W₀ + ΔW; no LoRA parameter is left.

    Adapters that are not merged (inactive, or not in ``adapter_names``) are dropped.
    """
    if isinstance(model, LoRALinear):
        raise TypeError("merge_and_unload works on a model; for one layer call layer.plan_merge / commit_merge")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; call lora.apply_lora(model, config) first")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MergeWarning)
        merge(model, adapter_names, safe=safe, keep_original=False)
    for _, module, deltas in bias_hosts(model):  # fold the merged adapters' Δb into b, then drop the deltas
        folded = deltas.active if adapter_names is None else [n for n in as_adapter_names(adapter_names) if n in deltas]
        if not deltas.disabled:
            for name in folded:
                module.bias.data += deltas[name].data
        del module.lora_bias
        module.remove_forward_hook(deltas)
    for path, layer in layers:
        model.replace_submodule(path, _plain_linear(layer))
    return model

