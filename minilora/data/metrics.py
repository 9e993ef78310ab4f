"""Metrics for the restaurant-world tasks; `task_metric` gives one higher-is-better number in [0, 1].

    task       metric          analogue in the paper
    e2e        slot_accuracy   1 - slot error rate, the E2E NLG content measure (Dušek et al. 2020)
    parse      exact_match     WikiSQL logical-form accuracy (Table 2/4)
    classify   accuracy        MNLI matched accuracy (Table 2/3)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .tasks import TASKS, Example
from .text import split_words
from .world import OPTIONAL_SLOTS, find_slot_values, parse_mr

__all__ = [
    "TASK_METRICS",
    "accuracy",
    "exact_match",
    "parse_mr",
    "slot_error_rate",
    "slot_errors",
    "task_metric",
]

TASK_METRICS = {"e2e": "slot_accuracy", "parse": "exact_match", "classify": "accuracy"}

MRLike = Mapping[str, str] | Sequence[tuple[str, str]]


def _check_lengths(preds: Sequence, refs: Sequence, what: str) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{what}: {len(preds)} predictions but {len(refs)} references")
    if len(preds) == 0:
        raise ValueError(f"{what}: no predictions to score")


def _canonical(text: str) -> str:
    """Lowercase and re-space, so "Yes " and "yes" or "pub ." and "pub." compare equal."""
    return " ".join(split_words(text))


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference (after lowercasing and re-spacing)."""
    _check_lengths(preds, refs, "exact_match")
    return sum(_canonical(p) == _canonical(r) for p, r in zip(preds, refs)) / len(preds)


def accuracy(preds: Sequence, refs: Sequence) -> float:
    """Fraction of correct labels; strings are compared like `exact_match`."""
    _check_lengths(preds, refs, "accuracy")
    same = [(_canonical(p) == _canonical(r)) if isinstance(p, str) and isinstance(r, str) else p == r
            for p, r in zip(preds, refs)]
    return sum(same) / len(same)


def slot_errors(text: str, mr: MRLike) -> tuple[int, int]:
    """(missing, hallucinated) for one text.

    missing: slots of the MR whose value the text does not state (a wrong value counts here once);
    hallucinated: slots NOT in the MR that the text gives a value for.
    """
    mr = dict(mr)
    found = find_slot_values(text)
    missing = sum(1 for slot, value in mr.items() if value not in found.get(slot, ()))
    hallucinated = sum(1 for slot in OPTIONAL_SLOTS if slot not in mr and slot in found)
    return missing, hallucinated


def slot_error_rate(texts: Sequence[str], mrs: Sequence[MRLike]) -> float:
    """E2E-style slot error rate over a corpus: (missing + hallucinated) / number of MR slots.

    0 is perfect; it can exceed 1 when a model hallucinates many slots.
    """
    _check_lengths(texts, mrs, "slot_error_rate")
    errors = total = 0
    for text, mr in zip(texts, mrs):
        missing, hallucinated = slot_errors(text, mr)
        errors += missing + hallucinated
        total += len(dict(mr))
    return errors / total


def task_metric(task: str, preds: Sequence[str], examples: Sequence[Example]) -> tuple[str, float]:
    """(metric_name, value) for generated targets `preds`; higher is better, value in [0, 1]."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; the tasks are {list(TASKS)}")
    if task == "e2e":
        ser = slot_error_rate(preds, [example.mr for example in examples])
        return TASK_METRICS[task], min(1.0, max(0.0, 1.0 - ser))
    refs = [example.target for example in examples]
    if task == "parse":
        return TASK_METRICS[task], exact_match(preds, refs)
    return TASK_METRICS[task], accuracy(preds, refs)
