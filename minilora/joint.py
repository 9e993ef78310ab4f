"""Train several LoRA adapters at once, in ONE mixed batch: each row through its own task's adapter.

    result = finetune_joint(("e2e", "parse", "classify"), base=load_base(), steps=400)
    result.model                 # the base model with three adapters, named after the tasks
    result.runs["parse"].metric  # each task's test metric, as finetune() reports it

A serving system already runs mixed batches (``lora.mixed``); the same Function has a
hand-written backward, so one step can also TRAIN every adapter in the batch. Each step
takes ``batch_size`` rows of every task (the rows a separate run of that task would take at
that step) and runs them through the frozen W₀ with row i routed through adapter ``task(i)``.

Rows of different tasks have different lengths (classify's ≈ 36 tokens, e2e's and parse's ≈ 47),
and one batch is one width: padding them all to the widest (``joint_batches``) computes on
padding. ``joint_groups`` keeps each task's rows at their own width and stacks tasks into one
batch only where that adds little padding (``max_padding``); a step is then one forward/backward
per width group, each group's graph freed before the next, and one optimizer step for all.

The loss. Let L_t be the mean token NLL over the y tokens of task t's rows (what a separate
run of task t minimises, eq. 2). The joint loss is their SUM, L = Σ_t L_t: every row is
weighted by 1 / (number of y tokens of its task in this batch). Because A_t, B_t only touch
the rows of task t and W₀ is frozen, ∂L/∂(A_t, B_t) = ∂L_t/∂(A_t, B_t): each adapter gets
exactly the gradient of its own rows' loss, whatever the other tasks' row counts or lengths.
Gradient clipping is per adapter (the norm of one adapter's gradient, as a separate run
clips it), AdamW is per parameter, and every adapter starts from the same seeded draw as a
separate run. So a joint run equals the separate runs, step by step, when the batches hold
the same rows; ``tests/test_joint.py`` checks both statements.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np

from . import backend as bk
from . import functional as F
from . import lora
from .data import DEMO_TASKS, TASKS, Tokenizer, collate, load_task, prompt_ids, task_metric
from .generate import generate
from .methods import HYPERPARAMS, lora_alpha
from .models import GPT, load_base
from .recipes import FAST, RunResult, batch_rows, fit_with_warmup, target_loss
from .tensor import no_grad
from .train import History, model_loss

__all__ = ["JointResult", "joint_loss", "mixed_loss", "routed_loss", "joint_batches", "joint_groups", "joint_model", "train_joint", "finetune_joint",
           "decode"]


# finetune_joint's width groups: merge tasks only where that pads at most this fraction of the group
JOINT_MAX_PADDING = 0.0


def _logits(model, idx, adapter_ids):
    with lora.mixed_batch(model, adapter_ids):  # row i through adapter adapter_ids[i]; the model knows nothing of it
        return model(idx)


def joint_loss(model, idx, targets, mask, adapter_ids):
    """L = Σ_t L_t, L_t = the mean NLL over the counted tokens of the rows routed to adapter t.

    Row i's counted tokens get weight 1 / n_t(i), n_t = the counted tokens of its task; the
    weighted mean that ``F.cross_entropy`` computes divides by Σ weights = the number of
    tasks K, so the sum is K times it.
    """
    mask = np.asarray(bk.to_numpy(mask), dtype=np.float64)
    ids = np.asarray(adapter_ids)
    weights = np.zeros_like(mask)
    tasks = list(dict.fromkeys(adapter_ids))
    for task in tasks:
        rows = ids == task
        n = mask[rows].sum()
        if n <= 0:
            raise ValueError(f"joint_loss: the rows of {task!r} count no token (their mask is all 0)")
        weights[rows] = mask[rows] / n
    logits = _logits(model, idx, list(adapter_ids))
    weights = bk.asarray(weights, dtype=logits.dtype, backend=bk.backend_of(logits.data))
    return F.cross_entropy(logits, targets, mask=weights) * float(len(tasks))


def joint_batches(examples: dict, tokenizer: Tokenizer, batch_size: int, seed: int, block_size: int,
                  length_group: int = 1):
    """``get_batch(step) -> (idx, targets, mask, adapter_ids)``: each task's rows of that step, stacked.

    Task t contributes the rows a separate run would train on at ``step`` (the same
    ``recipes.batch_rows``), right-padded to the widest task's width; padding sits after every
    real token, so causal attention never sees it.
    """
    rows = {task: batch_rows(ex, tokenizer, batch_size, seed, length_group) for task, ex in examples.items()}

    def get_batch(step):
        return _stack([(task, collate([ex[i] for i in rows[task](step)], tokenizer, block_size=block_size))
                       for task, ex in examples.items()], tokenizer.pad_id)

    return get_batch


def joint_groups(examples: dict, tokenizer: Tokenizer, batch_size: int, seed: int, block_size: int,
                 length_group: int = 1, max_padding: float = 0.0):
    """``get_batch(step) -> [(idx, targets, mask, adapter_ids), ...]``: the step's rows in width groups.

    Task t contributes the rows a separate run would train on at ``step``, collated at their own
    width (the widest of them, as the separate run pads them). Tasks are taken widest first; a task
    joins the current group when padding it (and the group) to one width leaves at most
    ``max_padding`` of the group's token slots as padding added by the merge, else it starts a new
    group. ``max_padding=0`` merges only tasks of equal width; ``max_padding=1`` stacks every task in
    one batch, padded to the widest (the rows of ``joint_batches``, in width order).
    """
    if not 0.0 <= max_padding <= 1.0:
        raise ValueError(f"joint_groups: max_padding is a fraction of a group's token slots in [0, 1], got {max_padding}")
    rows = {task: batch_rows(ex, tokenizer, batch_size, seed, length_group) for task, ex in examples.items()}

    def get_batch(step):
        parts = [(task, collate([ex[i] for i in rows[task](step)], tokenizer, block_size=block_size))
                 for task, ex in examples.items()]
        parts.sort(key=lambda tb: -tb[1].idx.shape[1])  # widest first (a stable sort: ties keep task order)
        groups, current = [], []
        for task, b in parts:
            if current:
                width = current[0][1].idx.shape[1]  # the group's width: its first (widest) member's
                n_rows = sum(m.idx.shape[0] for _, m in current) + b.idx.shape[0]
                own = sum(m.idx.size for _, m in current) + b.idx.size
                if (width * n_rows - own) / (width * n_rows) > max_padding:
                    groups.append(current)
                    current = []
            current.append((task, b))
        groups.append(current)
        return [_stack(group, tokenizer.pad_id) for group in groups]

    return get_batch


def _stack(members, pad_id: int):
    """[(task, Batch)] -> (idx, targets, mask, adapter_ids), right-padded to the widest member."""
    width = max(b.idx.shape[1] for _, b in members)
    idx, targets, mask, ids = [], [], [], []
    for task, b in members:
        pad = width - b.idx.shape[1]
        idx.append(np.pad(b.idx, ((0, 0), (0, pad)), constant_values=pad_id))
        targets.append(np.pad(b.targets, ((0, 0), (0, pad)), constant_values=pad_id))
        mask.append(np.pad(b.mask, ((0, 0), (0, pad))))
        ids += [task] * b.idx.shape[0]
    return np.concatenate(idx), np.concatenate(targets), np.concatenate(mask), ids


@dataclass
class JointResult:
    model: GPT  # the base model with one adapter per task (named after the task)
    history: History
    runs: dict  # task -> RunResult (its metric, its adapter's parameter counts; model = the shared one)
    train_seconds: float
    eval_seconds: float


def _adapter_params(model, task):
    return [p for name, p in model.named_parameters() if name.endswith(f".lora_A.{task}") or name.endswith(f".lora_B.{task}")]


def joint_model(base: GPT, tasks, r: int | None = None, alpha: float | None = None, targets=None, seed: int = 0) -> GPT:
    """A copy of ``base`` with one trainable LoRA adapter per task (named after it), W₀ frozen.

    r, targets and alpha default to LoRA's (``HYPERPARAMS["lora"]``, ``lora_alpha``). Every
    adapter starts from the same seeded draw that a separate run of its task makes.
    """
    model = copy.deepcopy(base)
    r = HYPERPARAMS["lora"]["r"] if r is None else r
    targets = HYPERPARAMS["lora"]["targets"] if targets is None else targets
    config = lora.LoRAConfig(r=r, alpha=lora_alpha(r, alpha), target_modules=tuple(targets))
    for task in tasks:
        bk.manual_seed(seed)
        lora.apply_lora(model, config, adapter_name=task)
    lora.mark_only_lora_as_trainable(model)
    return model


def train_joint(model, tasks, get_batch, steps: int, lr: float, weight_decay: float = 0.0, warmup: int | None = None,
                grad_clip: float | None = 1.0, progress: bool = True, desc: str = "joint") -> History:
    """Joint training: one AdamW step per mixed batch on the tasks' adapters, each clipped on its own.

    ``get_batch(step)`` gives one mixed batch ``(idx, targets, mask, adapter_ids)`` (``joint_batches``)
    or a list of them (``joint_groups``): each is a forward and a backward, the gradients add up
    (every task sits in one group, so each adapter's gradient comes from its own group alone), and
    the step's loss is the sum of the groups' losses. The loss, ``joint_loss``, routes each row
    through its adapter. The optimizer and schedule are every fine-tune's (``recipes.fit_with_warmup``),
    on the adapters of ``tasks`` alone; ``fit`` brings the NaN guard, the progress bar and the history.
    """
    groups = {task: _adapter_params(model, task) for task in tasks}
    _, history, _ = fit_with_warmup(model, get_batch, steps, lr=lr, weight_decay=weight_decay, warmup=warmup,
                                    params=[p for ps in groups.values() for p in ps], progress=progress, desc=desc,
                                    loss_fn=mixed_loss, grad_clip=grad_clip, clip_groups=groups.values())
    return history


def routed_loss(adapter_ids):
    """A ``fit`` loss: ``model.loss`` of the batch with row i through adapter ``adapter_ids[i]`` (``lora.mixed_batch``)."""
    def loss(model, batch):
        with lora.mixed_batch(model, adapter_ids):
            return model_loss(model, batch)

    return loss


def mixed_loss(model, batch):
    """``fit``'s loss for a mixed batch ``(idx, targets, mask, adapter_ids)``: ``joint_loss`` of it."""
    return joint_loss(model, *batch)


def finetune_joint(tasks=DEMO_TASKS, *, base: GPT | None = None, steps: int | None = None, batch_size: int = 16,
                   lr: float | None = None, weight_decay: float | None = None, r: int | None = None,
                   alpha: float | None = None, targets=None, seed: int = 0, n_train: int | None = None,
                   n_eval: int | None = None, eval_split: str = "test", progress: bool = True,
                   tokenizer: Tokenizer | None = None, max_padding: float = JOINT_MAX_PADDING) -> JointResult:
    """LoRA on every task of ``tasks`` at once: ``batch_size`` rows per task in each mixed batch.

    Settings default to ``HYPERPARAMS["lora"]``, the method's common row: one step count and one
    learning rate for every adapter. ``finetune(task, "lora")`` also applies the task's departures
    (``methods.TASK_HYPERPARAMS``: classify's longer, gentler run), which one shared optimizer
    step cannot; with the same settings and rows a joint run equals the separate runs. Returns the shared model (one
    adapter per task) and, per task, a RunResult whose metric comes from decoding that task's
    ``eval_split`` prompts through its own adapter, all tasks in ONE mixed generation batch.
    The training batches are ``joint_groups(..., max_padding)``.
    """
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"finetune_joint: tasks must be distinct names from {list(TASKS)}, got {list(tasks)}")
    hp = HYPERPARAMS["lora"]
    steps = (40 if FAST else hp["steps"]) if steps is None else steps
    n_eval = 40 if FAST and n_eval is None else n_eval  # MINILORA_FAST=1: a smoke run, as finetune()
    lr = hp["lr"] if lr is None else lr
    weight_decay = hp["weight_decay"] if weight_decay is None else weight_decay
    r = hp["r"] if r is None else r
    targets = tuple(hp["targets"] if targets is None else targets)
    tokenizer = tokenizer or Tokenizer.default()
    model = joint_model(base if base is not None else load_base(), tasks, r, alpha, targets, seed)
    train = {task: load_task(task, "train", n_train) for task in tasks}
    length_group = hp.get("length_group", 1)
    get_batch = joint_groups(train, tokenizer, batch_size, seed, model.config.block_size, length_group, max_padding)
    history = train_joint(model, tasks, get_batch, steps, lr, weight_decay, progress=progress,
                          desc="+".join(tasks) + "/lora-joint")
    started = time.perf_counter()
    model.eval()
    evaluation = {task: load_task(task, eval_split, n_eval) for task in tasks}
    examples = [ex for task in tasks for ex in evaluation[task]]
    preds = decode(model, examples, tokenizer, [task for task in tasks for _ in evaluation[task]])
    runs, start = {}, 0
    for task in tasks:
        n = len(evaluation[task])
        metric_name, metric = task_metric(task, preds[start:start + n], evaluation[task])
        start += n
        lora.set_adapter(model, task)  # target_loss runs plain batches: through this task's adapter
        eval_loss = target_loss(model, evaluation[task], tokenizer)
        trainable = sum(p.size for p in _adapter_params(model, task))
        runs[task] = RunResult(
            task=task, method="lora", model=model, history=history, metric_name=metric_name, metric=metric,
            trainable_params=trainable, total_params=base_params(model) + trainable,
            optimizer_state_bytes=2 * trainable * np.dtype(model.wte.weight.dtype).itemsize,
            train_seconds=history.seconds / len(tasks), eval_loss=eval_loss,
            config={"method": "lora", "r": r, "targets": list(targets), "steps": steps, "batch_size": batch_size,
                    "lr": lr, "weight_decay": weight_decay, "seed": seed, "length_group": length_group,
                    "joint": list(tasks)},
        )
    return JointResult(model=model, history=history, runs=runs, train_seconds=history.seconds,
                       eval_seconds=time.perf_counter() - started)


def decode(model, examples, tokenizer: Tokenizer, adapter_ids=None) -> list[str]:
    """Greedy answers to every example's prompt, row i through adapter ``adapter_ids[i]``: ONE mixed batch."""
    prompts = [prompt_ids(tokenizer, ex.prompt) for ex in examples]
    room = model.config.block_size - min(len(p) for p in prompts)  # generate() stops each row at block_size
    with no_grad():
        outputs = generate(model, prompts, max_new_tokens=room, eos_id=tokenizer.eos_id, adapter_ids=adapter_ids)
    return [tokenizer.decode(out, skip_special=True) for out in outputs]


def base_params(model) -> int:
    """Parameters of the model that are not LoRA matrices (W₀, biases, embeddings, norms)."""
    return sum(p.size for name, p in model.named_parameters() if ".lora_" not in name)
