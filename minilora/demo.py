"""``minilora demo``: the paper's story end to end, on a laptop CPU in a few minutes.

1. From the shipped pre-trained base, fine-tune each task twice: full fine-tuning (every
   weight trains, eq. 1) and LoRA (r = 4 on Wq and Wv, only A and B train, eq. 2). Print
   trainable parameters, optimizer-state bytes, peak memory, time and the test metric, beside
   the base model's own score with no fine-tuning (the "before" row).
2. Merge each adapter (W = W0 + s·BA): outputs equal the unmerged model, and inference
   costs what the base model costs (no extra latency, unlike adapter layers).
3. Save the adapters: a few kB against a full checkpoint's MBs.
4. Serve ONE batch that mixes the three tasks, each row with its own adapter.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import multiprocessing
import os
import time

import numpy as np

from . import backend as bk
from . import lora
from .data import DEMO_TASKS as TASKS
from .data import Tokenizer, load_task, prompt_ids, task_metric
from .generate import generate
from .experiments.runs import one_blas_thread_for_children
from .io import save_json
from .methods import apply_method, hyperparams
from ._version import __version__
from .models import load_base, save_model
from .models.pretrained import base_sha256
from .recipes import FAST, finetune, zero_shot
from .tensor import no_grad
from .timing import interleaved, median

__all__ = ["readme_section", "run_demo"]


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.2f} MB" if n_bytes >= 1e5 else f"{n_bytes / 1e3:.1f} kB"


def plot_loss_curves(runs: dict, path: str) -> None:
    """One panel per task: training loss of full fine-tuning and LoRA against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False)
    for ax, (task, by_method) in zip(axes[0], runs.items()):
        for method, run in by_method.items():
            if method == "base":
                continue  # nothing trained
            h = run.history
            label = f"{method} ({run.trainable_params:,} trainable)"
            ax.plot(h.steps, h.losses, label=label, alpha=0.85)
        ax.set_title(f"{task}: {by_method['full'].metric_name}")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (y tokens)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle("Full fine-tuning vs LoRA (r = 4 on Wq, Wv) from the same pre-trained base")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finetune_in_worker(task: str, method: str, steps: int, n_eval, progress) -> tuple:
    """One run in a worker process: its RunResult without the model, and the trained arrays."""
    run = finetune(task, method, base=load_base(), steps=steps, n_eval=n_eval, progress=progress and "lines", seed=0)
    trained = run.model.state_dict() if method == "full" else lora.lora_state_dict(run.model, task)
    run.model = None
    return run, {name: bk.to_numpy(a) for name, a in trained.items()}


def _zero_shot_in_worker(task: str, n_eval) -> tuple:
    """The base model's score on ``task`` with no fine-tuning, without the model."""
    run = zero_shot(task, base=load_base(), n_eval=n_eval)
    run.model = None
    return run, None


def _rebuild(base, run, arrays):
    """The run's model in this process: a copy of the base with the worker's trained arrays."""
    model = copy.deepcopy(base)
    if run.method == "lora":
        keys = ("r", "alpha", "targets", "adapter_name", "init", "dropout")
        model = apply_method(model, "lora", **{k: run.config[k] for k in keys if k in run.config})
    model.load_state_dict(arrays, strict=run.method == "full")
    run.model = model
    return run


def train_all(base, steps: dict, n_eval, progress: bool = True, workers: int = 1) -> dict:
    """The base with no fine-tuning, full fine-tuning and LoRA on every task: ``runs[task][method]``
    (RunResults, method "base", "full" or "lora"); ``steps[task, method]`` is each run's length.

    ``workers`` > 1 trains that many runs at a time in separate processes with one BLAS thread
    each. A step is a chain of small matmuls and single-threaded elementwise passes, so a second
    BLAS thread speeds one run up far less than a second process running another run; every run
    seeds itself, so the results do not depend on where it ran.
    """
    jobs = [(task, method) for method in ("full", "lora") for task in TASKS]
    jobs.sort(key=lambda job: -steps[job])  # the longest runs first, so no worker is left with one at the end
    jobs += [(task, "base") for task in TASKS]  # no training: a few seconds of decoding each
    runs: dict = {task: {} for task in TASKS}
    if workers <= 1:
        for task, method in jobs:
            if method == "base":
                runs[task][method] = zero_shot(task, base=base, n_eval=n_eval)
            else:  # LoRA: r = 4 on q, v (methods.HYPERPARAMS)
                runs[task][method] = finetune(task, method, base=base, steps=steps[task, method], n_eval=n_eval,
                                              progress=progress, seed=0)
    else:
        with one_blas_thread_for_children(), cf.ProcessPoolExecutor(
                max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {(pool.submit(_zero_shot_in_worker, task, n_eval) if method == "base" else
                        pool.submit(_finetune_in_worker, task, method, steps[task, method], n_eval, progress)):
                       (task, method) for task, method in jobs}
            for future in cf.as_completed(futures):
                task, method = futures[future]
                run, arrays = future.result()
                runs[task][method] = run if method == "base" else _rebuild(base, run, arrays)
    return {task: {m: runs[task][m] for m in ("base", "full", "lora")} for task in TASKS}


def _print_runs(runs: dict) -> dict:
    """The table of step 1 (one row per task and method) and LoRA's metric over full fine-tuning's."""
    header = f"{'task':<9}{'method':<7}{'trainable':>11}{'% total':>9}{'optim state':>13}{'peak mem':>11}{'time':>8}  metric"
    print(header)
    print("-" * len(header) + "-" * 14)
    for task, by_method in runs.items():
        for method, run in by_method.items():
            share = 100.0 * run.trainable_params / run.total_params
            print(f"{task:<9}{method:<7}{run.trainable_params:>11,}{share:>8.2f}%{_mb(run.optimizer_state_bytes):>13}"
                  f"{_mb(run.peak_memory_bytes):>11}{run.train_seconds:>7.1f}s  {run.metric_name} {run.metric:.3f}")
    print("(base: the shipped model with no fine-tuning, scored the same way)")
    ratios = {t: (r["lora"].metric / r["full"].metric if r["full"].metric > 0 else float("nan")) for t, r in runs.items()}
    print("LoRA / full fine-tuning metric: " + ", ".join(f"{t} {100 * v:.1f} %" for t, v in ratios.items()))
    return ratios


def _merge_differences(runs: dict, probe_ids: np.ndarray) -> dict:
    """Merge every task's adapter: the largest logit difference to the unmerged model, per task."""
    merge_report = {}
    for task in TASKS:
        model = runs[task]["lora"].model
        model.eval()
        with no_grad():
            before = bk.to_numpy(model(probe_ids).data)
            lora.merge(model)
            after = bk.to_numpy(model(probe_ids).data)
        diff = float(np.max(np.abs(after - before)))
        merge_report[task] = {"max_abs_logit_diff": diff}
        print(f"  {task:<9} max |merged - unmerged| logit difference {diff:.2e}")
    return merge_report


def _batch1_latency(base, merged, probe_ids: np.ndarray, fast: bool) -> dict:
    """Median batch-1 forward time (ms) of the base, the merged adapter, merge_and_unload and the
    unmerged adapter, timed interleaved."""
    unmerged = copy.deepcopy(merged)
    lora.unmerge(unmerged)
    served = lora.merge_and_unload(copy.deepcopy(unmerged)).eval()  # plain Linears holding W0 + s·BA
    one = probe_ids[:1]
    base.eval()
    with no_grad():
        times = interleaved({"base": lambda: base(one), "merged_and_unloaded": lambda: served(one),
                             "merged": lambda: merged(one), "unmerged": lambda: unmerged(one)},
                            15 if fast else 60)
    lat = {name: 1e3 * median(ts) for name, ts in times.items()}  # ms

    def over_base(name):
        return f"{lat[name]:.2f} ms ({100 * (lat[name] / lat['base'] - 1):+.1f} %)"

    print(f"  batch-1 forward latency: base {lat['base']:.2f} ms; merge_and_unload {over_base('merged_and_unloaded')}; "
          f"merged LoRALinear {over_base('merged')}; unmerged {over_base('unmerged')}\n")
    return lat


def _save_adapters(runs: dict, out_dir: str) -> tuple[dict, dict, int]:
    """Every task's adapter file and e2e's full checkpoint: the adapter paths, their sizes and the
    checkpoint's size (bytes)."""
    adapter_paths = {}
    for task in TASKS:
        model = runs[task]["lora"].model
        lora.unmerge(model)
        path = os.path.join(out_dir, f"{task}.safetensors")
        lora.save_adapter(path, model, adapter_name=task)
        adapter_paths[task] = path
    full_path = os.path.join(out_dir, "e2e-full.safetensors")
    save_model(runs["e2e"]["full"].model, full_path, os.path.join(out_dir, "e2e-full.json"), {"task": "e2e"})
    full_size = os.path.getsize(full_path)
    sizes = {t: os.path.getsize(p) for t, p in adapter_paths.items()}
    for task, size in sizes.items():
        print(f"  {adapter_paths[task]}: {_mb(size)}  ({full_size / size:.0f}x smaller than {_mb(full_size)})")
    print()
    return adapter_paths, sizes, full_size


def _serve_mixed_batch(adapter_paths: dict, tokenizer) -> tuple[dict, bool]:
    """The first test example of every task in ONE batch, each row through its own adapter: the
    answers, and whether they equal serving one task at a time."""
    server = load_base()
    for task, path in adapter_paths.items():
        lora.load_adapter(path, server, adapter_name=task)
    server.eval()
    examples = [load_task(task, "test", 1)[0] for task in TASKS]  # the first, not picked
    outputs = generate(server, [prompt_ids(tokenizer, ex.prompt) for ex in examples], max_new_tokens=40,
                       eos_id=tokenizer.eos_id, adapter_ids=list(TASKS))
    mixed = {}
    for task, ex, out in zip(TASKS, examples, outputs):
        answer = tokenizer.decode(out, skip_special=True)
        metric_name, value = task_metric(task, [answer], [ex])
        correct = bool(value == 1.0)  # by the task's metric: every slot / the exact MR / the label
        mixed[task] = {"prompt": ex.prompt, "answer": answer, "reference": ex.target, "correct": correct}
        print(f"  [{task}] prompt:    {ex.prompt}\n"
              f"  {'':<{len(task) + 2}} answer:    {answer}\n"
              f"  {'':<{len(task) + 2}} reference: {ex.target}\n"
              f"  {'':<{len(task) + 2}} {'✓' if correct else '✗'} ({metric_name} {value:.2f})")
    # the same rows served the ordinary way, one task at a time (its adapter the active one, no
    # per-row routing), must agree with the mixed batch
    separately = []
    for task, ex in zip(TASKS, examples):
        lora.set_adapter(server, task)
        separately.append(generate(server, [prompt_ids(tokenizer, ex.prompt)], max_new_tokens=40,
                                   eos_id=tokenizer.eos_id)[0])
    agree = all(list(a) == list(b) for a, b in zip(outputs, separately))
    print(f"  {sum(m['correct'] for m in mixed.values())}/{len(mixed)} correct; "
          f"mixed batch == one adapter at a time: {agree}")
    return mixed, agree


def run_demo(fast: bool | None = None, json_path: str | None = None, out_dir: str = "minilora-out",
             progress: bool = True, workers: int | None = None) -> dict:
    """The demo; ``workers``: fine-tuning runs at a time (default: one per CPU core, at most 6)."""
    fast = FAST if fast is None else fast
    workers = min(6, os.cpu_count() or 1) if workers is None else int(workers)
    started = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = Tokenizer.default()
    base = load_base()
    steps = {(task, method): (15 if fast else hyperparams(method, task)["steps"]) for task in TASKS for method in ("full", "lora")}
    n_eval = 16 if fast else None  # None: the whole test split (200 examples)
    print("minilora demo: LoRA (Hu et al. 2021, arXiv 2106.09685) in miniature")
    print(f"base model: {base.num_parameters():,} parameters, {base.config.n_layer} layers, "
          f"d_model {base.config.d_model}, backend {bk.get_backend()}{' (fast mode)' if fast else ''}\n")

    print("[1/4] fine-tune every task with full fine-tuning and with LoRA (r = 4 on q, v)"
          + (f", {workers} runs at a time" if workers > 1 else ""))
    runs = train_all(base, steps, n_eval, progress, workers)
    ratios = _print_runs(runs)
    curves = os.path.join(out_dir, "loss_curves.png")
    plot_loss_curves(runs, curves)
    print(f"wrote {curves}\n")

    print("[2/4] merge W = W0 + (alpha/r) B A: the same outputs, the base model's latency")
    probe = load_task("e2e", "test", 8)
    probe_ids = np.array([(prompt_ids(tokenizer, ex.prompt) + [tokenizer.pad_id] * 64)[:32] for ex in probe])
    merge_report = _merge_differences(runs, probe_ids)
    lat = _batch1_latency(base, runs["e2e"]["lora"].model, probe_ids, fast)

    print("[3/4] adapters on disk vs a full fine-tuned checkpoint")
    adapter_paths, sizes, full_size = _save_adapters(runs, out_dir)

    print("[4/4] one batch, three tasks: each row routed through its own adapter "
          "(the first test example of each task)")
    mixed, agree = _serve_mixed_batch(adapter_paths, tokenizer)

    wall = time.perf_counter() - started
    print(f"\ndone in {wall:.1f} s; outputs in {out_dir}/")
    results = {
        "tasks": {t: {m: run.summary() for m, run in by.items()} for t, by in runs.items()},
        "lora_over_full": ratios,
        "merge": merge_report,
        "latency_ms_batch1": lat,
        "adapter_bytes": sizes,
        "full_checkpoint_bytes": full_size,
        "mixed_batch": mixed,
        "mixed_batch_matches_separate": agree,
        "wall_seconds": wall,
        "fast": fast,
        "workers": workers,
        "version": __version__,
        "base_sha256": base_sha256(),
        "settings": {t: {m: hyperparams(m, t) for m in ("full", "lora")} for t in TASKS},
    }
    if json_path:
        save_json(json_path, results)
        print(f"wrote {json_path}")
    return results


_PAIRS = {"e2e": "e2e (data → text)", "parse": "parse (text → MR)", "classify": "classify (MNLI-like)"}


def readme_section(results: dict) -> str:
    """README's measured section, rendered from the demo's JSON (``minilora demo --json``).

    A test renders it from the committed ``docs/demo.json`` and compares it with README, so the
    numbers there are always the ones a run printed.
    """
    lines = ["| task | method | trainable | % of total | AdamW state | peak memory | test metric |",
             "|---|---|---|---|---|---|---|"]
    order = [t for t in TASKS if t in results["tasks"]]  # the JSON file keeps its keys sorted
    for task in order:
        cells = results["tasks"][task]
        for method in ("base", "full", "lora"):
            c = cells[method]
            name = {"base": "base (no fine-tuning)", "full": "full", "lora": "LoRA"}[method]
            share = 100.0 * c["trainable_params"] / c["total_params"]
            extra = ""
            if method == "lora" and cells["full"]["metric"] > 0:
                extra = f" ({100 * c['metric'] / cells['full']['metric']:.1f} % of full)"
            state = _mb(c["optimizer_state_bytes"]) if c["trainable_params"] else "–"
            peak = _mb(c["peak_memory_bytes"]) if c["trainable_params"] else "–"
            lines.append(f"| {_PAIRS.get(task, task) if method == 'base' else task} | {name} | "
                         f"{c['trainable_params']:,} | {share:.2f} % | {state} | {peak} | "
                         f"{c['metric_name'].replace('_', ' ')} {c['metric']:.3f}{extra} |")
    lines += ["", "The mixed-task batch serves the first test example of each task (not picked), each row "
              "through its own adapter:", "", "```"]
    for task in order:
        shown = results["mixed_batch"][task]
        pad = " " * (len(task) + 2)
        lines += [f"  [{task}] prompt:    {shown['prompt']}", f"  {pad} answer:    {shown['answer']}",
                  f"  {pad} reference: {shown['reference']}", f"  {pad} {'✓' if shown['correct'] else '✗'}"]
    correct = sum(shown["correct"] for shown in results["mixed_batch"].values())
    lines += [f"  {correct}/{len(results['mixed_batch'])} correct; mixed batch == one adapter at a time: "
              f"{results['mixed_batch_matches_separate']}", "```", "",
              f"The demo itself took {results['wall_seconds']:.1f} s ({results['workers']} worker processes). "
              f"Each adapter file is {_mb(min(results['adapter_bytes'].values()))} against "
              f"{_mb(results['full_checkpoint_bytes'])} for a fine-tuned checkpoint; merged outputs equal unmerged "
              f"ones to {max(m['max_abs_logit_diff'] for m in results['merge'].values()):.0e} (float32 logits)."]
    return "\n".join(lines)
