"""Turning examples into the arrays a language model trains on.

A task example becomes one token sequence

    seq = [bos] x [sep] y [eos]          (x = prompt, y = target, sep = "=>")

and the model is trained to predict seq[1:] from seq[:-1]. Following the paper's eq. (2), the loss
counts only the y tokens: `mask` is 1.0 exactly where the predicted token belongs to y (the target
tokens and the final <eos>), and 0.0 on the prompt, the separator and the padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .tasks import Example
from .tokenizer import Tokenizer
from .world import MAX_SEQUENCE_TOKENS

@dataclass(frozen=True)
class Batch:
    """A right-padded batch of B sequences of (up to) T + 1 tokens."""

    idx: np.ndarray      # (B, T) int64, model input = seq[:-1]
    targets: np.ndarray  # (B, T) int64, next token = seq[1:] (pad_id where padded)
    mask: np.ndarray     # (B, T) float32, 1.0 where targets[b, t] counts in the loss

    @property
    def n_tokens(self) -> int:
        """How many target tokens the loss averages over."""
        return int(self.mask.sum())


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """[bos] x [sep]: what generation starts from (the model then writes y and <eos>)."""
    return [tokenizer.bos_id] + tokenizer.encode(prompt) + [tokenizer.sep_id]


def encode_example(tokenizer: Tokenizer, example: Example) -> tuple[list[int], int]:
    """(ids, n_prompt): ids = [bos] x [sep] y [eos]; the first n_prompt ids are [bos] x [sep]."""
    ids = prompt_ids(tokenizer, example.prompt)
    n_prompt = len(ids)
    ids += tokenizer.encode(example.target) + [tokenizer.eos_id]
    return ids, n_prompt


def _pad(sequences: list[list[int]], loss_starts: list[int], pad_id: int, block_size: int,
         pad_to_block: bool, what: str) -> Batch:
    """Right-pad, shift by one and build the mask; `loss_starts[b]` is the first seq index of row b
    whose prediction is counted."""
    if not sequences:
        raise ValueError(f"cannot collate an empty list of {what}")
    lengths = [len(s) for s in sequences]
    for b, length in enumerate(lengths):
        if length > block_size:
            raise ValueError(f"{what} {b} is {length} tokens long, more than block_size={block_size}")
        if length < 2:
            raise ValueError(f"{what} {b} has {length} token(s); a sequence needs at least 2")
    width = block_size if pad_to_block else max(lengths)           # tokens per padded sequence
    seq = np.full((len(sequences), width), pad_id, dtype=np.int64)  # (B, T+1)
    mask = np.zeros((len(sequences), width - 1), dtype=np.float32)  # (B, T)
    for b, (ids, start) in enumerate(zip(sequences, loss_starts)):
        seq[b, :len(ids)] = ids
        # targets[b, t] = seq[b, t + 1]: counted for start <= t + 1 <= len(ids) - 1
        mask[b, start - 1:len(ids) - 1] = 1.0
    return Batch(idx=seq[:, :-1].copy(), targets=seq[:, 1:].copy(), mask=mask)


def collate(examples: Sequence[Example], tokenizer: Tokenizer, block_size: int = MAX_SEQUENCE_TOKENS,
            pad_to_block: bool = False) -> Batch:
    """A task batch whose mask covers only the y tokens (eq. 2).

    T is the longest sequence minus one, or block_size - 1 with `pad_to_block=True` (fixed shapes).
    """
    sequences, starts = [], []
    for example in examples:
        ids, n_prompt = encode_example(tokenizer, example)
        sequences.append(ids)
        starts.append(n_prompt)
    return _pad(sequences, starts, tokenizer.pad_id, block_size, pad_to_block, "example")


def lm_collate(texts: Sequence[str], tokenizer: Tokenizer, block_size: int = MAX_SEQUENCE_TOKENS,
               pad_to_block: bool = False) -> Batch:
    """A language-modelling batch of [bos] text [eos] sequences; every real token counts (eq. 1)."""
    sequences = [[tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id] for text in texts]
    return _pad(sequences, [1] * len(sequences), tokenizer.pad_id, block_size, pad_to_block, "text")
