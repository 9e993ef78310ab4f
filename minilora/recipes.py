"""Recipes shared by the CLI, the demo, the experiments and the tutorials.

    base = load_base()                                   # the shipped pre-trained GPT
    run = finetune("e2e", method="lora", r=4, targets=("q", "v"))
    run.metric, run.trainable_params, run.optimizer_state_bytes

``pretrain`` makes the base model; ``finetune`` adapts a copy of it to one task with full
fine-tuning (eq. 1: every weight trains) or LoRA (eq. 2: only A and B train); ``evaluate``
decodes the test prompts and scores them with the task's metric.
"""

from __future__ import annotations

import copy
import functools
import os
import time
import tracemalloc
from dataclasses import dataclass, field

import numpy as np

from . import backend as bk
from . import optim
from .data import TASKS, Tokenizer, collate, lm_collate, load_task, pretrain_corpus, prompt_ids, task_metric
from .generate import generate
from .models import GPT, GPTConfig, load_base, save_model
from .models.pretrained import BASE_CONFIG, BASE_WEIGHTS
from .tensor import no_grad
from .train import History, epoch_batches, fit

__all__ = ["FAST", "RunResult", "pretrain", "finetune", "evaluate", "task_batches", "peak_step_memory", "METHODS"]

FAST = os.environ.get("MINILORA_FAST", "") not in ("", "0")

# Hyper-parameters found on this machine (see docs/results.md): LoRA wants a larger learning rate
# than full fine-tuning, as in the paper's Table 11 (2e-4 full vs up to 2e-3 for LoRA).
# LoRA also wants more steps here (500 against 250) to reach full fine-tuning's test metric.
METHODS = {
    "full": {"lr": 1e-3, "weight_decay": 0.01, "steps": 250},
    "lora": {"lr": 5e-3, "weight_decay": 0.0, "steps": 500},
}


@dataclass
class RunResult:
    task: str
    method: str
    model: GPT
    history: History
    metric_name: str
    metric: float
    trainable_params: int
    total_params: int
    optimizer_state_bytes: int
    train_seconds: float
    peak_memory_bytes: int = 0
    config: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The demo's JSON schema for one (task, method) cell."""
        return {
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "metric_name": self.metric_name,
            "metric": self.metric,
            "train_seconds": self.train_seconds,
            "optimizer_state_bytes": self.optimizer_state_bytes,
            "peak_memory_bytes": self.peak_memory_bytes,
        }


def task_batches(examples, tokenizer: Tokenizer, batch_size: int, seed: int, block_size: int):
    """``get_batch(step)`` for ``fit``: shuffled epochs of collated task batches."""
    rows = epoch_batches(len(examples), batch_size, seed)

    def get_batch(step):
        b = collate([examples[i] for i in rows(step)], tokenizer, block_size=block_size)
        return b.idx, b.targets, b.mask

    return get_batch


def evaluate(model: GPT, task: str, examples, tokenizer: Tokenizer | None = None, adapter_ids=None,
             method: str = "greedy", **generate_kwargs) -> tuple[str, float, list[str]]:
    """Decode every prompt and score it: (metric_name, value, predictions)."""
    tokenizer = tokenizer or Tokenizer.default()
    prompts = [prompt_ids(tokenizer, ex.prompt) for ex in examples]
    # generate() stops each row at block_size, so the budget is what the SHORTEST prompt leaves
    room = model.config.block_size - min(len(p) for p in prompts)
    outputs = generate(model, prompts, max_new_tokens=room, eos_id=tokenizer.eos_id, method=method,
                       adapter_ids=adapter_ids, **generate_kwargs)
    preds = [tokenizer.decode(out, skip_special=True) for out in outputs]
    name, value = task_metric(task, preds, examples)
    return name, value, preds


def peak_step_memory(model: GPT, optimizer, get_batch) -> int:
    """Peak bytes allocated during one training step (tracemalloc sees NumPy's allocations).

    Measured on a separate step: tracemalloc slows allocation down, so timing runs go without it.
    """
    idx, targets, mask = get_batch(0)
    saved = {id(p): p.data.copy() for p in optimizer.params}
    saved_state = optimizer.state_dict()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        loss = model.loss(idx, targets, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    for p in optimizer.params:  # undo the measuring step
        p.data[...] = saved[id(p)]
        p.grad = None
    optimizer.load_state_dict(saved_state)
    return int(peak)


def finetune(task: str, method: str = "lora", *, base: GPT | None = None, r: int = 4, alpha: float | None = None,
             targets=("q", "v"), steps: int | None = None, batch_size: int = 16, lr: float | None = None,
             seed: int = 0, n_train: int | None = None, n_eval: int | None = None, eval_split: str = "test",
             progress: bool = True, measure_memory: bool = True, adapter_name: str | None = None,
             tokenizer: Tokenizer | None = None) -> RunResult:
    """Adapt (a copy of) the base model to ``task`` with ``method`` "full" or "lora"; evaluate it.

    LoRA: r and targets as in the paper's GPT-3 setting (r = 4 on Wq, Wv); alpha defaults to 2r
    (scaling α/r = 2). Full fine-tuning trains every weight (eq. 1); LoRA only A and B (eq. 2).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; the tasks are {list(TASKS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    tokenizer = tokenizer or Tokenizer.default()
    steps = steps if steps is not None else (40 if FAST else METHODS[method]["steps"])
    model = copy.deepcopy(base) if base is not None else load_base()
    bk.manual_seed(seed)
    if method == "lora":
        from . import lora

        config = lora.LoRAConfig(r=r, alpha=float(alpha if alpha is not None else 2 * r), target_modules=tuple(targets))
        lora.apply_lora(model, config, adapter_name=adapter_name or task)
        lora.mark_only_lora_as_trainable(model)
    hp = METHODS[method]
    optimizer = optim.AdamW(model.parameters(trainable_only=True), lr=lr or hp["lr"], weight_decay=hp["weight_decay"])
    scheduler = optim.LRScheduler(optimizer, functools.partial(optim.warmup_linear, total=steps, warmup=max(1, steps // 10)))
    train = load_task(task, "train", n_train)
    get_batch = task_batches(train, tokenizer, batch_size, seed, model.config.block_size)
    peak = peak_step_memory(model, optimizer, get_batch) if measure_memory else 0
    history = fit(model, optimizer, get_batch, steps, scheduler=scheduler, progress=progress, desc=f"{task}/{method}")
    evaluation = load_task(task, eval_split, n_eval if n_eval is not None else (40 if FAST else None))
    model.eval()
    metric_name, metric, _ = evaluate(model, task, evaluation, tokenizer)
    return RunResult(
        task=task, method=method, model=model, history=history, metric_name=metric_name, metric=metric,
        trainable_params=model.num_parameters(trainable_only=True), total_params=model.num_parameters(),
        optimizer_state_bytes=optimizer.state_bytes(), train_seconds=history.seconds, peak_memory_bytes=peak,
        config={"r": r, "targets": list(targets), "steps": steps, "batch_size": batch_size, "lr": scheduler.base_lr, "seed": seed},
    )


def pretrain(steps: int = 3000, batch_size: int = 32, lr: float = 3e-3, seed: int = 0, n_texts: int = 20000,
             config: GPTConfig | None = None, out_weights=BASE_WEIGHTS, out_config=BASE_CONFIG,
             progress: bool = True) -> tuple[GPT, History, float]:
    """Train the base GPT on the free-description corpus and write it (the shipped asset).

    Returns (model, history, held-out LM loss). Deterministic for a seed.
    """
    tokenizer = Tokenizer.default()
    bk.manual_seed(seed)
    cfg = config or GPTConfig(vocab_size=96, block_size=64, n_layer=4, n_head=4, d_model=128, dropout=0.0)
    model = GPT(cfg)
    texts = pretrain_corpus(n_texts, seed=seed)
    held_out = pretrain_corpus(512, seed=seed + 1)
    rows = epoch_batches(len(texts), batch_size, seed)

    def get_batch(step):
        b = lm_collate([texts[i] for i in rows(step)], tokenizer, block_size=cfg.block_size)
        return b.idx, b.targets, b.mask

    optimizer = optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = optim.LRScheduler(optimizer, functools.partial(optim.warmup_cosine, total=steps, warmup=max(1, steps // 20), min_ratio=0.05))
    started = time.perf_counter()
    history = fit(model, optimizer, get_batch, steps, scheduler=scheduler, progress=progress, desc="pretrain")
    held_out_loss = lm_loss(model, held_out, tokenizer)
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "n_texts": n_texts,
            "held_out_loss": held_out_loss, "train_seconds": time.perf_counter() - started,
            "command": "minilora pretrain"}
    if out_weights:
        save_model(model, out_weights, out_config, info)
    return model, history, held_out_loss


def lm_loss(model: GPT, texts, tokenizer: Tokenizer | None = None, batch_size: int = 64) -> float:
    """Mean token NLL of ``texts`` under the model (every real token counts)."""
    tokenizer = tokenizer or Tokenizer.default()
    total, count = 0.0, 0.0
    model.eval()
    with no_grad():
        for start in range(0, len(texts), batch_size):
            b = lm_collate(texts[start:start + batch_size], tokenizer, block_size=model.config.block_size)
            n = float(np.asarray(b.mask).sum())
            total += float(model.loss(b.idx, b.targets, b.mask).item()) * n
            count += n
    return total / count
