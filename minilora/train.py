"""The fit loop: progress bar, periodic eval, atomic best/last checkpoints, bit-identical resume, NaN guard.

    history = fit(model, optimizer, get_batch, steps=300, eval_fn=..., checkpoint_dir="run/")

``get_batch(step)`` returns (idx, targets, mask) for a step number — a pure function of
the step, so a resumed run sees exactly the batches the uninterrupted run would have seen.
Checkpoints hold the trainable parameters (all of them for full fine-tuning, only A and B
for LoRA: the paper's 350 GB → 35 MB), the optimizer state, the step, the history and the
RNG state.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from . import backend as bk
from .io import FileFormatError, load_arrays, save_arrays
from .lora import mixed_batch
from .optim import clip_grad_norm_

__all__ = ["fit", "History", "TrainingDivergedError", "epoch_batches", "save_checkpoint", "load_checkpoint"]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


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


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, model, optimizer=None, step: int = 0, history: History | None = None,
                    extra: dict | None = None, trainable_only: bool = True, scheduler=None) -> None:
    """Atomically write the (trainable) parameters, optimizer state, step, history and RNG state."""
    arrays = {f"param/{n}": p.data for n, p in model.named_parameters(trainable_only=trainable_only)}
    meta = {"step": int(step), "history": (history or History()).to_dict(), "extra": extra or {}}
    if optimizer is not None:
        opt_arrays, opt_meta = optimizer.state_arrays(), optimizer.state_meta()
        arrays.update({f"optim/{k}": v for k, v in opt_arrays.items()})
        meta["optimizer"] = opt_meta
    if scheduler is not None:
        meta["scheduler"] = scheduler.state_dict()
    if bk.backend_of(next(iter(arrays.values()), np.zeros(0))) == "numpy":
        meta["rng"] = bk.rng("numpy").bit_generator.state
    save_arrays(path, arrays, meta)


def load_checkpoint(path, model, optimizer=None, scheduler=None) -> tuple[int, History, dict]:
    """Load what ``save_checkpoint`` wrote back into ``model`` (and ``optimizer``); returns (step, history, extra)."""
    arrays, meta = load_arrays(path)
    params = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    named = dict(model.named_parameters())
    unknown = [n for n in params if n not in named]
    if unknown:
        raise FileFormatError(f"{path}: parameters {unknown[:5]} are not in the model (was it saved from another model?)")
    model.load_state_dict(params, strict=False, source=os.fspath(path))
    if optimizer is not None:
        if "optimizer" not in meta:
            raise FileFormatError(f"{path}: the checkpoint holds no optimizer state")
        opt = {k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")}
        optimizer.load_state_dict(meta["optimizer"], opt)
    if scheduler is not None and "scheduler" in meta:
        scheduler.load_state_dict(meta["scheduler"])
    if "rng" in meta:
        bk.rng("numpy").bit_generator.state = meta["rng"]
    return int(meta["step"]), History.from_dict(meta["history"]), meta.get("extra", {})


# ----------------------------------------------------------------------------- the loop
def _progress(total, initial, desc, enabled):
    """A progress bar: a widget in a Jupyter kernel, text on a terminal, none elsewhere.

    In a kernel without ipywidgets a text bar would print TqdmWarning and store every redraw in
    the notebook (kilobytes of them), so there is none; off a terminal (logs, CI) neither.
    """
    if not enabled or os.environ.get("TQDM_DISABLE", "").strip() not in ("", "0"):  # tqdm.notebook ignores it
        return None
    try:  # IPython exists only where Jupyter is installed
        from IPython import get_ipython

        in_kernel = getattr(get_ipython(), "kernel", None) is not None
    except ImportError:
        in_kernel = False
    kwargs = dict(total=total, initial=initial, desc=desc, unit="step", leave=False)
    if in_kernel:
        try:
            import ipywidgets  # noqa: F401  (tqdm.notebook needs it)
            from tqdm.notebook import tqdm as notebook_tqdm
        except ImportError:
            return None
        return notebook_tqdm(**kwargs)
    from tqdm import tqdm

    return tqdm(dynamic_ncols=True, disable=None, **kwargs)  # disable=None: off when stderr is no terminal


def fit(model, optimizer, get_batch, steps: int, *, scheduler=None, grad_clip: float | None = 1.0,
        eval_fn=None, eval_every: int = 0, best_key: str | None = None, higher_is_better: bool = True,
        checkpoint_dir=None, save_every: int = 0, resume: bool = False, progress: bool = True,
        desc: str = "train", adapter_ids=None) -> History:
    """Train ``model`` for ``steps`` optimizer steps and return the History.

    get_batch(step) -> (idx, targets, mask); the loss is ``model.loss`` (mean NLL over mask == 1).
    eval_fn(model) -> {name: value} every ``eval_every`` steps and at the end; the best value of
    ``best_key`` is checkpointed to ``checkpoint_dir/best.safetensors``. ``save_every`` writes
    ``last.safetensors``; ``resume=True`` continues from it bit-identically. A non-finite loss
    stops training with TrainingDivergedError before the bad update is applied.
    """
    history, start = History(), 0
    last_path = os.path.join(checkpoint_dir, "last.safetensors") if checkpoint_dir else None
    best_path = os.path.join(checkpoint_dir, "best.safetensors") if checkpoint_dir else None
    if resume:
        if not last_path or not os.path.exists(last_path):
            raise FileNotFoundError(f"resume=True but there is no checkpoint at {last_path}")
        start, history, _ = load_checkpoint(last_path, model, optimizer, scheduler)
    params = model.parameters(trainable_only=True)
    bar = _progress(steps, start, desc, progress)
    model.train()
    t_start = time.perf_counter() - history.seconds

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
                    save_checkpoint(best_path, model, None, step, history)
        return metrics

    try:
        for step in range(start, steps):
            idx, targets, mask = get_batch(step)
            with mixed_batch(model, adapter_ids) if adapter_ids is not None else contextlib.nullcontext():
                loss = model.loss(idx, targets, mask)  # adapter_ids: row i trains adapter adapter_ids[i]
            value = float(loss.item())
            if not math.isfinite(value):
                where = f"; the last good checkpoint is {last_path}" if last_path and os.path.exists(last_path) else ""
                raise TrainingDivergedError(
                    f"loss became {value} at step {step}: training stopped before applying the update{where}. "
                    "Lower the learning rate or enable grad_clip."
                )
            optimizer.zero_grad()
            loss.backward()
            if grad_clip:
                clip_grad_norm_(params, grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            n_tokens = int(bk.to_numpy(mask).sum()) if mask is not None else int(np.prod(np.shape(idx)))
            history.steps.append(step)
            history.losses.append(value)
            history.lrs.append(float(optimizer.lr))
            history.tokens += n_tokens
            history.seconds = time.perf_counter() - t_start
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{history.tokens / max(history.seconds, 1e-9):.0f}")
            done = step + 1
            if eval_fn is not None and eval_every and done % eval_every == 0 and done < steps:
                evaluate(done)
            if last_path and save_every and done % save_every == 0:
                save_checkpoint(last_path, model, optimizer, done, history, scheduler=scheduler)
        if eval_fn is not None:
            evaluate(steps)
    finally:
        if bar is not None:
            bar.close()
    history.seconds = time.perf_counter() - t_start
    if last_path and save_every:
        save_checkpoint(last_path, model, optimizer, steps, history, scheduler=scheduler)
    return history
