"""Metrics for the restaurant-world tasks; `task_metric` gives one higher-is-better number in [0, 1].

    task       metric          analogue in the paper
    e2e        slot_accuracy   1 - slot error rate, the E2E NLG content measure (Dušek et al. 2020)
    parse      exact_match     WikiSQL logical-form accuracy (Table 2/4)
    classify   accuracy        MNLI matched accuracy (Table 2/3)
    sql        exact_match     WikiSQL logical-form accuracy (Table 2/4)

Data-to-text also gets the paper's text metrics (Table 3), from the established implementations:
``bleu`` (sacrebleu's corpus BLEU) and ``rouge_l`` (rouge-score's ROUGE-L F-measure, best over the
references), both against every reference of an example (``Example.all_references``).
``text_metrics`` gives both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .tasks import TASKS, Example
from .text import split_words
from .world import OPTIONAL_SLOTS, find_slot_values, parse_mr

__all__ = [
    "TASK_METRICS",
    "accuracy",
    "bleu",
    "exact_match",
    "parse_mr",
    "slot_error_rate",
    "slot_errors",
    "task_metric",
    "text_metrics",
    "rouge_l",
]

TASK_METRICS = {"e2e": "slot_accuracy", "parse": "exact_match", "classify": "accuracy", "sql": "exact_match"}

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
    if TASK_METRICS[task] == "exact_match":
        return TASK_METRICS[task], exact_match(preds, refs)
    return TASK_METRICS[task], accuracy(preds, refs)


def _reference_lists(preds: Sequence[str], examples: Sequence[Example], what: str) -> list[tuple[str, ...]]:
    _check_lengths(preds, examples, what)
    return [tuple(_canonical(r) for r in example.all_references) for example in examples]


def bleu(preds: Sequence[str], examples: Sequence[Example]) -> float:
    """Corpus BLEU (sacrebleu, its default 13a tokenisation) against all references, in [0, 1].

    sacrebleu takes the references as streams: stream j holds the j-th reference of every
    example. An example with fewer references repeats its last one (BLEU's clipped counts take the
    maximum over references, so a repeat adds nothing).
    """
    import sacrebleu

    references = _reference_lists(preds, examples, "bleu")
    width = max(len(r) for r in references)
    streams = [[r[min(j, len(r) - 1)] for r in references] for j in range(width)]
    return float(sacrebleu.corpus_bleu([_canonical(p) for p in preds], streams).score) / 100.0


def rouge_l(preds: Sequence[str], examples: Sequence[Example]) -> float:
    """Mean over examples of ROUGE-L F1 (rouge-score), each the best over the example's references."""
    from rouge_score import rouge_scorer

    references = _reference_lists(preds, examples, "rouge_l")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return sum(scorer.score_multi(list(refs), _canonical(p))["rougeL"].fmeasure
               for p, refs in zip(preds, references)) / len(preds)


def text_metrics(preds: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    """{"bleu": ..., "rouge_l": ...} of generated texts against every reference of each example."""
    return {"bleu": bleu(preds, examples), "rouge_l": rouge_l(preds, examples)}
