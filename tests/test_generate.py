"""Generation: the KV cache changes nothing but the cost, buckets change nothing, beams and eos behave.

The models here are tiny float64 GPTs with their weights scaled up from the 0.02 init, so the
next-token distributions are peaked and ties between candidates do not occur.
"""

import itertools

import numpy as np
import pytest

import minilora as ml
from minilora import lora, nn
from minilora.generate import generate
from minilora.models import GPT, GPTConfig

CFG = GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, d_model=16)


def random_model(cfg, std=0.5, seed=0):
    """Every parameter N(0, std²) (LayerNorm gains around 1): far from the init, varied outputs."""
    ml.manual_seed(seed)
    model = GPT(cfg).to(dtype="float64")
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        values = rng.standard_normal(p.shape) * std
        if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")):
            values += 1.0
        p.data[...] = values
    return model


def sharp_model(cfg=CFG, scale=25.0, seed=0):
    ml.manual_seed(seed)
    model = GPT(cfg).to(dtype="float64")
    for name, p in model.named_parameters():
        if name.endswith(".weight") and ".ln" not in name and not name.startswith("ln_f"):
            p.data *= scale
    return model


@pytest.fixture(scope="module")
def model():
    return sharp_model()


def random_prompts(n=9, lengths=(1, 6), seed=0, vocab=CFG.vocab_size):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(*lengths))).tolist() for _ in range(n)]


PROMPTS = random_prompts()  # 9 prompts of lengths 1..5, several per length
EOS = 8  # a token the fixture model emits at different steps for different prompts (checked below)


def log_prob_of(model, prompt, continuation) -> float:
    """Σ log P(continuation | prompt), by one full forward pass (no cache, no generate)."""
    seq = np.array([list(prompt) + list(continuation)])
    with ml.no_grad():
        logits = ml.backend.to_numpy(model(seq[:, :-1]).data)[0]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    positions = np.arange(len(prompt) - 1, seq.shape[1] - 1)
    return float(logp[positions, seq[0, len(prompt):]].sum())


# ----------------------------------------------------------------------------- the cache
@pytest.mark.parametrize("method, kwargs", [
    ("greedy", {}),
    ("greedy", {"eos_id": EOS}),
    ("sample", {"seed": 3, "temperature": 0.8, "top_k": 5}),
    ("beam", {"num_beams": 3}),
    ("beam", {"num_beams": 4, "eos_id": EOS, "length_penalty": 0.7}),
])
def test_cache_equals_no_cache(model, method, kwargs):
    with_cache = generate(model, PROMPTS, 8, method=method, **kwargs)
    without = generate(model, PROMPTS, 8, method=method, use_cache=False, **kwargs)
    assert with_cache == without
    assert len(with_cache) == len(PROMPTS)
    assert all(isinstance(tok, int) for out in with_cache for tok in out)


# ----------------------------------------------------------------------------- greedy
def test_greedy_is_the_argmax_chain(model):
    prompt, out = PROMPTS[0], generate(model, PROMPTS[:1], 6)[0]
    seq = list(prompt)
    for token in out:
        with ml.no_grad():
            logits = ml.backend.to_numpy(model(np.array([seq])).data)[0, -1]
        assert token == int(logits.argmax())
        seq.append(token)
    assert len(out) == 6


@pytest.mark.parametrize("eos_id", [None, EOS])
def test_bucketed_batch_equals_one_prompt_at_a_time(model, eos_id):
    together = generate(model, PROMPTS, 9, eos_id=eos_id)
    alone = [generate(model, [p], 9, eos_id=eos_id)[0] for p in PROMPTS]
    assert together == alone


def test_prompts_as_a_2d_array(model):
    array = np.array([[1, 2, 3], [4, 5, 6]])
    assert generate(model, array, 4) == generate(model, array.tolist(), 4)
    assert generate(model, ml.tensor(array), 4) == generate(model, array.tolist(), 4)


def test_eos_stops_and_is_not_included(model):
    free = generate(model, PROMPTS, 10)
    stop_steps = {f.index(EOS) if EOS in f else None for f in free}
    assert len(stop_steps) >= 4, "the fixture should make rows stop at different steps (and some never)"
    assert [o for o, f in zip(generate(model, PROMPTS, 10, eos_id=EOS), free)] == [
        f[: f.index(EOS)] if EOS in f else f for f in free
    ]
    eos = free[0][2]  # a token greedy emits: with it as eos, outputs are cut before its first use
    stopped = generate(model, PROMPTS, 10, eos_id=eos)
    for f, s in zip(free, stopped):
        assert s == (f[: f.index(eos)] if eos in f else f)
    assert any(eos in f for f in free) and len(stopped[0]) == 2


def test_block_size_is_respected(model):
    T = CFG.block_size
    prompts = [[1] * (T - 3), [2] * T, [3] * (T - 1), [4]]
    for method in ("greedy", "sample", "beam"):
        for use_cache in (True, False):
            out = generate(model, prompts, 10, method=method, use_cache=use_cache, seed=0)
            assert [len(o) for o in out] == [3, 0, 1, 10], (method, use_cache)
    with pytest.raises(ValueError, match="block_size"):
        generate(model, [[1] * (T + 1)], 2)


def test_zero_new_tokens(model):
    assert generate(model, PROMPTS[:3], 0) == [[], [], []]
    assert generate(model, PROMPTS[:3], 0, method="beam") == [[], [], []]


def test_eval_mode_and_no_grad_then_previous_mode_restored():
    model = sharp_model(GPTConfig(vocab_size=13, block_size=16, n_layer=1, n_head=2, d_model=8, dropout=0.3))
    model.train()
    model.blocks[0].attn.eval()  # a mixed state is restored exactly
    a = generate(model, PROMPTS, 6)
    b = generate(model, PROMPTS, 6, use_cache=False)
    assert a == b  # dropout off: otherwise the two runs would draw different masks
    assert model.training and model.blocks[0].mlp.training and not model.blocks[0].attn.training
    assert all(p.grad is None for p in model.parameters())
    assert ml.is_grad_enabled()


# ----------------------------------------------------------------------------- sampling
def test_sampling_is_reproducible_with_a_seed(model):
    a = generate(model, PROMPTS, 8, method="sample", seed=11)
    assert a == generate(model, PROMPTS, 8, method="sample", seed=11)
    assert a != generate(model, PROMPTS, 8, method="sample", seed=12)
    ml.manual_seed(4)  # without a seed: the generator of ml.manual_seed
    b = generate(model, PROMPTS, 8, method="sample")
    ml.manual_seed(4)
    assert b == generate(model, PROMPTS, 8, method="sample")


def test_top_k_1_is_greedy(model):
    greedy = generate(model, PROMPTS, 8, eos_id=EOS)
    assert generate(model, PROMPTS, 8, method="sample", top_k=1, seed=0, eos_id=EOS) == greedy
    assert generate(model, PROMPTS, 8, method="sample", top_k=1, temperature=3.0, seed=1, eos_id=EOS) == greedy


def test_top_k_restricts_the_support(model):
    prompt = PROMPTS[2]
    with ml.no_grad():
        logits = ml.backend.to_numpy(model(np.array([prompt])).data)[0, -1]
    allowed = set(np.argsort(-logits)[:3].tolist())
    firsts = {generate(model, [prompt], 1, method="sample", top_k=3, temperature=5.0, seed=s)[0][0] for s in range(60)}
    assert firsts <= allowed and len(firsts) > 1


def test_sampling_follows_the_distribution():
    """High temperature on a 4-token model: first-token frequencies match softmax(logits / T)."""
    model = sharp_model(GPTConfig(vocab_size=4, block_size=4, n_layer=1, n_head=1, d_model=4), scale=20.0)
    prompt, temperature, n = [1, 2], 2.0, 4000
    with ml.no_grad():
        logits = ml.backend.to_numpy(model(np.array([prompt])).data)[0, -1] / temperature
    p = np.exp(logits - logits.max())
    p /= p.sum()
    first = np.array([o[0] for o in generate(model, [prompt] * n, 1, method="sample", temperature=temperature, seed=0)])
    freq = np.bincount(first, minlength=4) / n
    assert np.abs(freq - p).max() < 4 * np.sqrt(p.max() / n) + 1e-3


# ----------------------------------------------------------------------------- beam search
def test_beam_with_one_beam_is_greedy(model):
    assert generate(model, PROMPTS, 8, method="beam", num_beams=1) == generate(model, PROMPTS, 8)
    # with eos and no length normalisation a finished hypothesis is final, as in greedy
    assert generate(model, PROMPTS, 8, method="beam", num_beams=1, eos_id=EOS, length_penalty=0.0) == generate(
        model, PROMPTS, 8, eos_id=EOS
    )


def brute_force_best(model, prompt, max_new, eos_id, length_penalty):
    """The exact argmax of Σ log p / |y| ** length_penalty over every allowed continuation y."""
    V = model.config.vocab_size
    words = [t for t in range(V) if t != eos_id]
    best, best_score = None, -np.inf
    for length in range(1, max_new + 1):
        for body in itertools.product(words, repeat=length - 1):
            endings = [(list(body) + [eos_id], list(body))]  # ends on eos (eos counted in |y|)
            if length == max_new:
                endings += [(list(body) + [w], list(body) + [w]) for w in words]  # cut at max_new
            for scored, returned in endings:
                score = log_prob_of(model, prompt, scored) / len(scored) ** length_penalty
                if score > best_score:
                    best, best_score = returned, score
    return best


EXHAUSTIVE_PROMPTS = [[1, 3], [2], [0, 4, 4], [3], [4, 0], [1, 1, 1]]
EXHAUSTIVE_BEST = {  # what the search must find; eos (2) ends some optima early, more so for small penalties
    0.0: [[3, 3, 3], [], [0, 3, 3], [3], [], [3, 3, 3]],
    0.5: [[3, 3, 3], [], [0, 3, 3], [3, 3], [0, 0], [3, 3, 3]],
    1.0: [[3, 3, 3], [3, 3], [0, 3, 3], [3, 3], [0, 0], [3, 3, 3]],
}


@pytest.mark.parametrize("length_penalty", sorted(EXHAUSTIVE_BEST))
def test_exhaustive_beam_finds_the_exact_optimum(length_penalty):
    """With num_beams ≥ V^(max_new-1) beam search is exhaustive: it must return the brute-force best."""
    model = random_model(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, d_model=8), std=0.5, seed=1)
    eos = 2
    out = generate(model, EXHAUSTIVE_PROMPTS, 3, method="beam", num_beams=16, eos_id=eos, length_penalty=length_penalty)
    assert out == [brute_force_best(model, p, 3, eos, length_penalty) for p in EXHAUSTIVE_PROMPTS]
    assert out == EXHAUSTIVE_BEST[length_penalty]


def test_beam_search_beats_greedy_here(model):
    """Not a theorem (greedy's path can fall off the beam), but with 8 beams over 4 steps it holds
    on these prompts, and on some the beam finds a strictly more likely continuation."""
    greedy = generate(model, PROMPTS, 4)
    beam = generate(model, PROMPTS, 4, method="beam", num_beams=8, length_penalty=0.0)
    gains = [log_prob_of(model, p, b) - log_prob_of(model, p, g) for p, g, b in zip(PROMPTS, greedy, beam)]
    assert all(len(b) == 4 for b in beam)
    assert min(gains) >= -1e-12 and max(gains) > 0.1


def next_log_probs(model, seq) -> np.ndarray:
    with ml.no_grad():
        logits = ml.backend.to_numpy(model(np.array([seq])).data)[0, -1]
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def reference_beam(model, prompt, max_new, num_beams, eos_id, length_penalty):
    """Textbook beam search for one prompt: no cache, no batching, no early stop, every candidate."""
    max_new = min(max_new, model.config.block_size - len(prompt))
    beams = [(0.0, [])]  # (Σ log p, new tokens)
    best_score, best = -np.inf, []

    def finish(total, tokens, length):
        nonlocal best_score, best
        if total / length**length_penalty > best_score:
            best_score, best = total / length**length_penalty, tokens

    for t in range(max_new):
        candidates = []
        for total, tokens in beams:
            logp = next_log_probs(model, list(prompt) + tokens)
            candidates += [(total + logp[v], tokens, v) for v in range(len(logp))]
        candidates.sort(key=lambda c: -c[0])  # stable, like the candidate order in generate
        beams = []
        for total, tokens, v in candidates:
            if v == eos_id:
                finish(total, tokens, t + 1)
            elif len(beams) < num_beams:
                beams.append((total, tokens + [v]))
            if len(beams) == num_beams:
                break
    for total, tokens in beams:
        finish(total, tokens, max_new)
    return best


@pytest.mark.parametrize("num_beams, length_penalty", [(2, 0.0), (3, 1.0), (5, 2.0), (4, -0.5)])
def test_beam_equals_a_textbook_beam_search(model, num_beams, length_penalty):
    """Batched, cached, early-stopping beam search returns what the plain algorithm returns."""
    kwargs = {"num_beams": num_beams, "eos_id": EOS, "length_penalty": length_penalty}
    out = generate(model, PROMPTS, 7, method="beam", **kwargs)
    assert out == [reference_beam(model, p, 7, **kwargs) for p in PROMPTS]


def test_beam_with_more_beams_than_tokens():
    """V = 4 < num_beams = 6: the first step has fewer candidates than beams (the rest stay empty)."""
    model = random_model(GPTConfig(vocab_size=4, block_size=9, n_layer=1, n_head=2, d_model=8), std=0.7, seed=2)
    prompts = [[0], [1, 2], [3, 3], [2, 0, 1]]
    for eos in (None, 1):
        out = generate(model, prompts, 5, method="beam", num_beams=6, eos_id=eos, length_penalty=1.0)
        assert out == [reference_beam(model, p, 5, 6, eos, 1.0) for p in prompts]


def test_beam_bucketed_equals_one_prompt_at_a_time(model):
    kwargs = {"method": "beam", "num_beams": 3, "eos_id": EOS, "length_penalty": 1.0}
    assert generate(model, PROMPTS, 7, **kwargs) == [generate(model, [p], 7, **kwargs)[0] for p in PROMPTS]


def test_beam_output_never_contains_eos(model):
    for out in generate(model, PROMPTS, 10, method="beam", num_beams=4, eos_id=EOS):
        assert EOS not in out


# ----------------------------------------------------------------------------- adapters
class TaggedGPT(GPT):
    """A GPT whose logits get a per-adapter bias: outputs reveal which adapter each row used.

    The bias comes from a LoRALinear ``tag`` (1 -> V, W0 = 0) fed a constant 1: adapter a has
    rank 1, A = [[1]] and B = bias_a, so s·B·A·1 = bias_a, row by row under ``lora.mixed_batch``.
    """

    def __init__(self, cfg, biases):
        super().__init__(cfg)
        self.tag = lora.LoRALinear(nn.Linear(1, cfg.vocab_size, bias=False))
        self.tag.weight.data[...] = 0.0
        for name, bias in biases.items():  # {adapter name: (V,) array}
            self.tag.add_adapter(name, lora.LoRAConfig(r=1, alpha=1, target_modules=("tag",)))
            self.tag.lora_A[name].data[...] = 1.0
            self.tag.lora_B[name].data[...] = bias[:, None]
        self.seen = []  # the adapter of each row, at every forward call

    def forward(self, idx, cache=None):
        logits = super().forward(idx, cache=cache)
        groups = self.tag.row_groups
        self.seen.append(None if groups is None else groups.n_rows)
        if groups is None:
            return logits
        ones = ml.tensor(np.ones((logits.shape[0], 1, 1)), dtype=logits.dtype)
        return logits + self.tag(ones)  # (B, T, V) + (B, 1, V): each row's adapter bias


@pytest.mark.parametrize("method, kwargs", [("greedy", {"eos_id": EOS}), ("beam", {"num_beams": 3, "eos_id": EOS})])
def test_adapter_ids_follow_their_rows(method, kwargs):
    rng = np.random.default_rng(0)
    ml.manual_seed(0)
    model = TaggedGPT(CFG, {name: rng.standard_normal(CFG.vocab_size) * 3 for name in ("e2e", "parse", "classify")})
    model.to(dtype="float64")
    names = ["e2e", "parse", "classify"]
    adapter_ids = [names[i % 3] for i in range(len(PROMPTS))]
    mixed = generate(model, PROMPTS, 8, method=method, adapter_ids=adapter_ids, **kwargs)
    for use_cache in (True, False):
        alone = [generate(model, [p], 8, method=method, adapter_ids=[a], use_cache=use_cache, **kwargs)[0]
                 for p, a in zip(PROMPTS, adapter_ids)]
        assert mixed == alone
    # the adapters matter: the same prompt under another adapter continues differently
    swapped = generate(model, PROMPTS, 8, method=method, adapter_ids=adapter_ids[1:] + adapter_ids[:1], **kwargs)
    assert swapped != mixed
    assert all(rows is not None and rows > 0 for rows in model.seen)


@pytest.mark.parametrize("method, kwargs", [
    ("greedy", {"eos_id": EOS}),
    ("beam", {"num_beams": 3, "eos_id": EOS, "length_penalty": 1.0}),
])
def test_mixed_lora_adapters_in_one_call(method, kwargs):
    """Serving a batch that mixes tasks: each prompt decodes as if its adapter alone were active."""
    model = sharp_model()
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v")), adapter_name="e2e")
    lora.apply_lora(model, lora.LoRAConfig(r=3, alpha=3, target_modules=("q", "fc")), adapter_name="parse")
    rng = np.random.default_rng(1)
    for name, p in model.named_parameters():
        if ".lora_B." in name:  # B starts at 0 (adapted model == base); make the adapters matter
            p.data[...] = rng.standard_normal(p.shape) * 2.0
    names = ["e2e", "parse", lora.BASE_ADAPTER]
    adapter_ids = [names[i % 3] for i in range(len(PROMPTS))]
    mixed = generate(model, PROMPTS, 8, method=method, adapter_ids=adapter_ids, **kwargs)

    def alone(prompt, name):
        if name == lora.BASE_ADAPTER:
            with lora.disable_adapters(model):
                return generate(model, [prompt], 8, method=method, **kwargs)[0]
        lora.set_adapter(model, name)
        return generate(model, [prompt], 8, method=method, **kwargs)[0]

    assert mixed == [alone(p, a) for p, a in zip(PROMPTS, adapter_ids)]
    # and the adapters do change the continuations
    per_adapter = [[alone(p, a) for p in PROMPTS] for a in names]
    assert per_adapter[0] != per_adapter[1] != per_adapter[2] != per_adapter[0]


# ----------------------------------------------------------------------------- errors
def test_argument_errors(model):
    with pytest.raises(ValueError, match="method"):
        generate(model, PROMPTS, 3, method="nucleus")
    with pytest.raises(TypeError, match="wrap a single prompt"):
        generate(model, [1, 2, 3], 3)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1], []], 3)
    with pytest.raises(TypeError, match="integers"):
        generate(model, [[1.5, 2.0]], 3)
    with pytest.raises(ValueError, match="one adapter name per prompt"):
        generate(model, PROMPTS, 3, adapter_ids=["a"])
    with pytest.raises(ValueError, match="temperature"):
        generate(model, PROMPTS, 3, method="sample", temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, PROMPTS, 3, method="sample", top_k=0)
    with pytest.raises(ValueError, match="num_beams"):
        generate(model, PROMPTS, 3, method="beam", num_beams=0)
    with pytest.raises(ValueError, match="eos_id"):
        generate(model, PROMPTS, 3, eos_id=CFG.vocab_size)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, PROMPTS, -1)
