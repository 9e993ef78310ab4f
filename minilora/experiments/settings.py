"""How big the experiments are: the full settings (the tables of docs/results.md) and the fast ones (tests).

Training settings of every method (learning rate, weight decay, steps) come from the one table,
``minilora.methods.HYPERPARAMS``, as for the demo; these settings add what only the experiments
choose: how many examples, which tasks the analyses look at, the latency grid.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FAST_SETTINGS", "FULL_SETTINGS", "LORA_ALPHA", "Settings"]

LORA_ALPHA = 8.0  # α is fixed while r varies, as in the paper ("we simply set α to the first r we try")


@dataclass(frozen=True)
class Settings:
    steps: int | None  # optimizer steps per fine-tuning run (None: each method's HYPERPARAMS steps)
    batch_size: int
    n_train: int | None  # training examples (None: the whole split)
    n_eval: int | None  # test examples scored (None: the whole split)
    max_new_tokens: int | None  # decoding cap at evaluation (None: up to the context, as everywhere else)
    analysis_tasks: tuple  # tasks of Tables 5 and 6 (the paper: WikiSQL and MultiNLI)
    subspace_task: str  # the task whose adapters Figs. 3/4 and Table 7 look at
    latency_batches: tuple
    latency_lengths: tuple
    latency_repeats: int

    def describe(self) -> str:
        steps = ("each method's steps of minilora.methods.HYPERPARAMS" if self.steps is None
                 else f"{self.steps} AdamW steps")
        return (f"{steps}, batch {self.batch_size}, "
                f"{'all' if self.n_train is None else self.n_train} training examples, "
                f"{'all 200' if self.n_eval is None else self.n_eval} test examples per run, greedy decoding"
                + ("" if self.max_new_tokens is None else f" of at most {self.max_new_tokens} tokens"))


FULL_SETTINGS = Settings(steps=None, batch_size=16, n_train=None, n_eval=None, max_new_tokens=None,
                         analysis_tasks=("parse",), subspace_task="parse",
                         latency_batches=(1, 2, 4, 8, 16), latency_lengths=(16, 32, 64), latency_repeats=25)
FAST_SETTINGS = Settings(steps=2, batch_size=4, n_train=32, n_eval=3, max_new_tokens=3,
                         analysis_tasks=("classify",), subspace_task="classify",
                         latency_batches=(1, 4), latency_lengths=(8,), latency_repeats=2)
