"""PreEmbed (prefix-embedding tuning, Li & Liang 2021): trainable input vectors before and after the prompt.

``insert_prompt_vectors`` and ``gather_positions`` are its two ops (each a ``Function`` with its
hand-written backward); ``PromptVectors`` holds the vectors and ``PreEmbedGPT`` runs a GPT's
own layers on the longer input. The l_p + l_i vectors occupy positions of the model's
``block_size``, so a ``PreEmbedGPT``'s ``config.block_size`` is l_p + l_i smaller than the base's.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import backend as bk
from .. import nn
from ..backend import get_array_module
from ..function import Function
from ..models.gpt import GPT
from ..tensor import Tensor

__all__ = ["GatherPositions", "InsertPromptVectors", "PreEmbedGPT", "PromptVectors", "gather_positions",
           "insert_prompt_vectors"]


class InsertPromptVectors(Function):
    """Build the longer input [prefix, x_0..x_s, infix, x_{s+1}..] of every row (s: its separator).

    out[b, token_pos[b, t]] = x[b, t],  out[b, :l_p] = prefix,  out[b, infix_pos[b, j]] = infix[j].
    Backward gathers the same places: dx = g[b, token_pos], dprefix = Σ_b g[b, :l_p],
    dinfix[j] = Σ_b g[b, infix_pos[b, j]].
    """

    def forward(self, x, prefix, infix, token_pos=None, infix_pos=None, length=0):
        xp = get_array_module(x)
        Bsz, _, C = x.shape
        rows = xp.arange(Bsz)[:, None]
        out = xp.empty((Bsz, length, C), dtype=x.dtype)
        out[rows, token_pos] = x
        if prefix is not None:
            out[:, :prefix.shape[0]] = prefix
        if infix is not None:
            out[rows, infix_pos] = infix
        self.rows, self.token_pos, self.infix_pos = rows, token_pos, infix_pos
        self.n_prefix = 0 if prefix is None else prefix.shape[0]
        return out

    def backward(self, grad):
        need_x, need_prefix, need_infix = self.needs_input_grad
        dx = grad[self.rows, self.token_pos] if need_x else None
        dprefix = grad[:, :self.n_prefix].sum(axis=0) if need_prefix else None
        dinfix = grad[self.rows, self.infix_pos].sum(axis=0) if need_infix else None
        return dx, dprefix, dinfix


def insert_prompt_vectors(x, prefix, infix, token_pos, infix_pos, length):
    """x (B, T, C) -> (B, length, C) with the prefix (l_p, C) first and the infix (l_i, C) at ``infix_pos``."""
    return InsertPromptVectors.apply(x, prefix, infix, token_pos=token_pos, infix_pos=infix_pos, length=length)


class GatherPositions(Function):
    """y[b, t] = h[b, pos[b, t]] for positions that are distinct within a row.

    Backward: dh = 0 except dh[b, pos[b, t]] = g[b, t] (distinct positions: no sums needed).
    """

    def forward(self, h, pos=None):
        xp = get_array_module(h)
        self.rows, self.pos, self.in_shape = xp.arange(h.shape[0])[:, None], pos, h.shape
        return h[self.rows, pos]

    def backward(self, grad):
        xp = get_array_module(grad)
        dh = xp.zeros(self.in_shape, dtype=grad.dtype)
        dh[self.rows, self.pos] = grad
        return dh


def gather_positions(h, pos):
    """h (B, T', C), pos (B, T) distinct per row -> (B, T, C)."""
    return GatherPositions.apply(h, pos=pos)


class PromptVectors(nn.Module):
    """The trainable input vectors of PreEmbed: ``prefix`` (l_p, d) and ``infix`` (l_i, d).

    They start as copies of the token embeddings of random vocabulary words (Li & Liang 2021
    found that real-word initialisations train more stably than random vectors).
    """

    def __init__(self, wte: nn.Embedding, l_p: int, l_i: int, sep_id: int, context_size: int):
        super().__init__()
        if l_p < 0 or l_i < 0 or l_p + l_i < 1:
            raise ValueError(f"PreEmbed needs l_p >= 0, l_i >= 0 and l_p + l_i >= 1, got l_p={l_p}, l_i={l_i}")
        if l_p + l_i >= context_size:
            raise ValueError(
                f"PreEmbed: l_p + l_i = {l_p + l_i} vectors would fill the whole context of {context_size} positions"
            )
        self.l_p, self.l_i, self.sep_id, self.context_size = int(l_p), int(l_i), int(sep_id), int(context_size)
        V = wte.weight.shape[0]
        words = (bk.to_numpy(bk.random_uniform((l_p + l_i,), np.float64)) * V).astype(np.int64)
        init = wte.weight.data[bk.asarray(words, backend=wte.weight.backend)].copy()
        self.prefix = nn.Parameter(init[:l_p], backend=wte.weight.backend) if l_p else None  # the model's backend
        self.infix = nn.Parameter(init[l_p:], backend=wte.weight.backend) if l_i else None

    def extra_repr(self) -> str:
        return f"l_p={self.l_p}, l_i={self.l_i}, sep_id={self.sep_id}"


class PreEmbedGPT(nn.Module):
    """A GPT whose input is [prefix] x [sep] [infix] y: PreEmbed (prefix-embedding tuning).

    ``apply_method(model, "preembed")`` returns one. It holds the GPT's own layers (the same
    objects: parameter names stay GPT-2's, ``preembed.prefix`` and ``preembed.infix`` are added)
    and runs them through ``GPT.forward_embeddings``, so the model code is not copied.
    ``model(idx)`` still takes the plain token ids and returns logits (B, T, V) for them, so
    ``loss``, ``generate(model, ...)`` and ``evaluate`` work unchanged: the output for the separator is read
    at the last infix vector, whose next position holds y₁. The vectors occupy l_p + l_i of the
    pre-trained positions, so ``config.block_size`` is the usable length (the base's minus
    l_p + l_i); ``preembed.context_size`` keeps the base's.
    """

    loss = GPT.loss  # the same loss as a GPT: it only calls self(idx)

    def __init__(self, gpt: GPT, vectors: PromptVectors):
        super().__init__()
        for name, child in gpt._modules.items():  # wte, wpe, drop, blocks, ln_f: shared, not copied
            setattr(self, name, child)
        self.preembed = vectors
        object.__setattr__(self, "gpt", gpt)  # not a child: its layers are registered above
        self.config = dataclasses.replace(gpt.config, block_size=gpt.config.block_size - vectors.l_p - vectors.l_i)

    def _positions(self, idx):
        """New places of every token and infix vector, and where each output is read."""
        pe: PromptVectors = self.preembed
        xp = get_array_module(idx)
        is_sep = idx == pe.sep_id
        has_sep = is_sep.any(axis=1)
        if not bool(has_sep.all()):
            rows = [int(i) for i in np.flatnonzero(~bk.to_numpy(has_sep))[:5]]
            raise ValueError(
                f"PreEmbed inserts its {pe.l_i} infix vectors after the separator token (id {pe.sep_id}), but rows {rows} "
                "have none: feed [bos] x [sep] ... sequences (minilora.data.collate / prompt_ids)"
            )
        sep = is_sep.argmax(axis=1)[:, None]  # (B, 1): the first separator of each row
        t = xp.arange(idx.shape[1])[None, :]  # (1, T)
        token_pos = pe.l_p + t + pe.l_i * (t > sep)  # (B, T)
        read_pos = pe.l_p + t + pe.l_i * (t >= sep)  # the separator is read at the last infix vector
        infix_pos = pe.l_p + sep + 1 + xp.arange(pe.l_i)[None, :]  # (B, l_i)
        return token_pos, read_pos, infix_pos

    def forward(self, idx, cache=None) -> Tensor:
        pe: PromptVectors = self.preembed
        idx = bk.asarray(idx.data if isinstance(idx, Tensor) else idx, backend=self.wte.weight.backend)
        if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"PreEmbedGPT expects integer token ids of shape (batch, time), got {idx.dtype} {tuple(idx.shape)}")
        T = idx.shape[1]
        past = cache.length if cache is not None else 0
        inserting = past == 0  # the first call (the whole prompt) gets the vectors; cached steps append tokens
        length = T + (pe.l_p + pe.l_i if inserting else 0)
        if past + length > pe.context_size:
            used = past - pe.l_p - pe.l_i if not inserting else 0
            raise ValueError(
                f"PreEmbed: {used + T} tokens + {pe.l_p} prefix + {pe.l_i} infix vectors = {past + length} positions, "
                f"more than the {pe.context_size} the model has; with PreEmbed at most {self.config.block_size} tokens "
                "fit (model.config.block_size): shorten the sequence or use smaller l_p + l_i"
            )
        x = self.wte(idx)  # (B, T, C)
        if not inserting:
            return self.gpt.forward_embeddings(x, cache)  # (B, T, V)
        token_pos, read_pos, infix_pos = self._positions(idx)
        x = insert_prompt_vectors(x, pe.prefix, pe.infix, token_pos, infix_pos, length)  # (B, T', C)
        logits = self.gpt.forward_embeddings(x, cache)  # (B, T', V)
        return gather_positions(logits, read_pos)  # (B, T, V): one output per input token
