"""The fine-tuning runs the experiments read, each trained once per ``run_experiment`` call.

A ``Context`` is made once per call. ``ctx.run(task, method, seed, **hp)`` fine-tunes a copy of
the base model with ``minilora.recipes.finetune`` (the one pipeline: ``HYPERPARAMS`` unless
``hp`` overrides) and remembers the result, so ``all`` trains each configuration once even when
several experiments read it (the LoRA baseline is also the ``q+v, r = 4`` cell of Tables 5 and 6,
and the rank runs feed Figs. 3/4 and Table 7). ``ctx.prefetch(configs)`` trains many runs in
worker processes.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .. import backend as bk
from .. import lora
from ..methods import hyperparams
from ..models import GPT, GPTConfig, load_base
from ..recipes import finetune
from .settings import FAST_SETTINGS, FULL_SETTINGS, Settings

__all__ = ["Context", "Run", "train_run"]


@dataclass
class Run:
    """The result of one fine-tuning run, without the model (the LoRA matrices are kept as arrays)."""

    task: str
    method: str
    hp: dict
    seed: int
    metric_name: str
    metric: float
    trainable_params: int
    total_params: int
    train_seconds: float
    final_loss: float  # training loss, mean of the last 10 steps
    eval_loss: float = float("nan")  # NLL of the test targets (eq. 2 on held-out examples)
    skipped_train: int = 0
    # LoRA only: {layer path: {"A": (r, k), "A0": A at the start, "B": (d, r), "scaling": s, "delta": s·B·A}}
    lora: dict = field(default_factory=dict)


def _freeze(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


class Context:
    """Where an experiment writes (``path``), how big it is (``settings``), its base model and its runs."""

    def __init__(self, out_dir, fast: bool = False, progress: bool = True, base=None, workers: int | None = None):
        self.out_dir = os.fspath(out_dir)
        if workers is None:
            workers = int(os.environ.get("MINILORA_WORKERS", "0")) or (1 if fast else min(2, os.cpu_count() or 1))
        self.workers = max(1, int(workers))
        os.makedirs(self.out_dir, exist_ok=True)
        self.fast, self.progress = fast, progress
        self.settings = FAST_SETTINGS if fast else FULL_SETTINGS
        self.base, self.base_note = (base, "the model passed in") if base is not None else _load_base(fast)
        self._runs: dict = {}
        self.started = time.perf_counter()

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True, disable=not self.progress)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    # ------------------------------------------------------------------ runs
    def key(self, task, method, seed, hp) -> tuple:
        """The run's full configuration: what ``finetune`` will use (so equal settings share one run)."""
        settings = {**hyperparams(method, task), **hp}
        if method == "lora" and settings.get("alpha") is None:
            settings["alpha"] = 2.0 * settings["r"]  # apply_method's default
        return (task, method, int(seed), tuple(sorted((k, _freeze(v)) for k, v in settings.items())))

    def run(self, task: str, method: str, seed: int = 0, **hp) -> Run:
        """Fine-tune ``method`` on ``task`` (cached by its full configuration) and return the Run."""
        key = self.key(task, method, seed, hp)
        if key not in self._runs:
            self.prefetch([(task, method, seed, hp)])
        return self._runs[key]

    def prefetch(self, configs, desc: str = "fine-tuning") -> None:
        """Train every (task, method, seed, hp) of ``configs`` not trained yet, ``workers`` at a time.

        With ``workers`` > 1 the runs go to that many processes, each with one BLAS thread: a run
        is a long chain of small matmuls, which a second thread barely speeds up, while a second
        process doubles the throughput of a 2-core machine. Every run seeds itself, so the
        results do not depend on which process trained them.
        """
        todo, seen = [], set()
        for task, method, seed, hp in configs:
            key = self.key(task, method, seed, hp)
            if key not in self._runs and key not in seen:
                seen.add(key)
                todo.append((key, (task, method, seed, dict(hp), dict(key[3]))))
        if not todo:
            return
        with self.bar(len(todo), desc) as bar:
            if self.workers <= 1 or len(todo) == 1:
                for key, (task, method, seed, hp, full_hp) in todo:
                    bar.set_postfix_str(f"{task}/{method}")
                    self._runs[key] = train_run(self.base, self.settings, task, method, seed, hp, full_hp)
                    bar.update(1)
                return
            with one_blas_thread_for_children(), cf.ProcessPoolExecutor(
                    max_workers=min(self.workers, len(todo)), mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_worker, initargs=(self.base, self.settings)) as pool:
                futures = {pool.submit(_worker_run, *args): key for key, args in todo}
                for future in cf.as_completed(futures):
                    run = future.result()
                    self._runs[futures[future]] = run
                    bar.set_postfix_str(f"{run.task}/{run.method}")
                    bar.update(1)


_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def one_blas_thread_for_children():
    """Processes started inside see one BLAS thread (BLAS reads these variables when it loads); restored after."""
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update({k: "1" for k in _THREAD_VARS})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_WORKER: dict = {}


def _init_worker(base, settings) -> None:
    warnings.simplefilter("ignore")
    _WORKER["base"], _WORKER["settings"] = base, settings


def _worker_run(task, method, seed, hp, full_hp) -> Run:
    return train_run(_WORKER["base"], _WORKER["settings"], task, method, seed, hp, full_hp)


def _lora_arrays(model, adapter: str) -> dict:
    return {path: {"A": bk.to_numpy(layer.lora_A[adapter].data).astype(np.float64),
                   "B": bk.to_numpy(layer.lora_B[adapter].data).astype(np.float64),
                   "scaling": layer.scaling(adapter),
                   "delta": bk.to_numpy(layer.delta_weight(adapter))}
            for path, layer in lora.lora_layers(model)}


def train_run(base, s: Settings, task: str, method: str, seed: int, hp: dict, full_hp: dict) -> Run:
    """One fine-tuning run of ``method`` on ``task`` from ``base``; the LoRA matrices are kept."""
    initial = {}

    def keep_initial_A(model):
        if method == "lora":
            initial.update(_lora_arrays(model, task))

    result = finetune(task, method, base=base, steps=s.steps, batch_size=s.batch_size, seed=seed,
                      n_train=s.n_train, n_eval=s.n_eval, max_new_tokens=s.max_new_tokens,
                      progress=False, measure_memory=False, on_start=keep_initial_A, **hp)
    arrays = _lora_arrays(result.model, task) if method == "lora" else {}
    for path in arrays:
        arrays[path]["A0"] = initial[path]["A"]
    losses = result.history.losses
    return Run(task=task, method=method, hp=full_hp, seed=seed, metric_name=result.metric_name,
               metric=float(result.metric), trainable_params=int(result.trainable_params),
               total_params=int(result.total_params), train_seconds=float(result.train_seconds),
               final_loss=float(np.mean(losses[-10:])) if losses else float("nan"),
               eval_loss=float(result.eval_loss), skipped_train=int(result.skipped_train), lora=arrays)


def _load_base(fast: bool):
    """The shipped base model; in fast mode a freshly initialised GPT stands in when it is missing."""
    try:
        return load_base(), "the shipped base model (minilora/assets/base.safetensors)"
    except FileNotFoundError:
        if not fast:
            raise
        warnings.warn("the shipped base model is missing: --fast runs on a randomly initialised GPT", stacklevel=3)
        bk.manual_seed(0)
        return GPT(GPTConfig()), "a randomly initialised GPT (the shipped base model is missing)"
