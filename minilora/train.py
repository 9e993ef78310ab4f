"""The training loop: progress bar, periodic eval, atomic best/last checkpoints, bit-identical resume, NaN guard.

    history = fit(model, optimizer, get_batch, steps=300, eval_fn=..., checkpoint_dir="run/")

``get_batch(step)`` returns a batch for a step number — a pure function of the step, so a
resumed run sees exactly the batches the uninterrupted run would have seen. A batch is
``(idx, targets, mask, ...)``; the loss is ``loss_fn(model, batch)``, by default
``model.loss(idx, targets, mask)``. ``get_batch`` may also return a list of batches: their
gradients add up before the one optimizer step (joint multi-adapter training runs this way).

The samplers (``epoch_batches``, ``length_grouped_batches``) live in ``minilora.data.samplers``,
the checkpoint format in ``minilora.checkpoint``, the bar in ``minilora.progress``; their names
are importable from here too.
"""

from __future__ import annotations

import math
import numbers
import os
import time

import numpy as np

from . import backend as bk
from . import optim
from .checkpoint import load_checkpoint, save_checkpoint
from .data.samplers import epoch_batches, length_grouped_batches
from .history import History
from .io import FileFormatError
from .progress import Progress

__all__ = ["fit", "model_loss", "History", "Progress", "length_grouped_batches", "TrainingDivergedError",
           "epoch_batches", "save_checkpoint", "load_checkpoint"]


class TrainingDivergedError(RuntimeError):
    """The loss, a gradient or a parameter became NaN or infinite; the last (finite) checkpoint is kept."""


def model_loss(model, batch):
    """``fit``'s default loss: ``model.loss(idx, targets, mask)``, the mean NLL over mask == 1."""
    idx, targets, mask = batch[:3]
    return model.loss(idx, targets, mask)


def _finite_params(params) -> bool:
    """True when every parameter is finite: one float64 sum per backend (NaN and inf survive a sum)."""
    sums = {}
    with np.errstate(over="ignore", invalid="ignore"):
        for p in params:
            xp = bk.get_array_module(p.data)
            sums.setdefault(id(xp), (xp, []))[1].append(xp.sum(p.data, dtype=xp.float64))
        return all(math.isfinite(float(xp.sum(xp.stack(parts)))) for xp, parts in sums.values())


def _tokens(batch) -> int:
    mask = batch[2]
    return int(bk.to_numpy(mask).sum()) if mask is not None else int(np.prod(np.shape(batch[0])))


class _Run:
    """What one ``fit`` call keeps beside the model: its history, its clipping, its checkpoints, the NaN guard's way back."""

    def __init__(self, model, optimizer, scheduler, checkpoint_dir, history: History, grad_clip, clip_groups):
        self.model, self.optimizer, self.scheduler, self.history = model, optimizer, scheduler, history
        self.params = model.parameters(trainable_only=True)
        self.grad_clip = grad_clip
        self.clip_groups = [self.params] if clip_groups is None else [list(group) for group in clip_groups]
        self.last_path = os.path.join(checkpoint_dir, "last.safetensors") if checkpoint_dir else None
        self.best_path = os.path.join(checkpoint_dir, "best.safetensors") if checkpoint_dir else None
        self.saved_step = None  # the step last.safetensors holds (None: no checkpoint of this run)

    def diverged(self, what: str, step: int, applied: bool) -> TrainingDivergedError:
        """The error to raise, after putting the model, optimizer and scheduler back to the last checkpoint."""
        lr = float(self.optimizer.lr)  # the lr that diverged (restoring the checkpoint may change it)
        restored = None
        if self.saved_step is not None:
            try:
                load_checkpoint(self.last_path, self.model, self.optimizer, self.scheduler)  # finite by construction
                restored = True
            except FileFormatError as exc:  # changed on disk since this run wrote it: say so, keep the real error
                restored = exc
        if restored is True:
            where = (f" The model, optimizer and scheduler were restored from the last checkpoint, {self.last_path} "
                     f"(step {self.saved_step}); to go on with a lower learning rate, build the optimizer with it and "
                     "call fit(..., resume=True, restore_hyperparameters=False).")
        elif restored is not None:
            where = f" The last checkpoint could not be restored ({restored}); the weights in memory are not usable."
        else:
            where = (" No checkpoint of this run exists (pass checkpoint_dir= and save_every= to keep one)"
                     + ("; the weights in memory are not finite." if applied else "."))
        clip = "" if self.grad_clip else " or clip gradients (grad_clip=1.0)"
        return TrainingDivergedError(
            f"{what} at step {step}: training stopped {'after' if applied else 'before'} applying the update.{where} "
            f"Lower the learning rate (it was {lr:.3g}){clip}."
        )

    def save(self, path, with_optimizer: bool, step: int) -> None:
        opt = self.optimizer if with_optimizer else None
        try:
            save_checkpoint(path, self.model, opt, step, self.history,
                            scheduler=self.scheduler if opt is not None else None)
        except FloatingPointError as exc:
            raise self.diverged(f"non-finite values reached the checkpoint ({exc})", step, True) from None
        if with_optimizer:
            self.saved_step = step

    def evaluate(self, step: int, eval_fn, best_key, higher_is_better: bool) -> None:
        metrics = eval_fn(self.model)
        self.model.train()
        self.history.evals.append((step, dict(metrics)))
        if best_key is None:
            return
        value, best = metrics[best_key], self.history.best
        if best is None or (value > best["value"] if higher_is_better else value < best["value"]):
            self.history.best = {"step": step, "value": value, "key": best_key}
            if self.best_path:
                self.save(self.best_path, False, step)


def _step(run: _Run, batches, loss_fn, step: int) -> tuple[float, int]:
    """One optimizer step over ``batches`` (gradients add up): (the sum of their losses, their counted tokens)."""
    run.optimizer.zero_grad()
    value, tokens = 0.0, 0
    for batch in batches:  # each batch's graph is freed after its backward
        loss = loss_fn(run.model, batch)
        value += float(loss.item())
        if not math.isfinite(value):
            raise run.diverged(f"loss became {value}", step, False)
        loss.backward()
        tokens += _tokens(batch)
    if run.grad_clip:
        for params in run.clip_groups:
            norm = optim.clip_grad_norm_(params, run.grad_clip)
            if not math.isfinite(norm):
                raise run.diverged(f"the gradient norm became {norm}", step, False)
    with np.errstate(over="ignore", invalid="ignore"):  # the guard just below reports it, with the step
        run.optimizer.step()
    if not _finite_params(run.params):
        raise run.diverged("the update made a parameter NaN or inf", step, True)
    if run.scheduler is not None:
        run.scheduler.step()
    return value, tokens


def fit(model, optimizer, get_batch, steps: int, *, loss_fn=model_loss, scheduler=None, grad_clip: float | None = 1.0,
        clip_groups=None, eval_fn=None, eval_every: int = 0, best_key: str | None = None, higher_is_better: bool = True,
        checkpoint_dir=None, save_every: int = 0, resume: bool = False, restore_hyperparameters: bool = True,
        progress: bool = True, desc: str = "train") -> History:
    """Train ``model`` for ``steps`` optimizer steps and return the History.

    get_batch(step) -> a batch, or a list of batches whose gradients add up; the loss is
    ``loss_fn(model, batch)`` (``model_loss``: the mean NLL over mask == 1). ``grad_clip`` clips
    the trained parameters' gradient norm, or each of ``clip_groups`` (lists of parameters) on
    its own. eval_fn(model) -> {name: value} every ``eval_every`` steps and at the end; the best
    value of ``best_key`` is checkpointed to ``checkpoint_dir/best.safetensors``. ``save_every``
    writes ``last.safetensors``; ``resume=True`` continues from it bit-identically (with
    ``restore_hyperparameters=False`` the optimizer's and scheduler's own lr is used instead of
    the saved one: resume with a lower learning rate).

    The NaN guard: a non-finite loss or gradient norm stops training before the update is
    applied; an update that makes a parameter non-finite stops it right after. Either way
    TrainingDivergedError says at which step, nothing non-finite is ever saved, and the model,
    optimizer and scheduler are put back to the last checkpoint (which is always finite).
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"fit: steps must be an integer >= 0, got {steps!r}")
    run = _Run(model, optimizer, scheduler, checkpoint_dir, History(), grad_clip, clip_groups)
    start = _resume(run, steps, restore_hyperparameters) if resume else 0
    history = run.history
    bar = Progress(steps, desc, progress, initial=start)
    model.train()
    t_start = time.perf_counter() - history.seconds
    try:
        for step in range(start, steps):
            batches = get_batch(step)
            value, tokens = _step(run, batches if isinstance(batches, list) else [batches], loss_fn, step)
            history.steps.append(step)
            history.losses.append(value)
            history.lrs.append(float(optimizer.lr))
            history.tokens += tokens
            history.seconds = time.perf_counter() - t_start
            bar.update(step + 1, value, history)
            done = step + 1
            if eval_fn is not None and eval_every and done % eval_every == 0 and done < steps:
                run.evaluate(done, eval_fn, best_key, higher_is_better)
            if run.last_path and save_every and done % save_every == 0:
                run.save(run.last_path, True, done)
        if eval_fn is not None:
            run.evaluate(steps, eval_fn, best_key, higher_is_better)
    finally:
        bar.close()
    history.seconds = time.perf_counter() - t_start
    if run.last_path and save_every:
        run.save(run.last_path, True, steps)
    return history


def _resume(run: _Run, steps: int, restore_hyperparameters: bool) -> int:
    """Load ``last.safetensors`` into the run; return the step it holds."""
    if not run.last_path or not os.path.exists(run.last_path):
        raise FileNotFoundError(f"resume=True but there is no checkpoint at {run.last_path}")
    start, run.history, _ = load_checkpoint(run.last_path, run.model, run.optimizer, run.scheduler,
                                            restore_hyperparameters)
    if start > steps:
        raise ValueError(f"fit: the checkpoint {run.last_path} is at step {start}, beyond steps={steps}; "
                         f"pass steps >= {start} to continue it (or another checkpoint_dir for a new run)")
    run.saved_step = start
    return start
