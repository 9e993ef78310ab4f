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
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import backend as bk
from .io import FileFormatError, load_arrays, save_arrays
from .lora import mixed_batch
from .optim import clip_grad_norm_

__all__ = ["fit", "History", "Progress", "length_grouped_batches", "TrainingDivergedError", "epoch_batches", "save_checkpoint", "load_checkpoint"]


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
class Progress:
    """Training progress: a tqdm bar on a terminal; in a log (no TTY) a few plain lines.

    ``update(done, loss, history)`` after each step, ``close()`` at the end. Without a TTY (or
    with ``enabled="lines"``: several processes writing to one terminal) a
    redrawn bar would write one line per step into the log, so instead a line is printed at
    25 %, 50 %, 75 % and 100 % of the steps: step, loss, tokens per second.
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0, stream=None):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None
        self.marks = sorted({max(1, (total * q) // 4) for q in (1, 2, 3, 4)}) if total > 0 else []
        if enabled is True and _is_tty(self.stream):  # enabled="lines": plain lines even on a terminal
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=False,
                            file=self.stream)

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
    bar = Progress(steps, desc, progress, initial=start)
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
            bar.update(step + 1, value, history)
            done = step + 1
            if eval_fn is not None and eval_every and done % eval_every == 0 and done < steps:
                evaluate(done)
            if last_path and save_every and done % save_every == 0:
                save_checkpoint(last_path, model, optimizer, done, history, scheduler=scheduler)
        if eval_fn is not None:
            evaluate(steps)
    finally:
        bar.close()
    history.seconds = time.perf_counter() - t_start
    if last_path and save_every:
        save_checkpoint(last_path, model, optimizer, steps, history, scheduler=scheduler)
    return history
