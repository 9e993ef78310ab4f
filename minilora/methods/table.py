"""The hyper-parameter table of the fine-tuning methods: one row per method, and each task's departures.

``HYPERPARAMS[method]`` holds AdamW's settings, the run's length and the method's own settings
(``apply_method``'s defaults); ``hyperparams(method, task)`` applies ``TASK_HYPERPARAMS``. LoRA's
defaults live here alone: ``HYPERPARAMS["lora"]`` (r, targets) and ``lora_alpha(r)`` (alpha = 2r);
``apply_method`` and the command line read them.
"""

from __future__ import annotations

__all__ = ["HYPERPARAMS", "METHODS", "PAPER_NAMES", "TASK_HYPERPARAMS", "TRAINING_KEYS", "hyperparams", "lora_alpha"]

METHODS = ("full", "ft_top2", "bitfit", "adapter_h", "adapter_l", "preembed", "lora")
PAPER_NAMES = {
    "full": "FT", "ft_top2": "FT^Top2", "bitfit": "BitFit", "adapter_h": "Adapter^H",
    "adapter_l": "Adapter^L", "preembed": "PreEmbed", "lora": "LoRA",
}

# THE hyper-parameter table, for the shipped 4-layer, d = 128 model: ``lr`` and ``weight_decay``
# go to AdamW, ``steps`` is the run's length (batch 16, linear warm-up over the first 10 %),
# ``length_group`` > 1 batches examples of similar length together (data.samplers.length_grouped_batches),
# the rest goes to ``apply_method``. LoRA's alpha defaults to 2r (``lora_alpha``). FT's and LoRA's learning rates
# are chosen on the val split (docs/results.md, "Choosing the learning rates"); the other methods'
# rows are fixed settings that the experiments do not tune. Budgets are close to LoRA's r = 4 on Wq, Wv.
HYPERPARAMS = {
    "full": {"lr": 1e-3, "weight_decay": 0.01, "steps": 150, "length_group": 16},
    "ft_top2": {"lr": 3e-3, "weight_decay": 0.01, "steps": 300, "n_top": 2},
    "bitfit": {"lr": 3e-2, "weight_decay": 0.0, "steps": 300},
    "adapter_h": {"lr": 1e-2, "weight_decay": 0.0, "steps": 300, "r": 4},
    "adapter_l": {"lr": 1e-2, "weight_decay": 0.0, "steps": 300, "r": 8},
    "preembed": {"lr": 3e-2, "weight_decay": 0.0, "steps": 300, "l_p": 4, "l_i": 2},
    "lora": {"lr": 1e-2, "weight_decay": 0.0, "steps": 200, "r": 4, "targets": ("q", "v"), "length_group": 16},
}
TRAINING_KEYS = ("lr", "weight_decay", "steps", "length_group")  # the keys of HYPERPARAMS that are not apply_method's

# Where one task departs from its method's row of HYPERPARAMS: the learning rates chosen on val
# (docs/results.md), and the steps. classify decides everything at the one "=>" position, so a
# run sees ~16x less signal per step than on e2e or parse and needs more steps; sql writes a query
# language the base has never produced, so both methods need more steps to learn it.
TASK_HYPERPARAMS = {("lora", "parse"): {"lr": 2e-2},
                    ("full", "classify"): {"lr": 3e-4, "steps": 750},
                    ("lora", "classify"): {"lr": 5e-3, "steps": 500},
                    ("full", "sql"): {"lr": 3e-3, "steps": 250},
                    ("lora", "sql"): {"lr": 2e-2, "steps": 600}}


def hyperparams(method: str, task: str | None = None) -> dict:
    """``HYPERPARAMS[method]`` with ``task``'s departures (``TASK_HYPERPARAMS``) applied: the
    settings ``recipes.finetune(task, method)`` trains with when nothing overrides them."""
    if method not in HYPERPARAMS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    return {**HYPERPARAMS[method], **TASK_HYPERPARAMS.get((method, task), {})}


def lora_alpha(r: int, alpha: float | None = None) -> float:
    """LoRA's alpha: ``alpha`` when given, else 2r (the rule of ``HYPERPARAMS["lora"]``, so alpha / r = 2)."""
    return float(alpha if alpha is not None else 2 * r)
