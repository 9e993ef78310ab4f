"""The training checkpoint: one safetensors file a run can continue from, bit for bit.

    save_checkpoint("run/last.safetensors", model, optimizer, step, history, scheduler=sched)
    step, history, extra = load_checkpoint("run/last.safetensors", model, optimizer, sched)

A checkpoint holds the trainable parameters (all of them for full fine-tuning, only A and B
for LoRA: the paper's 350 GB → 35 MB), the optimizer state, the step, the history and the
RNG state, under a SHA-256 over all of it. It is never written with a NaN or inf in it, and
``load_checkpoint`` checks everything before it changes anything, so the last checkpoint of a
run is always one training can continue from.
"""

from __future__ import annotations

import math
import numbers
import os

import numpy as np

from . import backend as bk
from .history import History
from .io import FileFormatError, load_arrays, save_arrays, tensor_fingerprint

__all__ = ["save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]

CHECKPOINT_FORMAT = "minilora-checkpoint"
CHECKPOINT_VERSION = 1


def _nonfinite(arrays: dict) -> list:
    """Names of the floating-point arrays that hold NaN or inf."""
    bad = []
    for name, a in arrays.items():
        xp = bk.get_array_module(a)
        if np.issubdtype(a.dtype, np.floating) and not bool(xp.isfinite(a).all()):
            bad.append(name)
    return bad


def _frozen_fingerprints(model, saved) -> dict:
    """{name: ``io.tensor_fingerprint``} of every parameter a checkpoint does not hold (``saved``: "param/<name>")."""
    return {n: tensor_fingerprint(p.data) for n, p in model.named_parameters() if f"param/{n}" not in saved}


def save_checkpoint(path, model, optimizer=None, step: int = 0, history: History | None = None,
                    extra: dict | None = None, trainable_only: bool = True, scheduler=None) -> None:
    """Atomically write the (trainable) parameters, optimizer state, step, history and RNG state.

    Refuses (FloatingPointError, the previous file kept) when a parameter or an optimizer state
    array holds NaN or inf: a checkpoint always holds a state training can continue from. The
    metadata carries a SHA-256 over every tensor and the rest of the metadata and, when only the
    trainable parameters are saved, a fingerprint of each frozen one (the base model the run
    trains on), so ``load_checkpoint`` refuses another base.
    """
    arrays = {f"param/{n}": p.data for n, p in model.named_parameters(trainable_only=trainable_only)}
    meta = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "step": int(step),
            "params": "trainable" if trainable_only else "all",
            "history": (history or History()).to_dict(), "extra": extra or {}}
    if trainable_only:  # the frozen rest (the base model) is not saved: record which one it was
        meta["base_tensors"] = _frozen_fingerprints(model, arrays)
    if optimizer is not None:
        opt_arrays, opt_meta = optimizer.state_arrays(), optimizer.state_meta()
        arrays.update({f"optim/{k}": v for k, v in opt_arrays.items()})
        meta["optimizer"] = opt_meta
    if scheduler is not None:
        meta["scheduler"] = scheduler.state_dict()
    bad = _nonfinite(arrays)
    if bad:
        raise FloatingPointError(
            f"save_checkpoint refused to write {os.fspath(path)}: {', '.join(b.split('/', 1)[1] for b in bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''} hold NaN or inf values; the previous file (if any) is kept"
        )
    if bk.backend_of(next(iter(arrays.values()), np.zeros(0))) == "numpy":
        meta["rng"] = bk.rng("numpy").bit_generator.state
    save_arrays(path, arrays, meta)


def load_checkpoint(path, model, optimizer=None, scheduler=None,
                    restore_hyperparameters: bool = True, check_base: bool = True) -> tuple[int, History, dict]:
    """Load what ``save_checkpoint`` wrote back into ``model`` (and ``optimizer``, ``scheduler``).

    Returns (step, history, extra). Everything is checked before anything changes: the SHA-256
    over tensors and metadata, the format, every parameter (present, known, trainable here,
    same shape and dtype, finite), the optimizer and scheduler state, the step, the history and
    the RNG state. Any problem raises FileFormatError naming the file, and the model, the
    optimizer, the scheduler and the RNG are untouched.

    restore_hyperparameters: True restores the optimizer's lr (and betas, eps, weight decay)
    and the scheduler's base lr as saved, as PyTorch does. False keeps the ones the optimizer
    and scheduler were built with (the step counts and moments still come from the file): the
    way to resume a run with a lower learning rate or another schedule.

    check_base: refuse a checkpoint of trainable parameters whose recorded frozen parameters (the
    base model) differ from the model's; pass False when another base is meant. A model whose
    modules refuse the load in their present state (``Module.check_load``: a merged LoRA layer)
    raises RuntimeError, before anything changes.
    """
    path = os.fspath(path)
    arrays, meta = load_arrays(path, require_digest=True)
    _check_header(path, meta)
    params = _checked_params(path, model, arrays, meta)
    model.check_load(list(params), path)  # a merged LoRA layer refuses: its weight is W0 + ΔW now
    opt = {k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")}
    if optimizer is not None:
        if "optimizer" not in meta:
            raise FileFormatError(f"{path}: the checkpoint holds no optimizer state (a best-model checkpoint?); "
                                  "load it without an optimizer")
        try:
            optimizer.check_state(meta["optimizer"], opt)
        except (ValueError, TypeError, KeyError) as exc:
            raise FileFormatError(f"{path}: {exc}") from None
    if scheduler is not None:
        _check_scheduler(path, meta.get("scheduler"), optimizer, scheduler)
    rng_state = meta.get("rng")
    if rng_state is not None:
        _check_rng(path, rng_state)
    if check_base and meta.get("base_tensors") is not None:
        _check_base(path, model, params, meta["base_tensors"])
    # ---- every check passed: now change things
    model.load_state_dict(params, strict=False, source=path)
    if optimizer is not None:
        optimizer.load_state_dict(meta["optimizer"], opt, restore_hyperparameters=restore_hyperparameters)
    if scheduler is not None:
        state = dict(meta["scheduler"])
        if not restore_hyperparameters:
            state["base_lr"], state["base_lrs"] = scheduler.base_lr, list(scheduler.base_lrs)
        scheduler.load_state_dict(state)
    if rng_state is not None:
        bk.rng("numpy").bit_generator.state = rng_state
    return int(meta["step"]), History.from_dict(meta["history"]), meta.get("extra", {})


# ----------------------------------------------------------------------------- the checks, in load order
def _is_int(v, low=0) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low


def _is_number(v, low=-math.inf, high=math.inf) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high


def _check_header(path: str, meta: dict) -> None:
    """The format, its version, the step, the history and ``extra``."""
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise FileFormatError(f"{path}: not a minilora checkpoint (format {meta.get('format')!r}, expected "
                              f"{CHECKPOINT_FORMAT!r}; a checkpoint without an integrity record is refused)")
    if meta.get("format_version") != CHECKPOINT_VERSION:
        raise FileFormatError(f"{path}: checkpoint format_version {meta.get('format_version')!r}; this minilora reads "
                              f"version {CHECKPOINT_VERSION}")
    if not _is_int(meta.get("step")):
        raise FileFormatError(f"{path}: the stored step {meta.get('step')!r} is not a step number >= 0")
    problem = _check_history(meta.get("history"))
    if problem:
        raise FileFormatError(f"{path}: the stored training history is malformed: {problem}")
    if not isinstance(meta.get("extra", {}), dict):
        raise FileFormatError(f"{path}: the stored 'extra' is not a JSON object")


def _check_history(d) -> str | None:
    """What is wrong with a stored History dict (None: nothing)."""
    if not isinstance(d, dict):
        return f"it is a {type(d).__name__}"
    missing = [k for k in ("steps", "losses", "lrs", "evals", "seconds", "tokens", "best") if k not in d]
    if missing:
        return f"it has no {missing}"
    for key in ("steps", "losses", "lrs", "evals"):
        if not isinstance(d[key], list):
            return f"{key} is not a list"
    if not len(d["steps"]) == len(d["losses"]) == len(d["lrs"]):
        return f"steps, losses and lrs differ in length ({len(d['steps'])}, {len(d['losses'])}, {len(d['lrs'])})"
    if not all(_is_int(s) for s in d["steps"]):
        return "steps holds a value that is not a step number"
    if not all(_is_number(v) for v in d["losses"] + d["lrs"]):
        return "losses or lrs hold a value that is not a finite number"
    if not all(isinstance(e, list) and len(e) == 2 and _is_int(e[0]) and isinstance(e[1], dict) for e in d["evals"]):
        return "evals is not a list of [step, {name: value}]"
    if not _is_number(d["seconds"], 0.0) or not _is_int(d["tokens"]):
        return "seconds or tokens is not a number >= 0"
    best = d["best"]
    if best is not None and not (isinstance(best, dict) and set(best) == {"step", "value", "key"} and _is_int(best["step"])):
        return "best is not {'step', 'value', 'key'}"
    return None


def _checked_params(path: str, model, arrays: dict, meta: dict) -> dict:
    """{name: array} of the stored parameters: known, trainable here, all there, same shape and dtype, finite."""
    params = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    stray = [k for k in arrays if not k.startswith(("param/", "optim/"))]
    if stray:
        raise FileFormatError(f"{path}: tensors {stray[:3]} are neither parameters nor optimizer state")
    named = dict(model.named_parameters())
    unknown = [n for n in params if n not in named]
    if unknown:
        raise FileFormatError(f"{path}: parameters {unknown[:5]} are not in the model (was it saved from another model?)")
    scope = meta.get("params")
    if scope not in ("trainable", "all"):
        raise FileFormatError(f"{path}: the stored 'params' is {scope!r}, not 'trainable' or 'all'")
    expected = [n for n, p in named.items() if p.requires_grad or scope == "all"]
    absent = [n for n in expected if n not in params]
    if absent:
        raise FileFormatError(
            f"{path}: the model's {'trainable ' if scope != 'all' else ''}parameters {absent[:3]}"
            f"{' ...' if len(absent) > 3 else ''} are not in the checkpoint, so they would keep their current values; "
            "load it into a model with the same parameters trainable (e.g. after lora.mark_only_lora_as_trainable)"
        )
    frozen = [n for n in params if n not in set(expected)]
    if frozen:
        raise FileFormatError(
            f"{path}: the checkpoint holds {frozen[:3]}{' ...' if len(frozen) > 3 else ''}, frozen in this model; "
            "it was saved from a run that trained other parameters (full fine-tuning?)"
        )
    for name, a in params.items():
        p = named[name]
        if tuple(a.shape) != tuple(p.shape):
            raise FileFormatError(f"{path}: {name} has shape {tuple(a.shape)} in the checkpoint, the model's is {tuple(p.shape)}")
        if a.dtype != p.dtype:
            raise FileFormatError(f"{path}: {name} is {a.dtype} in the checkpoint but the model's is {p.dtype}; "
                                  f"convert the model with model.to(dtype='{a.dtype}') first")
    bad = _nonfinite(params)
    if bad:
        raise FileFormatError(f"{path}: parameters {bad[:3]} hold NaN or inf values")
    return params


def _check_scheduler(path: str, state, optimizer, scheduler) -> None:
    base_lrs = state.get("base_lrs", [state.get("base_lr")]) if isinstance(state, dict) else None
    n_groups = len(optimizer.param_groups) if optimizer is not None else len(scheduler.base_lrs)
    if not (isinstance(state, dict) and _is_number(state.get("base_lr"), 0.0) and _is_int(state.get("last_step"))
            and isinstance(base_lrs, list) and len(base_lrs) == n_groups and all(_is_number(v, 0.0) for v in base_lrs)):
        raise FileFormatError(f"{path}: the checkpoint holds no valid scheduler state for {n_groups} parameter "
                              f"group(s) ({str(state)[:60]}); load it without a scheduler")


def _check_rng(path: str, rng_state) -> None:
    probe = type(bk.rng("numpy").bit_generator)()
    try:
        probe.state = rng_state
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        raise FileFormatError(f"{path}: the stored RNG state is invalid ({exc})") from None


def _check_base(path: str, model, params: dict, recorded) -> None:
    """The frozen parameters (the base model) are the ones the checkpoint's run trained on."""
    if not isinstance(recorded, dict):
        raise FileFormatError(f"{path}: the stored 'base_tensors' is not a {{name: fingerprint}} object")
    here = _frozen_fingerprints(model, {f"param/{n}" for n in params})
    differ = [n for n in here if n in recorded and recorded[n] != here[n]]
    if differ:
        raise FileFormatError(
            f"{path}: the checkpoint was saved from a run on another base model: {len(differ)} of the model's "
            f"frozen parameters differ from the ones it records ({', '.join(differ[:3])}"
            f"{' ...' if len(differ) > 3 else ''}). Resume on the base it was trained on, or pass check_base=False "
            "to load_checkpoint if this base is meant")
