"""Which examples a training step sees: ``rows(step)``, a pure function of the step number.

    rows = epoch_batches(len(train), batch_size=16, seed=0)
    batch = collate([train[i] for i in rows(step)], tokenizer)

No iterator state: a run resumed at step s sees exactly the rows the uninterrupted run saw.
"""

from __future__ import annotations

import numpy as np

__all__ = ["epoch_batches", "length_grouped_batches"]


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
