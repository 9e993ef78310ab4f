"""The restaurant world: offline, seeded data for the paper's experiments in miniature.

    from minilora.data import Tokenizer, load_task, collate, task_metric
    tok = Tokenizer.default()                     # closed word vocabulary, <= VOCAB_SIZE = 96
    train = load_task("e2e", "train")             # list[Example(prompt, target, mr)]
    batch = collate(train[:16], tok)              # Batch(idx, targets, mask), mask on y only (eq. 2)
    task_metric("e2e", generated_texts, test)     # ("slot_accuracy", 0.93)

Pure Python + NumPy; nothing here depends on the autograd engine.
"""

from .batching import Batch, collate, encode_example, lm_collate, prompt_ids
from .metrics import (
    TASK_METRICS,
    accuracy,
    bleu,
    exact_match,
    rouge_l,
    slot_error_rate,
    slot_errors,
    task_metric,
    text_metrics,
)
from .samplers import epoch_batches, length_grouped_batches
from .tasks import DEMO_TASKS, LABELS, N_REFERENCES, SPLIT_SIZES, SPLITS, TASKS, Example, load_task, pretrain_corpus
from .tokenizer import SPECIAL_TOKENS, VOCAB_SIZE, Tokenizer
from .world import (
    MAX_SEQUENCE_TOKENS,
    SLOTS,
    VALUES,
    Rng,
    describe,
    find_slot_values,
    linearise,
    parse_mr,
    query,
    random_mr,
    split_of,
)

__all__ = [
    "DEMO_TASKS",
    "LABELS",
    "N_REFERENCES",
    "MAX_SEQUENCE_TOKENS",
    "SLOTS",
    "SPECIAL_TOKENS",
    "SPLITS",
    "SPLIT_SIZES",
    "TASKS",
    "TASK_METRICS",
    "VALUES",
    "VOCAB_SIZE",
    "Batch",
    "Example",
    "Rng",
    "Tokenizer",
    "accuracy",
    "bleu",
    "collate",
    "describe",
    "epoch_batches",
    "encode_example",
    "exact_match",
    "find_slot_values",
    "length_grouped_batches",
    "linearise",
    "lm_collate",
    "load_task",
    "parse_mr",
    "pretrain_corpus",
    "query",
    "prompt_ids",
    "random_mr",
    "rouge_l",
    "slot_error_rate",
    "slot_errors",
    "split_of",
    "task_metric",
    "text_metrics",
]
