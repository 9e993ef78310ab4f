"""What every experiment shares: the settings (full or fast), a cache of fine-tuning runs, tables, figures.

A ``Context`` is made once per ``run_experiment`` call. ``ctx.run(task, method, seed, **hp)``
fine-tunes a copy of the base model and remembers the result, so ``all`` trains each
configuration once even when several experiments read it (the LoRA baseline is also the
``q+v, r = 4`` cell of Tables 5 and 6, and the rank runs feed Figs. 3/4 and Table 7).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from .. import backend as bk
from ..baselines import DEFAULT_HP, finetune_method

__all__ = [
    "FAST",
    "FULL",
    "LORA_ALPHA",
    "Context",
    "Run",
    "Settings",
    "markdown_table",
    "new_figure",
    "nll",
    "save_figure",
]

LORA_ALPHA = 8.0  # α is fixed while r varies, as in the paper ("we simply set α to the first r we try")


@dataclass(frozen=True)
class Settings:
    steps: int  # optimizer steps per fine-tuning run
    batch_size: int
    n_train: int | None  # training examples (None: the whole split)
    n_eval: int | None  # test examples scored (None: the whole split)
    max_new_tokens: object  # decoding cap at evaluation: None (up to the context), an int, or {task: int}
    analysis_tasks: tuple  # tasks of Tables 5 and 6 (the paper: WikiSQL and MultiNLI)
    subspace_task: str  # the task whose adapters Figs. 3/4 and Table 7 look at
    latency_batches: tuple
    latency_lengths: tuple
    latency_repeats: int

    def describe(self) -> str:
        return (f"{self.steps} AdamW steps of batch {self.batch_size}, "
                f"{'all' if self.n_train is None else self.n_train} training examples, "
                f"{'all 200' if self.n_eval is None else self.n_eval} test examples per run, greedy decoding")


FULL = Settings(steps=300, batch_size=16, n_train=None, n_eval=100, max_new_tokens={"classify": 4},
                analysis_tasks=("parse",), subspace_task="parse",
                latency_batches=(1, 2, 4, 8, 16), latency_lengths=(16, 32, 64), latency_repeats=25)
FAST = Settings(steps=2, batch_size=4, n_train=32, n_eval=3, max_new_tokens=3,
                analysis_tasks=("classify",), subspace_task="classify",
                latency_batches=(1, 4), latency_lengths=(8,), latency_repeats=2)


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
    def __init__(self, out_dir, fast: bool = False, progress: bool = True, base=None, workers: int | None = None):
        self.out_dir = os.fspath(out_dir)
        if workers is None:
            workers = int(os.environ.get("MINILORA_WORKERS", "0")) or (1 if fast else min(2, os.cpu_count() or 1))
        self.workers = max(1, int(workers))
        os.makedirs(self.out_dir, exist_ok=True)
        self.fast, self.progress = fast, progress
        self.settings = FAST if fast else FULL
        self.base, self.base_note = (base, "the model passed in") if base is not None else _load_base(fast)
        self._runs: dict = {}
        self.started = time.perf_counter()

    # ------------------------------------------------------------------ paths and bars
    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True, disable=not self.progress)

    # ------------------------------------------------------------------ runs
    def key(self, task, method, seed, hp) -> tuple:
        settings = {**DEFAULT_HP[method], **hp}
        return (task, method, int(seed), tuple(sorted((k, _freeze(v)) for k, v in settings.items())))

    def has_run(self, task, method, seed=0, **hp) -> bool:
        return self.key(task, method, seed, hp) in self._runs

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
        self._train(todo, desc)

    def _train(self, todo, desc) -> None:
        with self.bar(len(todo), desc) as bar:
            if self.workers <= 1 or len(todo) == 1:
                for key, (task, method, seed, hp, full_hp) in todo:
                    bar.set_postfix_str(f"{task}/{method}")
                    self._runs[key] = train_run(self.base, self.settings, task, method, seed, hp, full_hp)
                    bar.update(1)
                return
            import concurrent.futures as cf
            import multiprocessing

            saved = {k: os.environ.get(k) for k in _THREAD_VARS}
            os.environ.update({k: "1" for k in _THREAD_VARS})  # read by the workers' BLAS when they start
            try:
                with cf.ProcessPoolExecutor(max_workers=min(self.workers, len(todo)),
                                            mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker, initargs=(self.base, self.settings)) as pool:
                    futures = {pool.submit(_worker_run, *args): key for key, args in todo}
                    for future in cf.as_completed(futures):
                        run = future.result()
                        self._runs[futures[future]] = run
                        bar.set_postfix_str(f"{run.task}/{run.method}")
                        bar.update(1)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_WORKER: dict = {}


def _init_worker(base, settings) -> None:
    import warnings as _warnings

    _warnings.simplefilter("ignore")
    _WORKER["base"], _WORKER["settings"] = base, settings


def _worker_run(task, method, seed, hp, full_hp) -> Run:
    return train_run(_WORKER["base"], _WORKER["settings"], task, method, seed, hp, full_hp)


def train_run(base, s: Settings, task: str, method: str, seed: int, hp: dict, full_hp: dict) -> Run:
    """One fine-tuning run of ``method`` on ``task`` from ``base``; the LoRA matrices are kept."""
    initial_A = {}

    def keep_initial_A(model):
        if method == "lora":
            from .. import lora

            for path, layer in lora.lora_layers(model):
                initial_A[path] = bk.to_numpy(layer.lora_A[task].data).astype(np.float64)

    max_new = s.max_new_tokens.get(task) if isinstance(s.max_new_tokens, dict) else s.max_new_tokens
    result = finetune_method(task, method, base=base, steps=s.steps, batch_size=s.batch_size, seed=seed,
                             n_train=s.n_train, n_eval=s.n_eval, max_new_tokens=max_new,
                             progress=False, on_start=keep_initial_A, **hp)
    lora_arrays = {}
    if method == "lora":
        from .. import lora

        for path, layer in lora.lora_layers(result.model):
            lora_arrays[path] = {
                "A": bk.to_numpy(layer.lora_A[task].data).astype(np.float64),
                "A0": initial_A[path],
                "B": bk.to_numpy(layer.lora_B[task].data).astype(np.float64),
                "scaling": layer.scaling(task),
                "delta": bk.to_numpy(layer.delta_weight(task)),
            }
    losses = result.history.losses
    return Run(task=task, method=method, hp=full_hp, seed=seed, metric_name=result.metric_name,
               metric=float(result.metric), trainable_params=int(result.trainable_params),
               total_params=int(result.total_params), train_seconds=float(result.train_seconds),
               final_loss=float(np.mean(losses[-10:])) if losses else float("nan"),
               eval_loss=float(result.config.get("eval_loss", float("nan"))),
               skipped_train=int(result.config.get("skipped_train", 0)), lora=lora_arrays)


def _load_base(fast: bool):
    """The shipped base model; in fast mode a freshly initialised GPT stands in when it is missing."""
    from ..models import GPT, GPTConfig, load_base

    try:
        return load_base(), "the shipped base model (minilora/assets/base.safetensors)"
    except FileNotFoundError:
        if not fast:
            raise
        warnings.warn("the shipped base model is missing: --fast runs on a randomly initialised GPT", stacklevel=3)
        bk.manual_seed(0)
        return GPT(GPTConfig()), "a randomly initialised GPT (the shipped base model is missing)"


# ----------------------------------------------------------------------------- tables
def _cell(value) -> str:
    if isinstance(value, float):
        if not np.isfinite(value):
            return "–"
        return f"{value:.3g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


def nll(value: float) -> str:
    """NLL values differ in the 3rd-4th digit between methods: print 4 decimals."""
    return f"{value:.4f}" if np.isfinite(value) else "–"


def markdown_table(header, rows, align=None) -> str:
    """A GitHub Markdown table; floats are printed with 3 decimals (or 3 significant digits)."""
    align = align or ["l"] + ["r"] * (len(header) - 1)
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(ctx: Context, name: str, title: str, body: str, figures=()) -> str:
    """Write ``<name>.md`` (title, how it was made, the body, the figures) and return its text."""
    s = ctx.settings
    lines = [f"## {title}", "", body.strip(), ""]
    for fig in figures:
        lines += [f"![{fig}]({fig})", ""]
    lines += [f"_Settings: {'--fast, ' if ctx.fast else ''}{s.describe()}; base: {ctx.base_note}._", ""]
    text = "\n".join(lines)
    with open(ctx.path(f"{name}.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text


# ----------------------------------------------------------------------------- figures
def new_figure(width=6.4, height=4.0, **kwargs):
    """A matplotlib Figure without pyplot (no global state, no GUI backend: it renders with Agg)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), **kwargs)


def save_figure(fig, ctx: Context, name: str) -> str:
    fig.tight_layout()
    fig.savefig(ctx.path(name), dpi=110)
    return name
