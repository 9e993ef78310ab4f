"""How big the experiments are: the full settings (the tables of docs/results.md) and the fast ones (tests).

Training settings of every method (learning rate, weight decay, steps) come from the one table,
``minilora.methods.HYPERPARAMS``, as for the demo; these settings add what only the experiments
choose: the seeds, how many examples, which tasks the analyses look at, the low-data grid, the
latency grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["FAST_SETTINGS", "FULL_SETTINGS", "LORA_ALPHA", "Settings", "plain"]

LORA_ALPHA = 8.0  # α is fixed while r varies, as in the paper ("we simply set α to the first r we try")


def plain(settings: dict) -> dict:
    """``settings`` as results.json holds it: tuples become lists (what a JSON reader gets back)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}


@dataclass(frozen=True)
class Settings:
    steps: int | None  # optimizer steps per fine-tuning run (None: each method's HYPERPARAMS steps)
    batch_size: int
    n_train: int | None  # training examples (None: the whole split)
    n_eval: int | None  # test examples scored (None: the whole split)
    max_new_tokens: int | None  # decoding cap at evaluation (None: up to the context, as everywhere else)
    seeds: tuple  # every comparison is repeated over these seeds (mean ± std)
    tasks: tuple  # the tasks of Tables 2-4
    analysis_tasks: tuple  # tasks of Tables 5 and 6 (the paper: WikiSQL and MultiNLI)
    subspace_task: str  # the task whose adapters Figs. 3/4 and Table 7 look at
    low_data_tasks: tuple  # the low-data study (the paper's Table 16, MNLI-n)
    low_data_sizes: tuple  # n training examples, each seed drawing its own subset
    low_data_methods: tuple
    tuning_tasks: tuple  # tasks whose FT and LoRA learning rates are chosen on the val split
    latency_batches: tuple
    latency_lengths: tuple
    latency_repeats: int
    latency_rounds: int  # the latency grid is timed this many times; the spread over rounds is reported

    def describe(self) -> str:
        steps = ("each method's steps of minilora.methods.HYPERPARAMS" if self.steps is None
                 else f"{self.steps} AdamW steps")
        return (f"{steps}, batch {self.batch_size}, "
                f"{'all' if self.n_train is None else self.n_train} training examples, "
                f"{'all 200' if self.n_eval is None else self.n_eval} test examples per run, greedy decoding"
                + ("" if self.max_new_tokens is None else f" of at most {self.max_new_tokens} tokens")
                + f", seeds {', '.join(str(s) for s in self.seeds)}")

    def to_json(self) -> dict:
        return plain(asdict(self))


FULL_SETTINGS = Settings(steps=None, batch_size=16, n_train=None, n_eval=None, max_new_tokens=None,
                         seeds=(0, 1, 2), tasks=("e2e", "parse", "classify", "sql"),
                         analysis_tasks=("sql",), subspace_task="sql",
                         low_data_tasks=("classify", "sql"), low_data_sizes=(16, 64, 256, 2000),
                         low_data_methods=("full", "lora", "adapter_h", "preembed"),
                         tuning_tasks=("e2e", "parse", "classify", "sql"),
                         latency_batches=(1, 2, 4, 8, 16), latency_lengths=(16, 32, 64), latency_repeats=25,
                         latency_rounds=5)
FAST_SETTINGS = Settings(steps=2, batch_size=4, n_train=32, n_eval=3, max_new_tokens=3,
                         seeds=(0, 1), tasks=("e2e", "parse", "classify", "sql"),
                         analysis_tasks=("classify",), subspace_task="classify",
                         low_data_tasks=("classify",), low_data_sizes=(4, 16), low_data_methods=("full", "lora"),
                         tuning_tasks=("classify",),
                         latency_batches=(1, 4), latency_lengths=(8,), latency_repeats=2, latency_rounds=2)
