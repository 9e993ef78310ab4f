"""Continue token-id prompts with a GPT: greedy, temperature/top-k sampling, beam search.

    new_tokens = generate(model, [[3, 14, 15], [9, 2]], max_new_tokens=20, method="beam", eos_id=1)

How a few hundred prompts are decoded quickly:

- **Buckets.** Prompts are grouped by length; each group is ONE batch, so no padding and
  no attention mask are needed (every row of a bucket sits at the same position).
- **KV cache.** The prompt is read once; afterwards each step feeds only the newest token
  per row and attends to the cached keys/values (``models.gpt.KVCache``), so a step costs
  O(T) instead of O(T²). ``use_cache=False`` recomputes the whole prefix every step: slower,
  the same tokens, and the reference the tests compare the cache with.
- **Finished rows leave the batch.** When a row emits ``eos_id`` (or a beam-search prompt is
  decided) its rows are dropped with ``KVCache.reorder``; ``adapter_ids`` (one adapter name per
  prompt, for a batch that mixes tasks) are reordered with them, so every row keeps its adapter:
  each forward runs inside ``lora.mixed_batch(model, adapter_ids of the current rows)``.

Conventions (decided here, relied on by the tests):

- The result is the NEW tokens of each prompt, in the order of ``prompts``. ``eos_id`` ends a
  continuation and is NOT included in it.
- The context is ``model.config.block_size``: prompt + new tokens never exceed it, so
  generation stops early (without error) when the sequence fills the context; a prompt
  longer than block_size is an error.
- Beam search scores a hypothesis y (new tokens, the eos included when it ended on one) by
  simple length normalisation: score(y) = Σ_t log P(y_t | x, y_<t) / |y| ** length_penalty
  (length_penalty = 0: the plain sum of log-probabilities, which favours short outputs;
  1: the mean log-probability per token). Not GNMT's ((5 + |y|) / 6) ** α.
"""

from __future__ import annotations

import contextlib

import numpy as np

from . import backend as bk
from .functional import log_softmax_array  # on the host's float64 next-token logits (rows, V)
from .lora import mixed_batch
from .models.gpt import KVCache
from .tensor import Tensor, no_grad

__all__ = ["DECODING_METHODS", "generate"]

DECODING_METHODS = ("greedy", "sample", "beam")


# ----------------------------------------------------------------------------- helpers
def _as_prompt_list(prompts) -> list[np.ndarray]:
    """A list of 1-D int64 arrays from a list of token-id lists or a 2-D int array/Tensor."""
    if isinstance(prompts, Tensor):
        prompts = prompts.data
    if hasattr(prompts, "ndim"):  # NumPy / CuPy array
        array = bk.to_numpy(prompts)
        if array.ndim != 2:
            raise ValueError(f"generate: an array of prompts must be 2-D (n_prompts, length), got shape {array.shape}")
        prompts = list(array)
    prompts = list(prompts)
    out = []
    for i, p in enumerate(prompts):
        if np.isscalar(p) or (hasattr(p, "ndim") and p.ndim == 0):
            raise TypeError(
                "generate: prompts must be a list of token-id lists (one per prompt), got a flat list of ids; "
                "wrap a single prompt as [prompt]"
            )
        a = np.asarray(bk.to_numpy(p) if hasattr(p, "shape") else p)
        if a.ndim != 1:
            raise ValueError(f"generate: prompt {i} must be a 1-D sequence of token ids, got shape {a.shape}")
        if a.size == 0:
            raise ValueError(f"generate: prompt {i} is empty; a prompt needs at least one token (e.g. a BOS token)")
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"generate: prompt {i} holds {a.dtype} values; token ids must be integers")
        out.append(a.astype(np.int64))
    return out


class _Step:
    """The model seen as 'next-token logits of every row', with or without a KV cache.

    Rows are the current batch; ``keep(rows)`` selects/duplicates rows (dropping finished
    ones, or following beams), ``advance(tokens)`` appends one token per row and returns
    the next-token logits (rows, V) as a float64 host array.
    """

    def __init__(self, model, prompt_batch: np.ndarray, adapter_ids, use_cache: bool):
        self.model, self.use_cache = model, use_cache
        self.tokens = prompt_batch  # (rows, t): everything seen so far, on the host
        self.adapter_ids = adapter_ids  # object array (rows,) or None
        self.cache = KVCache(model.config.n_layer) if use_cache else None

    def _logits(self, idx: np.ndarray) -> np.ndarray:
        routing = contextlib.nullcontext() if self.adapter_ids is None else mixed_batch(self.model, list(self.adapter_ids))
        with routing:  # row i through adapter adapter_ids[i]
            logits = self.model(idx, cache=self.cache)  # (rows, t, V)
        return bk.to_numpy(logits.data[:, -1]).astype(np.float64)  # (rows, V)

    def start(self) -> np.ndarray:
        return self._logits(self.tokens)

    def keep(self, rows: np.ndarray) -> None:
        if len(rows) == len(self.tokens) and np.array_equal(rows, np.arange(len(rows))):
            return  # nothing to move
        self.tokens = self.tokens[rows]
        if self.adapter_ids is not None:
            self.adapter_ids = self.adapter_ids[rows]
        if self.cache is not None:
            reference = next((k for k in self.cache.keys if k is not None), None)
            self.cache.reorder(bk.asarray(rows, backend=bk.backend_of(reference)) if reference is not None else rows)

    def advance(self, new_tokens: np.ndarray) -> np.ndarray:
        new_tokens = np.asarray(new_tokens, dtype=np.int64)[:, None]  # (rows, 1)
        self.tokens = np.concatenate([self.tokens, new_tokens], axis=1)
        return self._logits(new_tokens if self.use_cache else self.tokens)


# ----------------------------------------------------------------------------- greedy / sampling
def _choose_tokens(logits: np.ndarray, method: str, temperature: float, top_k, generator) -> np.ndarray:
    """One token per row from next-token logits (rows, V)."""
    if method == "greedy":
        return logits.argmax(axis=-1)
    scaled = logits / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        # exactly top_k tokens survive; a stable sort breaks ties towards the lower id, as argmax does
        best = np.argsort(-scaled, axis=-1, kind="stable")[:, :top_k]
        kept = np.full_like(scaled, -np.inf)
        np.put_along_axis(kept, best, np.take_along_axis(scaled, best, axis=-1), axis=-1)
        scaled = kept
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    cdf = np.cumsum(probs, axis=-1)
    # inverse-CDF sampling with one uniform per row: the same draws give the same tokens
    # whether or not the cache is used (the logits agree to rounding)
    u = generator.random(len(logits))[:, None] * cdf[:, -1:]
    tokens = (cdf <= u).sum(axis=-1)
    return np.minimum(tokens, logits.shape[-1] - 1)


def _decode_bucket(step: _Step, n_rows: int, max_new: int, method, temperature, top_k, eos_id, generator):
    """Greedy or sampled continuation of one bucket (rows of equal prompt length)."""
    outputs: list[list[int]] = [[] for _ in range(n_rows)]
    alive = np.arange(n_rows)  # which bucket rows are still in the batch, in batch order
    logits = step.start()
    for t in range(max_new):
        tokens = _choose_tokens(logits, method, temperature, top_k, generator)
        ended = np.zeros(len(alive), dtype=bool) if eos_id is None else tokens == eos_id
        for row, token, done in zip(alive, tokens, ended):
            if not done:
                outputs[row].append(int(token))
        if ended.all() or t == max_new - 1:
            break
        if ended.any():  # finished rows leave the batch (and the cache)
            keep = np.flatnonzero(~ended)
            step.keep(keep)
            alive, tokens = alive[keep], tokens[keep]
        logits = step.advance(tokens)
    return outputs


# ----------------------------------------------------------------------------- beam search
class _Finished:
    """The best finished hypothesis of each prompt, score(y) = Σ log p / |y| ** length_penalty."""

    def __init__(self, n_prompts: int, length_penalty: float):
        self.lp = length_penalty
        self.best: list[tuple[float, list[int]]] = [(-np.inf, [])] * n_prompts

    def add(self, prompt: int, total: float, tokens: list[int], length: int) -> None:
        score = total / length**self.lp
        if score > self.best[prompt][0]:  # among equal scores the one found first stays
            self.best[prompt] = (score, tokens)

    def decided(self, prompt: int, best_live: float, length: int, max_new: int) -> bool:
        """True when no live beam (best sum ``best_live`` at ``length`` tokens) can still win."""
        reach = best_live / (max_new if self.lp > 0 else length) ** self.lp  # the best any live beam can still score
        return self.best[prompt][0] >= reach

    def answers(self) -> list[list[int]]:
        return [tokens for _, tokens in self.best]


def _best_continuations(a: int, prompt: int, candidates, order, generated, K: int, V: int, eos_id,
                        finished: _Finished, length: int) -> list[tuple[int, int, float]]:
    """Prompt ``a``'s candidates best first: eos ones become finished hypotheses, the first K
    others are returned as the next live beams (row, token, summed log-probability)."""
    chosen = []
    for c in order[a]:
        total = candidates[a, c]
        if total == -np.inf:
            break
        beam, token = divmod(int(c), V)
        row = a * K + beam
        if eos_id is not None and token == eos_id:
            finished.add(prompt, total, generated[row].tolist(), length)
            continue
        chosen.append((row, token, total))
        if len(chosen) == K:
            break
    return chosen


def _next_beams(chosen: list, prompt: int, generated, K: int, finished: _Finished, length: int, max_new: int):
    """The K live beams a prompt keeps for the next step, or None when it leaves the search
    (the last step finishes its live beams, or none is alive, or none can win any more)."""
    if length == max_new:
        for row, token, total in chosen:
            finished.add(prompt, total, generated[row].tolist() + [token], length)
        return None
    best_live = max((s for _, _, s in chosen), default=-np.inf)
    if best_live == -np.inf:
        return None  # nothing left alive
    if finished.decided(prompt, best_live, length, max_new):
        return None  # decided: no live beam can win any more
    while len(chosen) < K:  # fewer than K candidates (tiny vocabulary): pad with dead beams
        chosen.append((chosen[0][0], chosen[0][1], -np.inf))
    return chosen


def _beam_bucket(step: _Step, n_prompts: int, max_new: int, num_beams: int, length_penalty: float, eos_id):
    """Beam search for one bucket: ``num_beams`` rows per prompt, all prompts in one batch.

    Per step, each prompt's K live beams propose K·V continuations scored by their summed
    log-probability; walking them best first, an eos continuation becomes a finished
    hypothesis (score = sum / |y| ** length_penalty), any other fills a live beam until K
    are live. After max_new tokens the live beams are finished as they are; the answer is
    the best finished hypothesis.

    A prompt leaves the batch early only when no live beam can still beat its best finished
    hypothesis. That test is exact, not a heuristic: a live beam's sum s can only decrease
    (log-probabilities are ≤ 0) and its final length lies in (|y|, max_new], so its best
    reachable score is s / max_new ** lp for lp > 0 and at most s / |y| ** lp for lp ≤ 0.
    Stopping early therefore never changes the answer.
    """
    K = num_beams
    logp = log_softmax_array(step.start(), axis=-1)  # (n, V): the prompt is read once per prompt...
    V = logp.shape[-1]
    step.keep(np.repeat(np.arange(n_prompts), K))  # ...then copied to K beam rows
    logp = np.repeat(logp, K, axis=0)  # (n·K, V)
    scores = np.full((n_prompts, K), -np.inf)
    scores[:, 0] = 0.0  # the K copies are identical: let only the first one propose at step 1
    generated = np.zeros((n_prompts * K, 0), dtype=np.int64)  # (rows, t): new tokens per beam row
    finished = _Finished(n_prompts, float(length_penalty))
    active = np.arange(n_prompts)  # bucket prompts still searching, in batch order
    for t in range(max_new):
        length = t + 1  # new tokens in every candidate of this step
        n_active = len(active)
        candidates = (scores[:, :, None] + logp.reshape(n_active, K, V)).reshape(n_active, K * V)
        n_best = min(2 * K, K * V)  # at most K of them are eos, so ≥ K others remain when V > 1
        order = np.argsort(-candidates, axis=-1, kind="stable")[:, :n_best]
        beams, still_active = [], []  # (row, token, sum) of every kept beam, in batch order
        for a, prompt in enumerate(active):
            chosen = _best_continuations(a, prompt, candidates, order, generated, K, V, eos_id, finished, length)
            kept = _next_beams(chosen, prompt, generated, K, finished, length, max_new)
            if kept is not None:
                still_active.append(prompt)
                beams += kept
        if not still_active:
            break
        rows = np.asarray([row for row, _, _ in beams])
        tokens = [token for _, token, _ in beams]
        step.keep(rows)
        generated = np.concatenate([generated[rows], np.asarray(tokens, dtype=np.int64)[:, None]], axis=1)
        scores = np.asarray([total for _, _, total in beams]).reshape(len(still_active), K)
        active = np.asarray(still_active)
        logp = log_softmax_array(step.advance(np.asarray(tokens)), axis=-1)
    return finished.answers()


# ----------------------------------------------------------------------------- entry point
def _check_arguments(model, method, max_new_tokens, temperature, top_k, num_beams, eos_id) -> tuple[int, int | None]:
    """Clear errors for bad decoding settings; ``max_new_tokens`` and ``top_k`` as ints."""
    if method not in DECODING_METHODS:
        raise ValueError(f"generate: method must be one of {DECODING_METHODS}, got {method!r}")
    if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if method == "sample":
        if not temperature > 0:
            raise ValueError(f"generate: temperature must be > 0 for sampling, got {temperature} (use method='greedy' for argmax)")
        if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
            raise ValueError(f"generate: top_k must be a positive integer or None, got {top_k!r}")
        top_k = None if top_k is None else int(top_k)
    if method == "beam" and (int(num_beams) != num_beams or num_beams < 1):
        raise ValueError(f"generate: num_beams must be a positive integer, got {num_beams!r}")
    vocab_size = model.config.vocab_size
    if eos_id is not None and not 0 <= int(eos_id) < vocab_size:
        raise ValueError(f"generate: eos_id={eos_id} is not a token id of this model (0..{vocab_size - 1})")
    return int(max_new_tokens), top_k


def _checked_prompts(prompts, cfg) -> list[np.ndarray]:
    """The prompts as 1-D int64 arrays, each one no longer than the model's context."""
    prompt_list = _as_prompt_list(prompts)
    for i, p in enumerate(prompt_list):
        if len(p) > cfg.block_size:
            raise ValueError(
                f"generate: prompt {i} has {len(p)} tokens but the model reads at most block_size={cfg.block_size}; "
                "shorten the prompt or use a model with a larger GPTConfig.block_size"
            )
    return prompt_list


def _checked_adapter_ids(adapter_ids, n_prompts: int):
    """``adapter_ids`` as an object array (one adapter name per prompt), or None."""
    if adapter_ids is None:
        return None
    if isinstance(adapter_ids, str) or len(adapter_ids) != n_prompts:
        raise ValueError(
            f"generate: adapter_ids must hold one adapter name per prompt ({n_prompts}), got {adapter_ids!r}"
        )
    return np.array(list(adapter_ids), dtype=object)


@contextlib.contextmanager
def _eval_without_grad(model):
    """The model in eval mode under ``no_grad``; each module's previous mode restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with no_grad():
            yield
    finally:
        for m, training in modes:
            object.__setattr__(m, "training", training)


def generate(
    model,
    prompts,
    max_new_tokens: int,
    method: str = "greedy",
    temperature: float = 1.0,
    top_k: int | None = None,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    eos_id: int | None = None,
    adapter_ids=None,
    use_cache: bool = True,
    seed: int | None = None,
) -> list[list[int]]:
    """The new tokens that continue each prompt (a list of int lists, in the order of ``prompts``).

    prompts: a list of token-id lists (lengths may differ) or a 2-D int array (n, T).
    method: "greedy" (argmax), "sample" (softmax(logits / temperature), optionally restricted to
        the ``top_k`` most likely tokens) or "beam" (``num_beams`` beams per prompt, score =
        Σ log p / |y| ** length_penalty; see the module docstring).
    eos_id: the token that ends a continuation; it is not included in the result. Without it
        every prompt gets max_new_tokens tokens (fewer when the context fills up).
    adapter_ids: one adapter name per prompt (a batch that mixes tasks; see ``minilora.lora``).
    use_cache: reuse keys/values between steps (KV cache); False recomputes the prefix each step.
    seed: seeds a private NumPy generator for sampling; None draws from ``ml.manual_seed``'s
        generator (``minilora.backend.rng('numpy')``).

    Runs under ``no_grad`` with the model in eval mode (dropout off); each module's previous
    mode is restored afterwards.
    """
    max_new_tokens, top_k = _check_arguments(model, method, max_new_tokens, temperature, top_k, num_beams, eos_id)
    cfg = model.config
    prompt_list = _checked_prompts(prompts, cfg)
    adapter_ids = _checked_adapter_ids(adapter_ids, len(prompt_list))
    generator = np.random.default_rng(seed) if seed is not None else bk.rng("numpy")

    results: list[list[int] | None] = [None] * len(prompt_list)
    buckets: dict[int, list[int]] = {}  # prompt length -> the prompts of that length
    for i, p in enumerate(prompt_list):
        buckets.setdefault(len(p), []).append(i)
    with _eval_without_grad(model):
        for length in sorted(buckets):
            members = buckets[length]
            max_new = min(max_new_tokens, cfg.block_size - length)  # prompt + new ≤ block_size
            if max_new == 0:
                outs = [[] for _ in members]
            else:
                step = _Step(model, np.stack([prompt_list[i] for i in members]),
                             None if adapter_ids is None else adapter_ids[members], use_cache)
                if method == "beam":
                    outs = _beam_bucket(step, len(members), max_new, int(num_beams), length_penalty, eos_id)
                else:
                    outs = _decode_bucket(step, len(members), max_new, method, temperature, top_k, eos_id, generator)
            for i, out in zip(members, outs):
                results[i] = out
    return results
