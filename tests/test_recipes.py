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
