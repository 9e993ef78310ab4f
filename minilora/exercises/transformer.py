"""Exercises of tutorial 03 (the tiny transformer): the loss mask of eq. 2, and the masked loss."""

from __future__ import annotations

import numpy as np

from .. import backend as bk
from .. import functional as F
from ..data import Tokenizer, collate, encode_example, load_task
from ..tensor import Tensor, tensor
from .harness import Wrong, as_array, call, compare, exercise, num, register, rng

__all__ = ["check_loss_mask", "check_masked_loss"]

register(
    "03.1", "the loss mask of eq. 2", "check_loss_mask",
    paper="eq. 2: Σ_t log P(y_t | x, y_<t), the loss on the y tokens only",
    hints=("position t predicts seq[t + 1]. Mark t when the token it predicts is a y token or the final <eos>; "
           "everything before (the prompt) and after (padding) is 0.",
           "mask[t] = 1 for t = n_prompt − 1 … n_tokens − 2, else 0 (a slice mask[n_prompt − 1 : n_tokens − 1])."),
    solution='''
    def solution_mask(n_prompt, n_tokens, width):
        mask = np.zeros(width)
        mask[n_prompt - 1:n_tokens - 1] = 1.0   # positions whose next token is in y (or is the final <eos>)
        return mask
    ''')

register(
    "03.2", "the masked loss of eq. 2", "check_masked_loss",
    paper="eq. 2: the mean negative log-likelihood of the y tokens",
    hints=("take log-probabilities with F.log_softmax, pick each position's target entry with minilora ops (so "
           "backward reaches the logits), keep the masked positions only, and average over those positions.",
           "logp = F.log_softmax(logits, axis=-1); pick logp at the targets (multiply by a one-hot array of the "
           "targets and sum over the last axis), multiply by the mask, sum, and divide by mask.sum() — not by B·T."),
    solution='''
    def solution_loss(logits, targets, mask):
        logp = F.log_softmax(logits, axis=-1)                          # (B, T, V)
        pick = np.eye(logits.shape[-1])[targets] * mask[..., None]     # one-hot of the targets, zeroed off the mask
        return -(logp * ml.tensor(pick, dtype=logits.dtype)).sum() / float(mask.sum())
    ''')


@exercise("03.1")
def check_loss_mask(fn) -> str:
    """fn(n_prompt, n_tokens, width) -> a mask of length ``width`` (1 where the loss counts).

    The sequence [bos] x [sep] y [eos] has n_tokens tokens, the first n_prompt of which are
    [bos] x [sep]. The model reads seq[:-1] and predicts seq[1:], padded to ``width``.
    Compared with ``minilora.data.collate`` on real task examples.
    """
    tokenizer = Tokenizer.default()
    examples = load_task("classify", "test", 3) + load_task("e2e", "test", 3)
    batch = collate(examples, tokenizer)
    width = batch.mask.shape[1]
    for row, example in enumerate(examples):
        ids, n_prompt = encode_example(tokenizer, example)
        got = as_array(call(fn, {"n_prompt": n_prompt, "n_tokens": len(ids), "width": width}), "mask", (width,))
        expected = batch.mask[row].astype(np.float64)
        if not np.array_equal(got, expected):
            first = int(np.argmax(got != expected))
            ones, right = np.flatnonzero(got), np.flatnonzero(expected)
            shift = ""
            if len(ones) == len(right) and len(ones) and np.all(ones - right == ones[0] - right[0]):
                shift = f" Your 1s are the right number but shifted by {int(ones[0] - right[0]):+d} position(s)."
            raise Wrong(
                f"row {row} (n_prompt={n_prompt}, n_tokens={len(ids)}, width={width}): your mask differs from "
                f"collate's first at position {first} (yours {num(got[first])}, collate's {num(expected[first])}).{shift} "
                "Remember: position t predicts seq[t + 1].")
    return "your mask equals collate's on six real examples (prompt, y tokens, padding)"


@exercise("03.2")
def check_masked_loss(fn) -> str:
    """fn(logits, targets, mask) -> a scalar Tensor: mean NLL over the positions where mask == 1.

    logits: a Tensor (B, T, V) that requires grad; targets: int array (B, T); mask: float
    array (B, T). Value and gradient are compared with ``F.cross_entropy(logits, targets, mask=mask)``.
    """
    for seed in range(2):
        r = rng(seed)
        shape, V = (2, 5), 7
        logits_np = r.standard_normal((*shape, V))
        targets = r.integers(0, V, size=shape)
        mask = (r.random(shape) < 0.6).astype(np.float64)
        mask[0, -1] = 1.0
        ref_logits = tensor(logits_np, requires_grad=True, dtype="float64")
        ref = F.cross_entropy(ref_logits, targets, mask=mask)
        ref.backward()
        logits = tensor(logits_np, requires_grad=True, dtype="float64")
        loss = call(fn, {"logits": logits, "targets": targets.copy(), "mask": mask.copy()})
        if not isinstance(loss, Tensor):
            raise Wrong(f"return a minilora Tensor (built from logits with minilora ops), got {type(loss).__name__}")
        if loss.size != 1:
            raise Wrong(f"the loss must be one number (a mean), got shape {tuple(loss.shape)}")
        value = float(as_array(loss, "loss").reshape(()))
        logp = logits_np - logits_np.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]       # (B, T)
        mistakes = {  # what a plausible wrong answer gives -> what it means
            float(nll.mean()): "that is the mean over every position, prompt and padding included: "
                               "only the positions with mask = 1 count",
            float((nll * mask).sum() / mask.size): "you divided by every position (B·T), not by the counted ones "
                                                   "(mask.sum())",
            float((nll * mask).sum()): "that is the sum; the loss is the mean over the counted positions",
            -float(ref.item()): "that has the wrong sign: the loss is the NEGATIVE log-likelihood",
        }
        if not np.isclose(value, float(ref.item()), rtol=1e-6, atol=1e-9):
            meaning = next((m for v, m in mistakes.items() if np.isclose(value, v, rtol=1e-6, atol=1e-9)), None)
            raise Wrong(f"the loss value: yours is {num(value)}, F.cross_entropy gives {num(float(ref.item()))}"
                        + (f"; {meaning}." if meaning else "."))
        if not loss.requires_grad:
            raise Wrong("your loss does not require grad: build it from `logits` with minilora ops "
                        "(not from logits.data or NumPy), so that backward reaches the logits")
        loss.backward()
        if logits.grad is None:
            raise Wrong("after loss.backward() the logits got no gradient")
        compare(bk.to_numpy(logits.grad), bk.to_numpy(ref_logits.grad), "the gradient of the logits")
    return "value and gradient equal F.cross_entropy(logits, targets, mask=mask)"
