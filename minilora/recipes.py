"""The one fine-tuning pipeline, shared by the CLI, the demo, the experiments and the tutorials.

    base = load_base()                                   # the shipped pre-trained GPT
    run = finetune("e2e", "lora", r=4, targets=("q", "v"))
    run.metric, run.eval_loss, run.trainable_params, run.optimizer_state_bytes

``pretrain`` makes the base model; ``finetune(task, method, **hp)`` adapts a copy of it to one
task with any method of ``minilora.methods`` — full fine-tuning (eq. 1: every weight trains),
LoRA (eq. 2: only A and B train), or a baseline (FT^Top2, BitFit, Adapter^H/L, PreEmbed) — with
the settings of ``HYPERPARAMS[method]`` unless ``hp`` overrides them; ``evaluate`` decodes the
test prompts and scores them with the task's metric; ``target_loss`` is eq. 2's loss on them.
``finetune_text(model, ids, block_size=...)`` is LoRA on one long text (``minilora finetune --base
HF_DIR --text FILE``); both train through ``fit_with_warmup``, the optimizer and schedule of every fine-tune.
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
from .data import (
    TASKS,
    Rng,
    Tokenizer,
    collate,
    encode_example,
    lm_collate,
    load_task,
    pretrain_corpus,
    prompt_ids,
    task_metric,
    text_metrics,
)
from .generate import generate
from .methods import HYPERPARAMS, apply_method, hyperparams, lora_alpha
from .models import GPT, GPTConfig, load_base, save_model
from .models.pretrained import BASE_CONFIG, BASE_WEIGHTS
from .tensor import no_grad
from .train import History, epoch_batches, fit, length_grouped_batches

__all__ = [
    "FAST",
    "HYPERPARAMS",
    "RunResult",
    "TEXT_HYPERPARAMS",
    "TextRun",
    "evaluate",
    "finetune",
    "finetune_text",
    "fit_with_warmup",
    "lm_loss",
    "peak_step_memory",
    "pretrain",
    "target_loss",
    "task_batches",
    "text_batches",
    "training_examples",
    "window_loss",
    "zero_shot",
]

# MINILORA_FAST=1: a smoke run (tutorials under test): 40 steps, 40 test examples; the numbers mean nothing
FAST = os.environ.get("MINILORA_FAST", "") not in ("", "0")


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
    eval_loss: float = float("nan")  # mean NLL of the evaluated targets y given x (eq. 2 on held-out data)
    skipped_train: int = 0  # training examples longer than the model's usable length (PreEmbed only)
    config: dict = field(default_factory=dict)  # the settings the run used
    text_scores: dict = field(default_factory=dict)  # e2e: {"bleu", "rouge_l"} against every reference

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
            "eval_loss": self.eval_loss,
        }


def batch_rows(examples, tokenizer: Tokenizer, batch_size: int, seed: int, length_group: int = 1):
    """``rows(step)``: the example indices of each step (``length_group`` > 1: similar lengths together)."""
    if length_group <= 1:
        return epoch_batches(len(examples), batch_size, seed)
    lengths = [len(encode_example(tokenizer, ex)[0]) for ex in examples]
    return length_grouped_batches(lengths, batch_size, seed, group=length_group)


def task_batches(examples, tokenizer: Tokenizer, batch_size: int, seed: int, block_size: int, length_group: int = 1):
    """``get_batch(step)`` for ``fit``: shuffled epochs of collated task batches.

    ``length_group`` > 1 puts examples of similar length in a batch (``train.length_grouped_batches``):
    a batch is padded to its longest row, so this trains on fewer padding tokens per step.
    """
    rows = batch_rows(examples, tokenizer, batch_size, seed, length_group)

    def get_batch(step):
        b = collate([examples[i] for i in rows(step)], tokenizer, block_size=block_size)
        return b.idx, b.targets, b.mask

    return get_batch


def evaluate(model, task: str, examples, tokenizer: Tokenizer | None = None, adapter_ids=None,
             method: str = "greedy", max_new_tokens: int | None = None,
             **generate_kwargs) -> tuple[str, float, list[str]]:
    """Decode every prompt and score it: (metric_name, value, predictions).

    The decoding budget is what the SHORTEST prompt leaves of ``model.config.block_size``:
    ``generate`` stops each row at block_size itself, so every prompt gets room up to the end of
    the context and no long target is cut off. ``max_new_tokens`` caps it (smoke runs only).
    """
    tokenizer = tokenizer or Tokenizer.default()
    prompts = [prompt_ids(tokenizer, ex.prompt) for ex in examples]
    block_size = model.config.block_size
    longest = max(len(p) for p in prompts)
    if longest >= block_size:
        raise ValueError(
            f"{task}: the longest prompt has {longest} tokens and the model reads at most {block_size} "
            "(model.config.block_size): no room is left to generate an answer"
        )
    room = block_size - min(len(p) for p in prompts)
    if max_new_tokens is not None:
        room = max(1, min(room, int(max_new_tokens)))
    outputs = generate(model, prompts, max_new_tokens=room, eos_id=tokenizer.eos_id, method=method,
                       adapter_ids=adapter_ids, **generate_kwargs)
    preds = [tokenizer.decode(out, skip_special=True) for out in outputs]
    name, value = task_metric(task, preds, examples)
    return name, value, preds


def _mean_nll(model, batches) -> float:
    """Token-weighted mean of ``model.loss`` over (idx, targets, mask) batches, in eval mode, no graph.

    The model's train/eval mode is restored afterwards.
    """
    total, count = 0.0, 0.0
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            for b in batches:
                n = float(np.asarray(b.mask).sum())
                total += float(model.loss(b.idx, b.targets, b.mask).item()) * n
                count += n
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


def target_loss(model, examples, tokenizer: Tokenizer | None = None, batch_size: int = 64) -> float:
    """Mean NLL of the target tokens y (and <eos>) given x — the eq. 2 loss on held-out examples.

    A smooth companion to the task metric: it still ranks methods when exact-match metrics are
    all near 0. Examples longer than the model's usable length are left out (PreEmbed).
    """
    tokenizer = tokenizer or Tokenizer.default()
    block_size = model.config.block_size
    fits = [ex for ex in examples if len(encode_example(tokenizer, ex)[0]) <= block_size]
    return _mean_nll(model, (collate(fits[i:i + batch_size], tokenizer, block_size=block_size)
                             for i in range(0, len(fits), batch_size)))


def lm_loss(model, texts, tokenizer: Tokenizer | None = None, batch_size: int = 64) -> float:
    """Mean token NLL of ``texts`` under the model (every real token counts)."""
    tokenizer = tokenizer or Tokenizer.default()
    block_size = model.config.block_size
    return _mean_nll(model, (lm_collate(texts[i:i + batch_size], tokenizer, block_size=block_size)
                             for i in range(0, len(texts), batch_size)))


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


def fit_with_warmup(model, get_batch, steps: int, *, lr: float, weight_decay: float, warmup: int | None = None,
                    params=None, progress: bool = True, desc: str = "finetune", measure_memory: bool = False,
                    **fit_options) -> tuple[optim.AdamW, History, int]:
    """Train ``model``'s trainable parameters for ``steps``: the optimizer and schedule of every fine-tune.

    AdamW (``lr``, ``weight_decay``) on ``params`` (default: the trainable ones), the learning rate ramped up
    linearly over the first ``warmup`` steps (default: 10 % of them) and down to 0 at the last
    (``optim.warmup_linear``), then ``fit`` on ``get_batch`` with ``fit_options`` (``loss_fn``,
    ``clip_groups``, ``grad_clip``: joint training's). ``measure_memory``: the peak bytes of one
    extra, undone step first (``peak_step_memory``; 0 without it). Returns (optimizer, history,
    peak bytes).
    """
    if measure_memory and "loss_fn" in fit_options:
        raise ValueError("fit_with_warmup: measure_memory measures one step of model.loss; it takes no loss_fn")
    warmup = max(1, steps // 10) if warmup is None else warmup
    params = model.parameters(trainable_only=True) if params is None else list(params)
    optimizer = optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = optim.LRScheduler(optimizer, functools.partial(optim.warmup_linear, total=steps, warmup=warmup))
    peak = peak_step_memory(model, optimizer, get_batch) if measure_memory else 0
    history = fit(model, optimizer, get_batch, steps, scheduler=scheduler, progress=progress, desc=desc, **fit_options)
    return optimizer, history, peak


def finetune(task: str, method: str = "lora", *, base: GPT | None = None, steps: int | None = None,
             batch_size: int = 16, lr: float | None = None, weight_decay: float | None = None, seed: int = 0,
             n_train: int | None = None, n_eval: int | None = None, eval_split: str = "test",
             max_new_tokens: int | None = None, progress: bool = True, measure_memory: bool = True,
             tokenizer: Tokenizer | None = None, on_start=None, subset_seed: int | None = None, **hp) -> RunResult:
    """Adapt (a copy of) the base model to ``task`` with ``method``, then evaluate it.

    Every setting defaults to ``methods.hyperparams(method, task)`` (``HYPERPARAMS[method]`` and the
    task's departures in ``TASK_HYPERPARAMS``); ``lr``, ``weight_decay``, ``steps`` and the
    method's own ``hp`` (e.g. ``r=8, targets=("q", "k", "v", "o")``; None means "the default")
    override it. LoRA's ``adapter_name`` defaults to the task, its alpha to 2r. The steps: copy the
    base, seed, ``apply_method``, AdamW on the trainable parameters with a linear warm-up over
    the first 10 % of the steps, ``fit`` on shuffled batches of the task's training examples
    (those longer than the model's usable length are skipped: only PreEmbed has any), then
    ``evaluate`` and ``target_loss`` on ``n_eval`` examples of ``eval_split`` (None: all of it).
    ``measure_memory``: the peak bytes of one extra, undone step (tracemalloc). ``on_start(model)``
    is called once the method is installed, before the first step (e.g. to keep LoRA's initial A).
    ``n_train`` takes the first ``n_train`` training examples; with ``subset_seed`` it draws
    ``n_train`` of the whole split with that seed instead (a low-data study: each seed its own subset).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; the tasks are {list(TASKS)}")
    tokenizer = tokenizer or Tokenizer.default()
    given = {"lr": lr, "weight_decay": weight_decay, "steps": steps, **hp}
    settings = {**hyperparams(method, task), **{k: v for k, v in given.items() if v is not None}}
    if FAST and steps is None:
        settings["steps"] = 40
    if method == "lora":
        settings.setdefault("adapter_name", task)
    lr, weight_decay, steps = (settings.pop(k) for k in ("lr", "weight_decay", "steps"))
    length_group = settings.pop("length_group", 1)  # batches of similar lengths (1: plain shuffled batches)
    model = copy.deepcopy(base) if base is not None else load_base()
    bk.manual_seed(seed)
    model = apply_method(model, method, **settings)
    if on_start is not None:
        on_start(model)
    train_all = training_examples(task, n_train, subset_seed)
    block_size = model.config.block_size
    train = [ex for ex in train_all if len(encode_example(tokenizer, ex)[0]) <= block_size]
    if not train:
        raise ValueError(f"{method}: no training example of {task} fits in {block_size} tokens")
    get_batch = task_batches(train, tokenizer, batch_size, seed, block_size, length_group=length_group)
    optimizer, history, peak = fit_with_warmup(model, get_batch, steps, lr=lr, weight_decay=weight_decay,
                                               progress=progress, desc=f"{task}/{method}", measure_memory=measure_memory)
    scores = _score(model, task, eval_split, n_eval, tokenizer, max_new_tokens)
    return RunResult(
        task=task, method=method, model=model, history=history, **scores,
        trainable_params=model.num_parameters(trainable_only=True), total_params=model.num_parameters(),
        optimizer_state_bytes=optimizer.state_bytes(), train_seconds=history.seconds, peak_memory_bytes=peak,
        skipped_train=len(train_all) - len(train),
        config={"method": method, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()},
                "steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
                "length_group": length_group},
    )


def _score(model, task: str, eval_split: str, n_eval, tokenizer: Tokenizer, max_new_tokens) -> dict:
    """A run's scores on ``n_eval`` examples of ``eval_split`` (None: all of it; 40 under MINILORA_FAST),
    in eval mode: the metric of greedy decoding, the target NLL, and for e2e BLEU and ROUGE-L."""
    evaluation = load_task(task, eval_split, n_eval if n_eval is not None else (40 if FAST else None))
    model.eval()
    metric_name, metric, preds = evaluate(model, task, evaluation, tokenizer, max_new_tokens=max_new_tokens)
    return {"metric_name": metric_name, "metric": metric, "eval_loss": target_loss(model, evaluation, tokenizer),
            "text_scores": text_metrics(preds, evaluation) if task == "e2e" else {}}


def training_examples(task: str, n_train: int | None = None, subset_seed: int | None = None) -> list:
    """The first ``n_train`` training examples of ``task`` (None: all), or, with ``subset_seed``,
    ``n_train`` of them drawn from the whole split by that seed (in the split's order)."""
    if subset_seed is None or n_train is None:
        return load_task(task, "train", n_train)
    everything = load_task(task, "train")
    if not 0 <= n_train <= len(everything):
        raise ValueError(f"n_train={n_train}: the {task} train split has {len(everything)} examples")
    chosen = sorted(Rng(1_000_003 * (subset_seed + 1)).shuffled(range(len(everything)))[:n_train])
    return [everything[i] for i in chosen]


def zero_shot(task: str, *, base: GPT | None = None, n_eval: int | None = None, eval_split: str = "test",
              max_new_tokens: int | None = None, tokenizer: Tokenizer | None = None) -> RunResult:
    """The base model with no fine-tuning, scored like ``finetune``'s runs (the "before" row).

    It reads the prompt and "=>" and continues as its pretraining taught it; nothing trains.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; the tasks are {list(TASKS)}")
    tokenizer = tokenizer or Tokenizer.default()
    model = copy.deepcopy(base) if base is not None else load_base()
    return RunResult(
        task=task, method="base", model=model, history=History(),
        **_score(model, task, eval_split, n_eval, tokenizer, max_new_tokens),
        trainable_params=0, total_params=model.num_parameters(), optimizer_state_bytes=0, train_seconds=0.0,
        config={"method": "base"},
    )


# ----------------------------------------------------------------------------- a text file
# ``minilora finetune --base HF_DIR --text FILE``: the settings a text fine-tune takes unless told otherwise
TEXT_HYPERPARAMS = {"lr": 1e-3, "weight_decay": 0.01, "steps": 100}


@dataclass
class TextRun:
    model: GPT
    history: History
    loss_before: float  # held-out LM loss before the first step (the base model's: every B starts at 0)
    loss_after: float  # held-out LM loss after the last step
    config: dict = field(default_factory=dict)  # the settings the run used


def text_batches(ids, block_size: int, batch_size: int, seed: int):
    """``get_batch(step)`` for ``fit``: ``batch_size`` windows of ``block_size + 1`` tokens of the stream ``ids``,
    drawn at random by (seed, step); the targets are the next tokens, every position scored (mask None)."""

    def get_batch(step):
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(ids) - block_size, batch_size)
        window = np.stack([ids[s:s + block_size + 1] for s in starts])
        return window[:, :-1], window[:, 1:], None

    return get_batch


def window_loss(model, ids, block_size: int, n_windows: int = 8) -> float:
    """Mean LM loss of the first ``n_windows`` consecutive windows of ``block_size`` tokens of ``ids``
    (each window's mean NLL of its next tokens), in eval mode, no graph; the mode is restored afterwards."""
    starts = range(0, len(ids) - block_size, block_size)[:n_windows]
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            losses = [float(model.loss(ids[None, s:s + block_size], ids[None, s + 1:s + block_size + 1]).item())
                      for s in starts]
    finally:
        model.train(was_training)
    return float(np.mean(losses))


def finetune_text(model: GPT, ids, *, block_size: int, adapter_name: str = "text", r: int = HYPERPARAMS["lora"]["r"],
                  alpha: float | None = None, targets=HYPERPARAMS["lora"]["targets"], steps: int | None = None,
                  batch_size: int = 16, lr: float | None = None, weight_decay: float | None = None, seed: int = 0,
                  progress: bool = True, on_start=None) -> TextRun:
    """LoRA on one long text (the token ids ``ids``), in ``model`` itself: the causal LM loss on every token (eq. 2).

    The last tenth of ``ids`` (at least one window) is held out, the rest gives random windows of
    ``block_size`` tokens (``text_batches``). The steps are ``finetune``'s: seed, ``apply_method``
    with LoRA (alpha 2r unless given), ``on_start(model)``, then ``fit_with_warmup``; the held-out
    ``window_loss`` is taken before and after. ``lr``, ``weight_decay`` and ``steps`` left None
    come from ``TEXT_HYPERPARAMS``.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if not 1 <= block_size <= model.config.block_size or len(ids) < 2 * (block_size + 1):
        raise ValueError(f"finetune_text: windows of {block_size} tokens need 1 <= block_size <= the model's "
                         f"{model.config.block_size} and at least {2 * (block_size + 1)} tokens; got {len(ids)}")
    given = {"lr": lr, "weight_decay": weight_decay, "steps": steps}
    settings = {**TEXT_HYPERPARAMS, **{k: v for k, v in given.items() if v is not None}}
    n_val = max(block_size + 1, len(ids) // 10)
    train_ids, val_ids = ids[:-n_val], ids[-n_val:]
    bk.manual_seed(seed)
    model = apply_method(model, "lora", r=r, alpha=alpha, targets=tuple(targets), adapter_name=adapter_name)
    if on_start is not None:
        on_start(model)
    before = window_loss(model, val_ids, block_size)
    _, history, _ = fit_with_warmup(model, text_batches(train_ids, block_size, batch_size, seed), settings["steps"],
                                    lr=settings["lr"], weight_decay=settings["weight_decay"], progress=progress)
    config = {"method": "lora", "r": r, "alpha": lora_alpha(r, alpha), "targets": list(targets), "adapter_name": adapter_name,
              "block_size": block_size, "batch_size": batch_size, "seed": seed, **settings}
    return TextRun(model, history, before, window_loss(model, val_ids, block_size), config)


# The shipped base's pretraining (``minilora pretrain`` with no options reproduces it), in two
# phases of AdamW steps on 32 corpus lines each, every line seen once (lines seen several times
# overfit the tiny model):
#   1. ``steps`` on ``n_texts`` lines at ``lr``: a 75-step warm-up, then a cosine decay. In this
#      short, fast phase the model learns to copy the word after "the" (see ``pretrain``);
#   2. ``second_steps`` on ``second_n_texts`` fresh lines, warm-up and cosine again at the lower
#      ``second_lr``: the slow skills (answering questions about a description).
PRETRAIN_SETTINGS = {"steps": 1500, "batch_size": 32, "lr": 3e-3, "n_texts": 48000, "embedding_std": 0.1,
                     "warmup_steps": 75, "second_steps": 12000, "second_lr": 2e-3, "second_n_texts": 384000}


def two_phase_schedule(step: int, first: int, total: int, warmup: int, second_ratio: float) -> float:
    """LR multiplier of ``pretrain``: ``warmup_cosine`` over the first ``first`` steps, then a second
    ``warmup_cosine`` over the remaining ``total - first``, scaled by ``second_ratio``. A warm-up
    never takes more than half of its phase."""
    warmup = max(1, min(warmup, first // 2))
    if step < first:
        return optim.warmup_cosine(step, total=first, warmup=warmup, min_ratio=0.05)
    rest = max(1, total - first)
    return second_ratio * optim.warmup_cosine(step - first, total=rest, warmup=max(1, min(warmup, rest // 2)), min_ratio=0.05)


def pretrain(steps: int = PRETRAIN_SETTINGS["steps"], batch_size: int = PRETRAIN_SETTINGS["batch_size"],
             lr: float = PRETRAIN_SETTINGS["lr"], seed: int = 0, n_texts: int = PRETRAIN_SETTINGS["n_texts"],
             embedding_std: float = PRETRAIN_SETTINGS["embedding_std"],
             warmup_steps: int = PRETRAIN_SETTINGS["warmup_steps"],
             second_steps: int = PRETRAIN_SETTINGS["second_steps"], second_lr: float = PRETRAIN_SETTINGS["second_lr"],
             second_n_texts: int = PRETRAIN_SETTINGS["second_n_texts"], config: GPTConfig | None = None,
             out_weights=BASE_WEIGHTS, out_config=BASE_CONFIG, progress: bool = True) -> tuple[GPT, History, float]:
    """Train the base GPT on the pretraining corpus (``data.pretrain_corpus``) and write it (the shipped asset).

    Two phases (``PRETRAIN_SETTINGS``, the defaults): ``steps`` on ``n_texts`` lines (seed), then
    ``second_steps`` (0: none) on ``second_n_texts`` other lines (seed + 2) at ``second_lr``.
    Returns (model, history, held-out LM loss on 512 lines of the corpus drawn with seed + 1).
    Deterministic for a seed (up to BLAS rounding).
    """
    tokenizer = Tokenizer.default()
    bk.manual_seed(seed)
    cfg = config or GPTConfig(vocab_size=96, block_size=64, n_layer=4, n_head=4, d_model=128, dropout=0.0)
    model = GPT(cfg)
    # The token vectors start 5x wider apart than GPT-2's 0.02 (~1/sqrt(d_model) at d = 128).
    # Words the corpus uses interchangeably ("eagle", "mill": both follow "the" in the same places)
    # get near-identical gradients, so from 0.02 their vectors converge before the model learns to
    # copy them, and it then writes either at random. Starting from 0.1, with those names upsampled
    # (data.pretrain_corpus), the short first phase learns the copy; a long single phase loses it.
    wte = model.wte.weight
    wte.data[...] = bk.random_normal(wte.shape, wte.dtype, std=embedding_std)
    phases = [(pretrain_corpus(n_texts, seed=seed), steps)]
    if second_steps:
        phases.append((pretrain_corpus(second_n_texts, seed=seed + 2), second_steps))
    held_out = pretrain_corpus(512, seed=seed + 1)
    row_streams = [epoch_batches(len(texts), batch_size, seed) for texts, _ in phases]

    def get_batch(step):
        phase = 0 if step < steps else 1
        texts, rows = phases[phase][0], row_streams[phase]
        b = lm_collate([texts[i] for i in rows(step - phase * steps)], tokenizer, block_size=cfg.block_size)
        return b.idx, b.targets, b.mask

    total = steps + second_steps
    optimizer = optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = optim.LRScheduler(optimizer, functools.partial(
        two_phase_schedule, first=steps, total=total, warmup=warmup_steps, second_ratio=second_lr / lr))
    started = time.perf_counter()
    history = fit(model, optimizer, get_batch, total, scheduler=scheduler, progress=progress, desc="pretrain")
    held_out_loss = lm_loss(model, held_out, tokenizer)
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "n_texts": n_texts,
            "embedding_std": embedding_std, "warmup_steps": warmup_steps, "second_steps": second_steps,
            "second_lr": second_lr, "second_n_texts": second_n_texts,
            "held_out_loss": held_out_loss, "train_seconds": time.perf_counter() - started,
            "command": "minilora pretrain"}
    if out_weights:
        save_model(model, out_weights, out_config, info)
    return model, history, held_out_loss
