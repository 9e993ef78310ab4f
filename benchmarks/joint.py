"""Joint multi-adapter training against separate runs on the same rows: ``minilora bench --joint``.

    python -m benchmarks.bench --joint                        # the shipped base, 30 steps, best of 2
    python -m benchmarks.bench --joint --joint-base gpt2 --joint-steps 4   # GPT-2-124M shape, random weights

Three ways to train the LoRA adapters of the demo's tasks (e2e, parse, classify), ``batch_size``
rows per task per step, the same rows at every step (``recipes.batch_rows``), the method's
settings (``methods.HYPERPARAMS["lora"]``), one BLAS thread:

    separate       one ``train.fit`` run per task (what ``finetune(task, "lora")`` runs)
    joint          ``minilora.joint.train_joint`` on ``joint_groups``: every task's rows at their own
                   width, tasks stacked where that adds at most ``max_padding`` of padding
    joint-padded   ``train_joint`` on ``joint_batches``: every step one batch, padded to the widest task

Measured: CPU time of the training loops (``time.process_time``, building and evaluation
excluded), best of ``rounds`` rounds run in a rotated order; the token slots each computes on
(rows × width, padding included) and the tokens that count in the loss. The adapters each way
trains are compared with the separate runs' (``max_adapter_diff``): the ways compute the same
adapters, so the times compare the same work.
"""

from __future__ import annotations

import time

import numpy as np

from minilora import optim
from minilora.data import DEMO_TASKS, Tokenizer, load_task
from minilora.joint import JOINT_MAX_PADDING, joint_batches, joint_groups, joint_model, train_joint
from minilora.methods import HYPERPARAMS
from minilora.models import load_base
from minilora.recipes import task_batches
from minilora.train import fit

from .config import BenchError
from .machine import blas_threads, machine_info, set_blas_threads

__all__ = ["JOINT_BASES", "JOINT_MODES", "bench_joint", "format_joint_table"]

JOINT_BASES = ("tiny", "gpt2")
JOINT_MODES = ("separate", "joint", "joint-padded")


def _base(name: str, seed: int):
    if name == "tiny":
        return load_base()  # the shipped 4-layer, d 128 base
    if name == "gpt2":
        from .gpt2 import GPT2_124M, random_gpt

        return random_gpt(GPT2_124M, seed)
    raise BenchError(f"unknown joint base {name!r}; choose from {', '.join(JOINT_BASES)}")


def _slots(get_batch, steps: int) -> tuple[int, int]:
    """(token slots, counted tokens) over ``steps`` steps of a get_batch (one batch or a list of them)."""
    slots = counted = 0
    for step in range(steps):
        batches = get_batch(step)
        for b in [batches] if isinstance(batches, tuple) else batches:
            slots += b[0].size
            counted += int(np.asarray(b[2]).sum())
    return slots, counted


def _adapters(model, task) -> dict:
    return {n.rsplit(".", 1)[0]: np.array(p.data) for n, p in model.named_parameters()
            if ".lora_" in n and n.endswith("." + task)}


def bench_joint(base_name: str = "tiny", steps: int = 30, rounds: int = 2, batch_size: int = 16,
                max_padding: float = JOINT_MAX_PADDING, tasks=DEMO_TASKS, n_train: int | None = None, seed: int = 0,
                log=print) -> list:
    """Time separate, joint and joint-padded training (one BLAS thread); return one JSON row per way."""
    if steps < 1 or rounds < 1:
        raise BenchError("--joint-steps and --repeats must be >= 1")
    hp = HYPERPARAMS["lora"]
    r, lr, targets = hp["r"], hp["lr"], tuple(hp["targets"])
    length_group = hp.get("length_group", 1)
    tok = Tokenizer.default()
    base = _base(base_name, seed)
    block = base.config.block_size
    train = {t: load_task(t, "train", n_train) for t in tasks}
    previous = blas_threads()["threads"]
    if not set_blas_threads(1):
        log("note: cannot set NumPy's BLAS threads here; run with OPENBLAS_NUM_THREADS=1 for the one-thread figures")
    log(f"[joint/{base_name}] {'+'.join(tasks)}: {steps} steps × {batch_size} rows per task, r {r}, "
        f"{rounds} rounds, 1 BLAS thread (CPU time of the training loops)")
    trained = {}

    def separate():
        seconds = 0.0
        for task in tasks:
            model = joint_model(base, (task,), r=r, targets=targets, seed=seed)
            opt = optim.AdamW(model.parameters(trainable_only=True), lr=lr, weight_decay=hp["weight_decay"])
            sched = optim.LRScheduler(opt, lambda s: optim.warmup_linear(s, total=steps, warmup=max(1, steps // 10)))
            get_batch = task_batches(train[task], tok, batch_size, seed, block, length_group)
            started = time.process_time()
            fit(model, opt, get_batch, steps, scheduler=sched, grad_clip=1.0, progress=False)  # its one adapter
            seconds += time.process_time() - started
            trained.setdefault("separate", {})[task] = _adapters(model, task)
        return seconds

    def joint_with(name, make):
        def run():
            model = joint_model(base, tasks, r=r, targets=targets, seed=seed)
            get_batch = make()
            started = time.process_time()
            train_joint(model, tasks, get_batch, steps, lr, hp["weight_decay"], progress=False)
            seconds = time.process_time() - started
            trained[name] = {task: _adapters(model, task) for task in tasks}
            return seconds
        return run

    ways = {
        "separate": separate,
        "joint": joint_with("joint", lambda: joint_groups(train, tok, batch_size, seed, block, length_group,
                                                          max_padding)),
        "joint-padded": joint_with("joint-padded", lambda: joint_batches(train, tok, batch_size, seed, block,
                                                                         length_group)),
    }
    slots = {
        "separate": tuple(map(sum, zip(*(_slots(task_batches(train[t], tok, batch_size, seed, block, length_group),
                                                steps) for t in tasks)))),
        "joint": _slots(joint_groups(train, tok, batch_size, seed, block, length_group, max_padding), steps),
        "joint-padded": _slots(joint_batches(train, tok, batch_size, seed, block, length_group), steps),
    }
    times = {name: [] for name in ways}
    try:
        names = list(ways)
        for i in range(rounds):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(ways[name]())
                log(f"[joint/{base_name}] round {i + 1}: {name} {times[name][-1]:.2f} s")
    finally:
        if previous is not None:
            set_blas_threads(previous)
    machine = machine_info()
    best = {name: min(ts) for name, ts in times.items()}
    rows = []
    for name in ways:
        diff = max(float(np.max(np.abs(trained[name][t][k] - trained["separate"][t][k])))
                   for t in tasks for k in trained["separate"][t])
        rows.append({
            "config": f"joint-{base_name}", "mode": name, "impl": "minilora", "tasks": list(tasks), "steps": steps,
            "batch_size": batch_size, "r": r, "targets": list(targets), "length_group": length_group,
            "max_padding": max_padding if name == "joint" else None, "rounds": rounds, "blas_threads": 1,
            "cpu_seconds": best[name], "cpu_seconds_rounds": times[name], "token_slots": slots[name][0],
            "counted_tokens": slots[name][1], "ratio_vs_separate": best[name] / best["separate"],
            "slots_vs_separate": slots[name][0] / slots["separate"][0],
            "max_adapter_diff_vs_separate": diff, "d_model": base.config.d_model, "n_layer": base.config.n_layer,
            "vocab_size": base.config.vocab_size, "machine": machine,
        })
    return rows


def format_joint_table(rows) -> str:
    rows = [r for r in rows if r["config"].startswith("joint-")]
    if not rows:
        return ""
    head = f"{'config':<12} {'way':<13} {'CPU s':>8} {'×separate':>9} {'slots':>9} {'×separate':>9} {'max |Δadapter|':>15}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['config']:<12} {r['mode']:<13} {r['cpu_seconds']:>8.2f} {r['ratio_vs_separate']:>9.3f} "
                     f"{r['token_slots']:>9} {r['slots_vs_separate']:>9.3f} {r['max_adapter_diff_vs_separate']:>15.1e}")
    return "\n".join(lines)
