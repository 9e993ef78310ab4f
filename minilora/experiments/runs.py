"""The fine-tuning runs the experiments read, each trained once per ``run_experiment`` call.

A ``Context`` is made once per call. ``ctx.run(task, method, seed, **hp)`` fine-tunes a copy of
the base model with ``minilora.recipes.finetune`` (the one pipeline: ``HYPERPARAMS`` unless
``hp`` overrides) and remembers the result, so ``all`` trains each configuration once even when
several experiments read it (the LoRA baseline is also the ``q+v, r = 4`` cell of Tables 5 and 6,
and the rank runs feed Figs. 3/4 and Table 7). ``ctx.prefetch(configs)`` trains many runs in
worker processes.

Two entries of ``hp`` are not hyper-parameters: ``n_train`` (a low-data run: that many training
examples, drawn by the run's seed, so each seed sees its own subset) and ``eval_split`` ("test"
unless a run is there to choose a hyper-parameter on "val"). The method "base" is the base model
with no fine-tuning (``recipes.zero_shot``).
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
from ..data import SPLIT_SIZES
from ..methods import hyperparams, lora_alpha
from ..models import GPT, GPTConfig, load_base
from ..models.pretrained import base_sha256
from ..recipes import finetune, zero_shot
from .settings import FAST_SETTINGS, FULL_SETTINGS, Settings, plain

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
    n_train: int | None = None  # training examples (None: the settings' number, all 2,000 in full runs)
    eval_split: str = "test"
    text_scores: dict = field(default_factory=dict)  # e2e: BLEU and ROUGE-L against every reference
    # LoRA only: {layer path: {"A": (r, k), "A0": A at the start, "B": (d, r), "scaling": s, "delta": s·B·A}}
    lora: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """Every number of the run (not the LoRA matrices), for results.json."""
        out = {k: getattr(self, k) for k in ("task", "method", "seed", "n_train", "eval_split", "metric_name",
                                             "metric", "eval_loss", "trainable_params", "total_params",
                                             "train_seconds", "final_loss", "skipped_train")}
        out["hp"] = plain(self.hp)
        out.update(self.text_scores)
        return out


NOT_HYPERPARAMS = ("n_train", "eval_split")


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
        shipped = base is None and self.base_note.startswith("the shipped")
        self.base_sha256 = base_sha256() if shipped else None  # load_base checked the file against it
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
        settings = {"eval_split": "test", **({} if method == "base" else hyperparams(method, task)), **hp}
        if method == "lora" and settings.get("alpha") is None:
            settings["alpha"] = lora_alpha(settings["r"])  # apply_method's default
        if method == "base" or settings.get("n_train") in (None, self.settings.n_train, SPLIT_SIZES["train"]):
            settings.pop("n_train", None)  # the settings' number of examples (or the whole split): one run
        if method == "base":
            seed = 0  # nothing is drawn: one run stands for every seed
        return (task, method, int(seed), tuple(sorted((k, _freeze(v)) for k, v in settings.items())))

    def runs(self) -> list:
        """Every run trained so far, in a fixed order (task, method, seed, settings)."""
        return [self._runs[k] for k in sorted(self._runs, key=repr)]

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
                full_hp = {k: v for k, v in key[3] if k not in NOT_HYPERPARAMS}
                todo.append((key, (task, method, key[2], dict(hp), full_hp)))
        todo.sort(key=lambda item: -_expected_cost(*item[1][:3], item[1][4]))  # longest first: no idle worker at the end
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


def _expected_cost(task, method, seed, full_hp) -> float:
    """A rough relative cost of a run (its steps; a run with no training costs its decoding)."""
    return 1.0 if method == "base" else float(full_hp.get("steps", 1))


def train_run(base, s: Settings, task: str, method: str, seed: int, hp: dict, full_hp: dict) -> Run:
    """One fine-tuning run of ``method`` on ``task`` from ``base``; the LoRA matrices are kept."""
    hp = dict(hp)
    eval_split = hp.pop("eval_split", "test")
    n_train = hp.pop("n_train", None)
    if method == "base":
        result = zero_shot(task, base=base, n_eval=s.n_eval, eval_split=eval_split, max_new_tokens=s.max_new_tokens)
        return Run(task=task, method=method, hp={}, seed=seed, metric_name=result.metric_name,
                   metric=float(result.metric), trainable_params=0, total_params=int(result.total_params),
                   train_seconds=0.0, final_loss=float("nan"), eval_loss=float(result.eval_loss),
                   eval_split=eval_split, text_scores=result.text_scores)
    initial = {}

    def keep_initial_A(model):
        if method == "lora":
            initial.update(_lora_arrays(model, task))

    result = finetune(task, method, base=base, steps=s.steps, batch_size=s.batch_size, seed=seed,
                      n_train=s.n_train if n_train is None else n_train,
                      subset_seed=None if n_train is None else seed, n_eval=s.n_eval, eval_split=eval_split,
                      max_new_tokens=s.max_new_tokens, progress=False, measure_memory=False,
                      on_start=keep_initial_A, **hp)
    # the LoRA matrices are kept where Figs. 3/4 and Table 7 read them (adapters of Wq, Wv on their task)
    keep = method == "lora" and task == s.subspace_task and tuple(full_hp.get("targets", ())) == ("q", "v")
    arrays = _lora_arrays(result.model, task) if keep else {}
    for path in arrays:
        arrays[path]["A0"] = initial[path]["A"]
    losses = result.history.losses
    return Run(task=task, method=method, hp=full_hp, seed=seed, metric_name=result.metric_name,
               metric=float(result.metric), trainable_params=int(result.trainable_params),
               total_params=int(result.total_params), train_seconds=float(result.train_seconds),
               final_loss=float(np.mean(losses[-10:])) if losses else float("nan"),
               eval_loss=float(result.eval_loss), skipped_train=int(result.skipped_train), lora=arrays,
               n_train=n_train, eval_split=eval_split, text_scores=dict(result.text_scores))


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
