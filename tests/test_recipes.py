"""Recipes: evaluation gives every prompt room to finish; fine-tuning trains what it should."""

import numpy as np

from minilora import recipes
from minilora.data import Tokenizer, load_task, prompt_ids
from minilora.models import GPT, GPTConfig
from minilora.recipes import evaluate, finetune


def test_evaluate_lets_every_prompt_run_to_block_size(monkeypatch):
    model = GPT(GPTConfig(n_layer=1, d_model=16, n_head=2))
    examples = load_task("parse", "test", 12)
    tok = Tokenizer.default()
    lengths = [len(prompt_ids(tok, ex.prompt)) for ex in examples]
    assert len(set(lengths)) > 1
    seen = {}

    def fake_generate(generating_model, prompts, max_new_tokens, **kwargs):
        assert generating_model is model
        seen["budget"] = max_new_tokens
        return [[] for _ in prompts]

    monkeypatch.setattr(recipes, "generate", fake_generate)  # the free function recipes calls
    evaluate(model, "parse", examples, tok)
    # the shortest prompt may need every position up to block_size (generate() caps each row itself)
    assert seen["budget"] == model.config.block_size - min(lengths)


def test_finetune_lora_trains_only_A_and_B():
    base = GPT(GPTConfig(n_layer=2, d_model=16, n_head=2))
    before = {n: p.data.copy() for n, p in base.named_parameters()}
    run = finetune("classify", "lora", base=base, r=2, steps=3, n_train=32, n_eval=4, progress=False)
    assert run.trainable_params == 2 * (2 * 2) * 16 * 2  # |Θ| = 2 × L̂ × d_model × r, L̂ = 2 blocks × (q, v)
    assert run.optimizer_state_bytes == 2 * 4 * run.trainable_params  # AdamW: two float32 moments
    for name, p in base.named_parameters():  # the base passed in is copied, never trained
        np.testing.assert_array_equal(p.data, before[name])
    assert {n for n, p in run.model.named_parameters() if p.requires_grad} == {
        n for n, _ in run.model.named_parameters() if ".lora_" in n}
    assert 0.0 <= run.metric <= 1.0 and len(run.history.losses) == 3


def test_each_subset_seed_draws_its_own_training_subset():
    everything = load_task("classify", "train")
    a, b = recipes.training_examples("classify", 64, 0), recipes.training_examples("classify", 64, 1)
    assert len(a) == len(b) == 64 and a == recipes.training_examples("classify", 64, 0)
    assert len(set(a) & set(b)) < 16  # two draws of 64 from 2,000 share about 2
    assert set(a) <= set(everything) and a == sorted(a, key=everything.index)  # in the split's order
    assert recipes.training_examples("classify", 64) == everything[:64]  # no seed: the first n
    assert recipes.training_examples("classify", None, 3) == everything
    with np.testing.assert_raises_regex(ValueError, "the classify train split has 2000 examples"):
        recipes.training_examples("classify", 2001, 0)


def test_full_fine_tuning_on_a_small_subset_differs_between_seeds():
    """FT has no random initialisation: with one fixed subset of 8 examples (one batch) every seed
    would train the same model; drawing the subset by the seed makes the seeds differ."""
    base = GPT(GPTConfig(n_layer=1, d_model=16, n_head=2))
    kw = dict(base=base, steps=2, n_train=8, batch_size=8, n_eval=4, progress=False, measure_memory=False)
    fixed = [finetune("parse", "full", seed=s, **kw).history.losses for s in (0, 1)]
    drawn = [finetune("parse", "full", seed=s, subset_seed=s, **kw).history.losses for s in (0, 1)]
    assert fixed[0] == fixed[1]
    assert drawn[0] != drawn[1]


def test_zero_shot_scores_the_base_without_training():
    base = GPT(GPTConfig(n_layer=1, d_model=16, n_head=2))
    before = {n: p.data.copy() for n, p in base.named_parameters()}
    run = recipes.zero_shot("e2e", base=base, n_eval=6)
    assert run.method == "base" and run.trainable_params == 0 and run.train_seconds == 0.0
    assert run.history.losses == [] and 0.0 <= run.metric <= 1.0 and np.isfinite(run.eval_loss)
    assert set(run.text_scores) == {"bleu", "rouge_l"}
    for name, p in base.named_parameters():
        np.testing.assert_array_equal(p.data, before[name])


def test_the_shipped_base_has_never_seen_the_sql_task():
    """Zero-shot, the base writes no query (its keywords are new to it); e2e it already half does."""
    sql = recipes.zero_shot("sql", n_eval=20)
    assert sql.metric == 0.0 and sql.eval_loss > 3.0
    e2e = recipes.zero_shot("e2e", n_eval=20)
    assert e2e.metric > 0.3 and e2e.eval_loss < 1.0
