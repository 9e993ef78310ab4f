"""A tiny training run, shared by tests/test_checkpoint_safety.py and the subprocess its kill test starts
(importing only minilora, so the child starts fast)."""

from __future__ import annotations

import functools

import minilora as ml
from minilora import lora, optim
from minilora.data import Tokenizer, load_task
from minilora.models import GPT, GPTConfig
from minilora.recipes import task_batches

TINY = GPTConfig(vocab_size=96, block_size=64, n_layer=1, n_head=2, d_model=16, dropout=0.1)
EXAMPLES = load_task("classify", "train", 64)


def tiny_run(method="full", seed=0, lr=3e-3, total=12):
    """(model, AdamW, warm-up cosine scheduler, get_batch): full fine-tuning or LoRA r=2 on q, v."""
    ml.manual_seed(seed)
    model = GPT(TINY)
    if method == "lora":
        lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v")))
        lora.mark_only_lora_as_trainable(model)
    opt = optim.AdamW(model.parameters(trainable_only=True), lr=lr)
    sched = optim.LRScheduler(opt, functools.partial(optim.warmup_cosine, total=total, warmup=2))
    return model, opt, sched, task_batches(EXAMPLES, Tokenizer.default(), 8, seed, TINY.block_size)
