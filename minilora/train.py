"""The fit loop: progress bar, periodic eval, atomic best/last checkpoints, bit-identical resume, NaN guard.

    history = fit(model, optimizer, get_batch, steps=300, eval_fn=..., checkpoint_dir="run/")

``get_batch(step)`` returns (idx, targets, mask) for a step number — a pure function of
the step, so a resumed run sees exactly the batches the uninterrupted run would have seen.
Checkpoints hold the trainable parameters (all of them for full fine-tuning, only A and B
for LoRA: the paper's 350 GB → 35 MB), the optimizer state, the step, the history and the
RNG state, under a SHA-256 over all of it. A checkpoint is never written with a NaN or inf in
it, and ``load_checkpoint`` checks everything before it changes anything, so the last
checkpoint of a run is always one training can continue from.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import backend as bk
from .io import FileFormatError, load_arrays, save_arrays, tensor_fingerprint
from .lora import mixed_batch
from .optim import clip_grad_norm_

__all__ = ["fit", "History", "Progress", "length_grouped_batches", "TrainingDivergedError", "epoch_batches", "save_checkpoint", "load_checkpoint"]


class TrainingDivergedError(RuntimeError):
    """The loss, a gradient or a parameter became NaN or infinite; the last (finite) checkpoint is kept."""


@dataclass
class History:
    steps: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    evals: list = field(default_factory=list)  # [(step, {name: value}), ...]
    seconds: float = 0.0
    tokens: int = 0
    best: dict | None = None  # {"step": s, "value": v, "key": name}

    def to_dict(self) -> dict:
        return {
            "steps": self.steps, "losses": self.losses, "lrs": self.lrs, "evals": self.evals,
            "seconds": self.seconds, "tokens": self.tokens, "best": self.best,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        h = cls(**{k: d[k] for k in ("steps", "losses", "lrs", "seconds", "tokens", "best")})
        h.evals = [(s, dict(m)) for s, m in d["evals"]]
        return h


def epoch_batches(n_examples: int, batch_size: int, seed: int):
    """``rows(step)``: the example indices of a step; each epoch is a fresh seeded permutation.

    A pure function of the step (no iterator state), which is what makes resume exact.
    """
    if n_examples < 1 or batch_size < 1:
        raise ValueError(f"epoch_batches: need at least one example and batch_size >= 1, got {n_examples}, {batch_size}")
    per_epoch = max(1, n_examples // batch_size)
    cache: dict[int, np.ndarray] = {}

    def rows(step: int) -> np.ndarray:
        epoch, i = divmod(step, per_epoch)
        order = cache.get(epoch)
        if order is None:
            order = np.random.default_rng([seed, epoch]).permutation(n_examples)
            cache.clear()
            cache[epoch] = order
        return order[i * batch_size:(i + 1) * batch_size]

    return rows


def length_grouped_batches(lengths, batch_size: int, seed: int, group: int = 16):
    """``rows(step)`` like ``epoch_batches``, with rows of similar length in a batch: less padding.

    A batch is padded to its longest row, so mixing lengths 30 and 62 wastes a quarter of the
    tokens (the task batches here: 23-26 %). Each epoch is the same seeded permutation as
    ``epoch_batches``, cut into windows of ``group`` batches; a window is sorted by length, cut
    into batches, and its batches are visited in a seeded random order. Every example is still
    seen once per epoch, and batches still draw on the whole length range over an epoch. A pure
    function of the step, so resume stays exact. ``group=1`` is ``epoch_batches``.
    """
    lengths = np.asarray(lengths)
    n_examples = len(lengths)
    if n_examples < 1 or batch_size < 1 or group < 1:
        raise ValueError(f"length_grouped_batches: need examples, batch_size >= 1 and group >= 1, got "
                         f"{n_examples}, {batch_size}, {group}")
    if group == 1:
        return epoch_batches(n_examples, batch_size, seed)
    per_epoch = max(1, n_examples // batch_size)
    cache: dict[int, list] = {}

    def epoch_order(epoch: int) -> list:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(n_examples)
        batches = []
        window = group * batch_size
        for start in range(0, per_epoch * batch_size, window):
            chunk = order[start:min(start + window, per_epoch * batch_size)]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]  # similar lengths side by side
            cut = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
            batches += [cut[j] for j in rng.permutation(len(cut))]  # and no short-to-long sweep
        return batches

    def rows(step: int) -> np.ndarray:
        epoch, i = divmod(step, per_epoch)
        batches = cache.get(epoch)
        if batches is None:
            batches = epoch_order(epoch)
            cache.clear()
            cache[epoch] = batches
        return batches[i]

    return rows


# ----------------------------------------------------------------------------- checkpoints
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


def _is_int(v, low=0) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low


def _is_number(v, low=-math.inf, high=math.inf) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high


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


def _check_hyperparameter(name: str, current, value) -> bool:
    if isinstance(current, bool):
        return isinstance(value, bool)
    if isinstance(current, tuple):
        return isinstance(value, list) and len(value) == len(current) and all(_is_number(v, 0.0, 1.0) and v < 1.0 for v in value)
    return _is_number(value, 0.0)


def _check_optimizer_state(path, optimizer, meta, arrays) -> None:
    """Everything ``Optimizer.load_state_dict`` will use, checked: raises FileFormatError, changes nothing."""
    kind = type(optimizer).__name__
    if not isinstance(meta, dict) or not isinstance(meta.get("params"), list) or not isinstance(meta.get("hyperparameters"), dict):
        raise FileFormatError(f"{path}: the optimizer state in the checkpoint is malformed")
    if meta.get("optimizer") != kind:
        raise FileFormatError(f"{path}: the optimizer state was saved by {meta.get('optimizer')!r}; this optimizer is {kind}. "
                              f"Resume with a {meta.get('optimizer')} (or start a fresh run)")
    saved = {}
    for entry in meta["params"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and _is_int(entry.get("step"))
                and isinstance(entry.get("shape"), list)):
            raise FileFormatError(f"{path}: the optimizer state has a malformed parameter entry {str(entry)[:80]}")
        saved[entry["name"]] = entry
    missing = [n for n in optimizer.names if n not in saved]
    unexpected = [n for n in saved if n not in set(optimizer.names)]
    if missing or unexpected:
        raise FileFormatError(
            f"{path}: the optimizer state is for other parameters (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "build the optimizer from the same named parameters, with the same ones trainable"
        )
    for name, (_, _, shape) in zip(optimizer.names, optimizer._layouts):
        if tuple(saved[name]["shape"]) != tuple(shape):
            raise FileFormatError(f"{path}: the optimizer state of {name!r} is for shape {tuple(saved[name]['shape'])}, "
                                  f"the parameter's is {tuple(shape)}")
    for key, value in meta["hyperparameters"].items():
        if key in optimizer._hyperparameters and not _check_hyperparameter(key, getattr(optimizer, key), value):
            raise FileFormatError(f"{path}: the optimizer's {key} = {value!r} in the checkpoint is not a valid value")
    wanted = {}
    for name, state in zip(optimizer.names, optimizer.state):
        for key, buf in state.items():
            wanted[f"{name}.{key}"] = buf
    extra = sorted(set(arrays) - set(wanted))
    if extra:
        raise FileFormatError(f"{path}: the checkpoint has optimizer arrays {extra[:3]} that this {kind} has no place for")
    for key, buf in wanted.items():
        if key not in arrays:
            raise FileFormatError(f"{path}: the optimizer array {key} is missing from the checkpoint")
        a = arrays[key]
        if tuple(a.shape) != tuple(buf.shape) or a.dtype != buf.dtype:
            raise FileFormatError(f"{path}: the optimizer array {key} is {a.dtype} {tuple(a.shape)} in the checkpoint, "
                                  f"this optimizer's is {buf.dtype} {tuple(buf.shape)}")
        if not np.isfinite(a).all():
            raise FileFormatError(f"{path}: the optimizer array {key} holds NaN or inf values")
        if key.endswith(".exp_avg_sq") and (a < 0).any():
            raise FileFormatError(f"{path}: the optimizer array {key} holds negative values (a second moment is >= 0)")
    try:  # the parameter groups and their options (lr, betas, ...): the optimizer's own check, which writes nothing
        optimizer._saved_group_options(meta, f"{kind}.load_state_dict")
    except (ValueError, TypeError, KeyError) as exc:
        raise FileFormatError(f"{path}: {exc}") from None


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
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise FileFormatError(f"{path}: not a minilora checkpoint (format {meta.get('format')!r}, expected "
                              f"{CHECKPOINT_FORMAT!r}; checkpoints of minilora <= 0.1 carry no integrity record)")
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
    model.check_load(list(params), path)  # a merged LoRA layer refuses: its weight is W0 + ΔW now
    if optimizer is not None:
        if "optimizer" not in meta:
            raise FileFormatError(f"{path}: the checkpoint holds no optimizer state (a best-model checkpoint?); "
                                  "load it without an optimizer")
        opt = {k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")}
        _check_optimizer_state(path, optimizer, meta["optimizer"], opt)
    if scheduler is not None:
        state = meta.get("scheduler")
        base_lrs = state.get("base_lrs", [state.get("base_lr")]) if isinstance(state, dict) else None
        n_groups = len(optimizer.param_groups) if optimizer is not None else len(scheduler.base_lrs)
        if not (isinstance(state, dict) and _is_number(state.get("base_lr"), 0.0) and _is_int(state.get("last_step"))
                and isinstance(base_lrs, list) and len(base_lrs) == n_groups and all(_is_number(v, 0.0) for v in base_lrs)):
            raise FileFormatError(f"{path}: the checkpoint holds no valid scheduler state for {n_groups} parameter "
                                  f"group(s) ({str(state)[:60]}); load it without a scheduler")
    rng_state = meta.get("rng")
    if rng_state is not None:
        probe = type(bk.rng("numpy").bit_generator)()
        try:
            probe.state = rng_state
        except (TypeError, ValueError, KeyError, OverflowError) as exc:
            raise FileFormatError(f"{path}: the stored RNG state is invalid ({exc})") from None
    recorded = meta.get("base_tensors")
    if check_base and recorded is not None:
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
    # ---- every check passed: now change things
    model.load_state_dict(params, strict=False, source=path)
    if optimizer is not None:
        kept = {k: getattr(optimizer, k) for k in optimizer._hyperparameters if k not in optimizer._group_options}
        kept_groups = [{k: group[k] for k in optimizer._group_options if k in group} for group in optimizer.param_groups]
        optimizer.load_state_dict(meta["optimizer"], opt)
        if not restore_hyperparameters:  # the optimizer's own options, group by group (LoRA+ ratios too)
            for k, v in kept.items():
                setattr(optimizer, k, v)
            for group, options in zip(optimizer.param_groups, kept_groups):
                group.update(options)
    if scheduler is not None:
        state = dict(meta["scheduler"])
        if not restore_hyperparameters:
            state["base_lr"], state["base_lrs"] = scheduler.base_lr, list(scheduler.base_lrs)
        scheduler.load_state_dict(state)
    if rng_state is not None:
        bk.rng("numpy").bit_generator.state = rng_state
    return int(meta["step"]), History.from_dict(meta["history"]), meta.get("extra", {})


# ----------------------------------------------------------------------------- the loop
class Progress:
    """Training progress: a widget in a Jupyter kernel, a tqdm bar on a terminal, a few plain lines in a log.

    ``update(done, loss, history)`` after each step, ``close()`` at the end. Without a TTY (or
    with ``enabled="lines"``: several processes writing to one terminal) a
    redrawn bar would write one line per step into the log, so instead a line is printed at
    25 %, 50 %, 75 % and 100 % of the steps: step, loss, tokens per second. In a kernel without
    ipywidgets a text bar would print TqdmWarning and store every redraw in the notebook, so
    there is no bar (``TQDM_DISABLE=1`` turns every bar off; tqdm.notebook ignores it itself).
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0, stream=None):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None
        self.marks = sorted({max(1, (total * q) // 4) for q in (1, 2, 3, 4)}) if total > 0 else []
        if enabled and os.environ.get("TQDM_DISABLE", "").strip() not in ("", "0"):
            self.enabled = False
        kwargs = dict(total=total, initial=initial, desc=desc, unit="step", leave=False)
        if self.enabled is True and _in_kernel():  # enabled="lines": plain lines, never a bar
            self.marks = []  # a notebook: the widget or nothing, never printed lines
            try:
                import ipywidgets  # noqa: F401  (tqdm.notebook needs it)
                from tqdm.notebook import tqdm as notebook_tqdm
            except ImportError:
                return
            self.bar = notebook_tqdm(**kwargs)
        elif self.enabled is True and _is_tty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(dynamic_ncols=True, file=self.stream, **kwargs)

    def update(self, done: int, loss: float, history: History) -> None:
        if not self.enabled:
            return
        tok_s = history.tokens / max(history.seconds, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}")
        elif done in self.marks:
            print(f"  {self.desc}: step {done}/{self.total}, loss {loss:.4f}, {tok_s:,.0f} tok/s, "
                  f"{history.seconds:.1f} s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _in_kernel() -> bool:
    """True inside a Jupyter kernel (IPython exists only where Jupyter is installed)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


def _finite_params(params) -> bool:
    """True when every parameter is finite: one float64 sum per backend (NaN and inf survive a sum)."""
    sums = {}
    with np.errstate(over="ignore", invalid="ignore"):
        for p in params:
            xp = bk.get_array_module(p.data)
            sums.setdefault(id(xp), (xp, []))[1].append(xp.sum(p.data, dtype=xp.float64))
        return all(math.isfinite(float(xp.sum(xp.stack(parts)))) for xp, parts in sums.values())


def fit(model, optimizer, get_batch, steps: int, *, scheduler=None, grad_clip: float | None = 1.0,
        eval_fn=None, eval_every: int = 0, best_key: str | None = None, higher_is_better: bool = True,
        checkpoint_dir=None, save_every: int = 0, resume: bool = False, restore_hyperparameters: bool = True,
        progress: bool = True, desc: str = "train", adapter_ids=None) -> History:
    """Train ``model`` for ``steps`` optimizer steps and return the History.

    get_batch(step) -> (idx, targets, mask); the loss is ``model.loss`` (mean NLL over mask == 1).
    eval_fn(model) -> {name: value} every ``eval_every`` steps and at the end; the best value of
    ``best_key`` is checkpointed to ``checkpoint_dir/best.safetensors``. ``save_every`` writes
    ``last.safetensors``; ``resume=True`` continues from it bit-identically (with
    ``restore_hyperparameters=False`` the optimizer's and scheduler's own lr is used instead of
    the saved one: resume with a lower learning rate).

    The NaN guard: a non-finite loss or gradient norm stops training before the update is
    applied; an update that makes a parameter non-finite stops it right after. Either way
    TrainingDivergedError says at which step, nothing non-finite is ever saved, and the model,
    optimizer and scheduler are put back to the last checkpoint (which is always finite).
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"fit: steps must be an integer >= 0, got {steps!r}")
    history, start = History(), 0
    last_path = os.path.join(checkpoint_dir, "last.safetensors") if checkpoint_dir else None
    best_path = os.path.join(checkpoint_dir, "best.safetensors") if checkpoint_dir else None
    saved_step = None  # the step last.safetensors holds (None: no checkpoint of this run)
    if resume:
        if not last_path or not os.path.exists(last_path):
            raise FileNotFoundError(f"resume=True but there is no checkpoint at {last_path}")
        start, history, _ = load_checkpoint(last_path, model, optimizer, scheduler, restore_hyperparameters)
        if start > steps:
            raise ValueError(f"fit: the checkpoint {last_path} is at step {start}, beyond steps={steps}; "
                             f"pass steps >= {start} to continue it (or another checkpoint_dir for a new run)")
        saved_step = start
    params = model.parameters(trainable_only=True)
    bar = Progress(steps, desc, progress, initial=start)
    model.train()
    t_start = time.perf_counter() - history.seconds

    def diverged(what: str, step: int, applied: bool):
        lr = float(optimizer.lr)  # the lr that diverged (restoring the checkpoint may change it)
        restored = None
        if saved_step is not None:
            try:
                load_checkpoint(last_path, model, optimizer, scheduler)  # finite by construction: back to it
                restored = True
            except FileFormatError as exc:  # changed on disk since this run wrote it: say so, keep the real error
                restored = exc
        if restored is True:
            where = (f" The model, optimizer and scheduler were restored from the last checkpoint, {last_path} "
                     f"(step {saved_step}); to go on with a lower learning rate, build the optimizer with it and "
                     "call fit(..., resume=True, restore_hyperparameters=False).")
        elif restored is not None:
            where = f" The last checkpoint could not be restored ({restored}); the weights in memory are not usable."
        else:
            where = (" No checkpoint of this run exists (pass checkpoint_dir= and save_every= to keep one)"
                     + ("; the weights in memory are not finite." if applied else "."))
        clip = "" if grad_clip else " or clip gradients (grad_clip=1.0)"
        return TrainingDivergedError(
            f"{what} at step {step}: training stopped {'after' if applied else 'before'} applying the update.{where} "
            f"Lower the learning rate (it was {lr:.3g}){clip}."
        )

    def save(path, opt, step):
        try:
            save_checkpoint(path, model, opt, step, history, scheduler=scheduler if opt is not None else None)
        except FloatingPointError as exc:
            raise diverged(f"non-finite values reached the checkpoint ({exc})", step, True) from None

    def evaluate(step):
        metrics = eval_fn(model)
        model.train()
        history.evals.append((step, dict(metrics)))
        if best_key is not None:
            value = metrics[best_key]
            better = history.best is None or (value > history.best["value"] if higher_is_better else value < history.best["value"])
            if better:
                history.best = {"step": step, "value": value, "key": best_key}
                if best_path:
                    save(best_path, None, step)
        return metrics

    try:
        for step in range(start, steps):
            idx, targets, mask = get_batch(step)
            with mixed_batch(model, adapter_ids) if adapter_ids is not None else contextlib.nullcontext():
                loss = model.loss(idx, targets, mask)  # adapter_ids: row i trains adapter adapter_ids[i]
            value = float(loss.item())
            if not math.isfinite(value):
                raise diverged(f"loss became {value}", step, False)
            optimizer.zero_grad()
            loss.backward()
            if grad_clip:
                norm = clip_grad_norm_(params, grad_clip)
                if not math.isfinite(norm):
                    raise diverged(f"the gradient norm became {norm}", step, False)
            with np.errstate(over="ignore", invalid="ignore"):  # the guard just below reports it, with the step
                optimizer.step()
            if not _finite_params(params):
                raise diverged("the update made a parameter NaN or inf", step, True)
            if scheduler is not None:
                scheduler.step()
            n_tokens = int(bk.to_numpy(mask).sum()) if mask is not None else int(np.prod(np.shape(idx)))
            history.steps.append(step)
            history.losses.append(value)
            history.lrs.append(float(optimizer.lr))
            history.tokens += n_tokens
            history.seconds = time.perf_counter() - t_start
            bar.update(step + 1, value, history)
            done = step + 1
            if eval_fn is not None and eval_every and done % eval_every == 0 and done < steps:
                evaluate(done)
            if last_path and save_every and done % save_every == 0:
                save(last_path, optimizer, done)
                saved_step = done
        if eval_fn is not None:
            evaluate(steps)
    finally:
        bar.close()
    history.seconds = time.perf_counter() - t_start
    if last_path and save_every:
        save(last_path, optimizer, steps)
    return history
