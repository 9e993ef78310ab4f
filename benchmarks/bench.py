"""Benchmarks: step time, throughput, FLOPs, MFU and memory of minilora's GPT, optionally next to PyTorch.

    python -m benchmarks.bench                            # from the repository root: tiny + medium, every mode
    python -m benchmarks.bench --configs tiny --modes full,lora --compare-torch --json bench.jsonl
    minilora bench --quick                                # the same through the CLI (a source checkout)
    minilora bench --gpt2 --json gpt2.jsonl               # GPT-2-124M shape against transformers + PEFT

What is measured, per (config, mode):

    full          one training step: forward, loss, backward, AdamW on every parameter (eq. 1)
    lora          one training step with LoRA r=8 on W_q, W_v: only A and B train (eq. 2)
    infer         a forward pass of the base model under ``no_grad``
    merged        the same after ``lora.merge``: W = W0 + s·B A, a plain Linear (no extra latency)
    unmerged      LoRA kept apart: W0 x + s·B A x in every adapted layer
    mixed16       a batch that mixes tasks: 16 adapters are loaded, the rows are split into
                  min(batch, 16) contiguous groups, group j uses adapter j, all in one
                  ``with lora.mixed_batch(model, [...]): model(idx)`` (tiny, batch 16: 16 adapters, one row each;
                  medium, batch 8: the 16 are loaded, 8 of them are in the batch, one row each)
    mixed16-loop  the reference mixed16 is compared with: one forward per adapter, on its rows only

Every (mode, implementation) of a config is built first, warmed up, then timed in rounds: each
round runs every one of them once, in a rotated order, so minilora and PyTorch (``--compare-torch``)
alternate and see the same machine load. Reported: medians over the rounds, and ratios as the
median of the per-round ratios (minilora / torch, lora / full, mixed16 / infer, ...), never single
runs — the development machine has 2 cores and is shared.

Other figures: FLOPs per step (matmuls only, counted analytically: ``minilora.flops``), MFU against a
float32 (1024×1024)@(1024×1024) matmul peak measured in the same rounds on the same backend,
optimizer-state bytes (``optimizer.state_bytes()``), and peak memory of one extra step under
tracemalloc (separate from the timed steps, which tracemalloc would slow down).

Before timing, with ``--compare-torch``, the loss of every mode is computed by both
implementations on the same weights and batch and must agree to 1e-4 (float32): the timings
compare the same computation. PyTorch is imported lazily, and only under ``--compare-torch``;
its model is the twin in ``benchmarks/torch_gpt.py`` (also the oracle of tests/oracle).

``--gpt2`` (the config ``gpt2``) is another comparison: minilora against Hugging Face transformers +
PEFT at GPT-2-124M's shape, LoRA and full steps, greedy generation, peak memory; see ``gpt2.py``.

The harness: ``config`` (what is benchmarked), ``machine`` (BLAS threads, kernel, versions), ``runners``
(the minilora and PyTorch steps), ``gpt2`` (the transformers + PEFT comparison), ``joint`` (joint
multi-adapter training against separate runs), this module (check, time, report, command line); the
rounds are ``minilora.timing.interleaved``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import numpy as np

from minilora import backend as bk
from minilora.models import GPT
from minilora.timing import interleaved, median, paired_ratio, quartiles

from .config import CONFIGS, LOSS_RTOL, MODES, TRAIN_MODES, BenchConfig, BenchError, mode_flops
from .machine import blas_kernel, blas_threads, blas_warnings, machine_info, set_blas_threads
from .joint import JOINT_BASES, bench_joint, format_joint_table
from .gpt2 import GPT2Setup, bench_gpt2, format_gpt2_table, require_hf
from .runners import PEAK_MATMULS, PEAK_N, load_torch_twin, minilora_runners, peak_runner, torch_peak_runner, torch_runners

__all__ = ["CONFIGS", "MODES", "BenchConfig", "BenchError", "bench_config", "format_table", "main", "run"]


def bench_config(bc: BenchConfig, modes, *, repeats: int, warmup: int, compare_torch: bool, backend: str,
                 seed: int = 0, attention: str = "math", log=print) -> list:
    """Build, check, warm up and time every (mode, impl) of one config; return the JSON rows."""
    bk.manual_seed(seed)
    base = GPT(bc.model)  # numpy; every mode starts from a copy of these weights
    base.eval()
    rng = np.random.default_rng(seed)
    idx_np = rng.integers(0, bc.model.vocab_size, size=(bc.batch, bc.model.block_size))
    targets_np = rng.integers(0, bc.model.vocab_size, size=(bc.batch, bc.model.block_size))
    idx = bk.asarray(idx_np, backend=backend)
    targets = bk.asarray(targets_np, backend=backend)

    log(f"[{bc.name}] building {', '.join(modes)} (batch {bc.batch}, T {bc.model.block_size}, d {bc.model.d_model}, "
        f"{bc.model.n_layer} layers, {bc.model.n_head} heads)")
    ml_runners, lora_sources = minilora_runners(bc, modes, base, idx, targets, backend, seed)
    t_runners = {}
    if compare_torch:
        twin = load_torch_twin()
        base_sd = {name: bk.to_numpy(a) for name, a in base.state_dict().items()}
        device = "cuda" if backend == "cupy" else "cpu"
        t_runners = torch_runners(bc, modes, twin, base_sd, lora_sources, idx_np, targets_np, attention, device)

    # the agreement check (not timed): same weights, same batch, same loss
    checks = {}
    for mode in modes:
        ml_loss = ml_runners[mode].loss()
        entry = {"minilora": ml_loss}
        if mode in t_runners:
            t_loss = t_runners[mode].loss()
            diff = abs(ml_loss - t_loss)
            entry.update(torch=t_loss, abs_diff=diff, ok=bool(diff <= LOSS_RTOL * max(1.0, abs(t_loss))))
            if not entry["ok"]:
                raise BenchError(
                    f"[{bc.name}/{mode}] minilora's loss {ml_loss:.6f} and PyTorch's {t_loss:.6f} differ by {diff:.2e} "
                    f"(> {LOSS_RTOL:g} relative): the two models do not compute the same thing, so timing them "
                    "side by side would compare different work"
                )
        checks[mode] = entry
    _self_checks(bc, checks, log)

    order = []
    for mode in modes:
        order.append(ml_runners[mode])
        if mode in t_runners:
            order.append(t_runners[mode])
    # The matmul peak is timed inside the rounds too, so it sees the same machine load as the steps.
    peak_runners = [peak_runner(backend)]
    if compare_torch:
        peak_runners.append(torch_peak_runner("cuda" if backend == "cupy" else "cpu"))
    order += peak_runners
    log(f"[{bc.name}] timing {len(order)} runners × {repeats} rounds (interleaved)")
    times = interleaved({i: r.call for i, r in enumerate(order)}, repeats, warmup=warmup, before_round=gc.collect)
    for i, r in enumerate(order):
        r.times = times[i]
    memory = {mode: ml_runners[mode].memory() for mode in modes}
    peak = PEAK_MATMULS * 2.0 * PEAK_N**3 / median(peak_runners[0].times)
    torch_peak = PEAK_MATMULS * 2.0 * PEAK_N**3 / median(peak_runners[1].times) if compare_torch else None
    log(f"[{bc.name}] matmul peak (float32 {PEAK_N}³, in the rounds): {backend} {peak / 1e9:.0f} GFLOP/s"
        + (f", torch {torch_peak / 1e9:.0f} GFLOP/s" if torch_peak else ""))

    rows = []
    machine = machine_info()
    for mode in modes:
        for impl, r in (("minilora", ml_runners[mode]), ("torch", t_runners.get(mode))):
            if r is None:
                continue
            med = median(r.times)
            q1, q3 = quartiles(r.times)
            flops = mode_flops(bc, mode)
            row = {
                "config": bc.name, "mode": mode, "impl": impl, "backend": backend if impl == "minilora" else
                ("torch-cuda" if backend == "cupy" else "torch-cpu"),
                "batch": bc.batch, "seq_len": bc.model.block_size, "d_model": bc.model.d_model,
                "n_layer": bc.model.n_layer, "n_head": bc.model.n_head, "vocab_size": bc.model.vocab_size,
                "tokens_per_step": bc.tokens, "repeats": len(r.times), "warmup": warmup,
                "median_ms": med * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "min_ms": min(r.times) * 1e3,
                "iqr_rel": (q3 - q1) / med if med else None,
                "tokens_per_s": bc.tokens / med, "flops_per_step": flops, "achieved_gflops": flops / med / 1e9,
                "matmul_peak_gflops": peak / 1e9, "mfu": flops / med / peak,
                "optimizer_state_bytes": r.info.get("optimizer_state_bytes"),
                "trainable_params": r.info.get("trainable_params"),
                "total_params": r.info.get("total_params"),
                "step_peak_bytes": None, "param_bytes": None, "peak_memory_bytes": None,
                "loss_check": checks.get(mode),
                "ratio_vs_torch": None,
                "relative": {},
                "machine": machine,
            }
            if impl == "torch" and torch_peak:
                row["own_matmul_peak_gflops"] = torch_peak / 1e9
            if impl == "minilora":
                row.update(memory[mode])
            if mode in ("mixed16", "mixed16-loop"):
                row["n_adapters"] = ml_runners[mode].info.get("n_adapters")
                row["adapters_in_batch"] = ml_runners[mode].info.get("adapters_in_batch")
            if mode in t_runners:
                row["ratio_vs_torch"] = paired_ratio(ml_runners[mode].times, t_runners[mode].times)
            rel = row["relative"]
            side = ml_runners if impl == "minilora" else t_runners
            if mode == "lora" and "full" in side:
                rel["speedup_vs_full"] = paired_ratio(side["full"].times, r.times)
            if mode in ("merged", "unmerged", "mixed16") and "infer" in side:
                rel["ratio_vs_infer"] = paired_ratio(r.times, side["infer"].times)
            if mode == "mixed16" and "mixed16-loop" in side:
                rel["speedup_vs_loop"] = paired_ratio(side["mixed16-loop"].times, r.times)
            if mode == "lora" and "full" in side and side["full"].info.get("optimizer_state_bytes"):
                rel["optimizer_state_vs_full"] = r.info["optimizer_state_bytes"] / side["full"].info["optimizer_state_bytes"]
                rel["trainable_params_vs_full"] = r.info["trainable_params"] / side["full"].info["trainable_params"]
            rows.append(row)
    return rows


def _self_checks(bc, checks, log) -> None:
    """minilora against itself: merged = unmerged, mixed16 = its loop (up to float32 rounding)."""
    for a, b in (("merged", "unmerged"), ("mixed16", "mixed16-loop")):
        if a in checks and b in checks:
            la, lb = checks[a]["minilora"], checks[b]["minilora"]
            if abs(la - lb) > LOSS_RTOL * max(1.0, abs(lb)):
                raise BenchError(f"[{bc.name}] minilora's {a} loss {la:.6f} differs from its {b} loss {lb:.6f}")


# ----------------------------------------------------------------------------- the report
def _fmt_bytes(n):
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0


def format_table(rows) -> str:
    """A readable table: one line per (config, mode), minilora and torch side by side, then the relations."""
    by = {(r["config"], r["mode"], r["impl"]): r for r in rows}
    configs = list(dict.fromkeys(r["config"] for r in rows))
    has_torch = any(r["impl"] == "torch" for r in rows)
    head = f"{'config':<7} {'mode':<13} {'minilora ms':>11} {'±IQR':>6} {'tok/s':>9} {'GFLOP':>7} {'MFU':>6}"
    if has_torch:
        head += f" {'torch ms':>9} {'±IQR':>6} {'MFU':>6} {'ml/torch':>8}"
    head += f" {'opt state':>10} {'peak mem':>9}"
    lines = [head, "-" * len(head)]
    for c in configs:
        for mode in MODES:
            m = by.get((c, mode, "minilora"))
            if m is None:
                continue
            line = (f"{c:<7} {mode:<13} {m['median_ms']:>11.2f} {100 * (m['iqr_rel'] or 0):>5.0f}% "
                    f"{m['tokens_per_s']:>9.0f} {m['flops_per_step'] / 1e9:>7.2f} {100 * m['mfu']:>5.1f}%")
            if has_torch:
                t = by.get((c, mode, "torch"))
                if t is not None:
                    line += (f" {t['median_ms']:>9.2f} {100 * (t['iqr_rel'] or 0):>5.0f}% {100 * t['mfu']:>5.1f}%"
                             f" {m['ratio_vs_torch']:>8.2f}")
                else:
                    line += f" {'-':>9} {'-':>6} {'-':>6} {'-':>8}"
            line += f" {_fmt_bytes(m['optimizer_state_bytes'] if mode in TRAIN_MODES else None):>10}"
            line += f" {_fmt_bytes(m['peak_memory_bytes']):>9}"
            lines.append(line)
    rel_lines = []
    for c in configs:
        for impl in ("minilora", "torch"):
            parts = []
            lo, mx = by.get((c, "lora", impl)), by.get((c, "mixed16", impl))
            if lo and "speedup_vs_full" in lo["relative"]:
                parts.append(f"full/lora step time {lo['relative']['speedup_vs_full']:.2f}×")
            if lo and "optimizer_state_vs_full" in lo["relative"]:
                parts.append(f"opt state lora/full {lo['relative']['optimizer_state_vs_full']:.4f} "
                             f"(trainable ratio {lo['relative']['trainable_params_vs_full']:.4f})")
            for mode in ("merged", "unmerged", "mixed16"):
                r = by.get((c, mode, impl))
                if r and "ratio_vs_infer" in r["relative"]:
                    parts.append(f"{mode}/infer {r['relative']['ratio_vs_infer']:.3f}")
            if mx and "speedup_vs_loop" in mx["relative"]:
                parts.append(f"loop/mixed16 time {mx['relative']['speedup_vs_loop']:.1f}×")
            if parts:
                rel_lines.append(f"{c} {impl}: " + "; ".join(parts))
    if rel_lines:
        lines += ["", "relations (medians of per-round ratios):"] + ["  " + s for s in rel_lines]
    checks = [(r["config"], r["mode"], r["loss_check"]) for r in rows if r["impl"] == "minilora" and r["loss_check"]
              and "torch" in r["loss_check"]]
    if checks:
        worst = max(chk["abs_diff"] for _, _, chk in checks)
        lines += ["", f"loss agreement minilora vs torch: {len(checks)} modes, max |Δloss| = {worst:.2e} (limit {LOSS_RTOL:g} rel.)"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry points
def announce_blas(log=print) -> None:
    """Log which BLAS and kernel NumPy runs, and warn about OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE."""
    kernel = blas_kernel()
    log(f"BLAS: {kernel.get('library')} {kernel.get('version') or ''}, kernel {kernel.get('kernel') or 'unknown'} "
        f"(from {kernel['source']})")
    for line in blas_warnings():
        log(line)


def run(configs=("tiny", "medium"), modes=MODES, *, repeats: int = 7, warmup: int = 2, compare_torch: bool = False,
        threads: int | None = None, backend: str = "numpy", attention: str = "math", seed: int = 0,
        gpt2_setup=None, gpt2_memory: bool = True, announce: bool = True, log=print) -> list:
    """Run the benchmark; return the rows (one dict per (config, mode, impl), as written to JSON lines).

    The config ``gpt2`` runs ``benchmarks.gpt2.bench_gpt2`` (its own modes; ``modes`` is for tiny and
    medium) with ``gpt2_setup`` (default: GPT-2-124M's shape) and, with ``gpt2_memory``, the peak-memory
    processes. ``announce``: log NumPy's BLAS kernel and any override first (``announce_blas``).
    """
    for c in configs:
        if c not in CONFIGS and c != "gpt2":
            raise BenchError(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}, gpt2")
    modes = list(dict.fromkeys(modes))
    for m in modes:
        if m not in MODES:
            raise BenchError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    if "mixed16" in modes and "mixed16-loop" not in modes:
        modes.append("mixed16-loop")  # the reference mixed16 is judged against
    if repeats < 1 or warmup < 0:
        raise BenchError("--repeats must be >= 1 and --warmup >= 0")
    if backend == "cupy":
        bk.set_backend("cupy")  # raises BackendUnavailableError with the reason when there is no GPU
        bk.set_backend("numpy")  # models are built on the host and moved

    previous_blas = blas_threads()["threads"]
    previous_torch = None
    try:
        if threads is not None and not set_blas_threads(threads):
            log(f"note: cannot set NumPy's BLAS threads here; it uses {blas_threads()['threads']} "
                "(set OPENBLAS_NUM_THREADS before starting Python)")
        blas = blas_threads()
        env = f"; OPENBLAS_NUM_THREADS={blas['OPENBLAS_NUM_THREADS']}" if "OPENBLAS_NUM_THREADS" in blas else ""
        if announce:
            announce_blas(log)
        if "gpt2" in configs:
            require_hf()
        if compare_torch or "gpt2" in configs:
            load_torch_twin()
            import torch

            previous_torch = torch.get_num_threads()
            torch.set_num_threads(int(threads or blas["threads"] or os.cpu_count()))  # match NumPy's BLAS
            log(f"threads: NumPy BLAS ({blas['library']}) {blas['threads']}, torch {torch.get_num_threads()}{env}")
        else:
            log(f"threads: NumPy BLAS ({blas['library']}) {blas['threads']}{env}")

        rows = []
        for c in configs:
            if c == "gpt2":
                if backend != "numpy":
                    raise BenchError("--gpt2 runs on the CPU (NumPy against torch-cpu); leave out --backend cupy")
                rows += bench_gpt2(gpt2_setup or GPT2Setup(), repeats=repeats, warmup=warmup, seed=seed,
                                   memory=gpt2_memory, threads=threads, log=log)
                continue
            rows += bench_config(CONFIGS[c], modes, repeats=repeats, warmup=warmup, compare_torch=compare_torch,
                                 backend=backend, seed=seed, attention=attention, log=log)
        return rows
    finally:  # leave the process's thread settings as they were (run() may be called from a notebook or a test)
        if threads is not None and previous_blas is not None:
            set_blas_threads(previous_blas)
        if previous_torch is not None:
            sys.modules["torch"].set_num_threads(previous_torch)


def build_parser(prog: str = "python -m benchmarks.bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,  # "minilora bench" when the CLI forwards here
        description="Time minilora's GPT (training, LoRA training, inference: base, merged, unmerged, mixed-adapter "
                    "batches), optionally side by side with PyTorch. Medians after warm-up; ratios are medians of "
                    "per-round ratios. See benchmarks/README.md for the columns.",
    )
    p.add_argument("--configs", default="tiny,medium",
                   help="comma-separated: tiny, medium, gpt2 (default: tiny,medium)")
    p.add_argument("--gpt2", action="store_true",
                   help="minilora against transformers + PEFT at GPT-2-124M shape, random weights (the config "
                        "gpt2; needs pip install -e '.[bench]'); alone unless --configs names others too")
    p.add_argument("--no-memory", action="store_true", help="gpt2: skip the peak-memory runs (4 fresh processes)")
    p.add_argument("--joint", action="store_true",
                   help="joint multi-adapter training against separate runs on the same rows (1 BLAS thread, CPU "
                        "time, best of --repeats rounds, default 2); alone unless --configs or --gpt2 ask for more")
    p.add_argument("--joint-base", choices=JOINT_BASES, default="tiny",
                   help="--joint: the shipped base (tiny) or GPT-2-124M's shape with random weights (gpt2)")
    p.add_argument("--joint-steps", type=int, default=30, help="--joint: training steps of every run (default 30)")
    p.add_argument("--modes", default=",".join(MODES[:-1]),
                   help=f"comma-separated from {', '.join(MODES)} (default: all; mixed16 brings mixed16-loop along)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per runner (default 7; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per runner first (default 2; 1 with --quick)")
    p.add_argument("--json", metavar="PATH", help="write one JSON object per line per (config, mode, impl)")
    p.add_argument("--compare-torch", action="store_true",
                   help="also run the same model in PyTorch (benchmarks/torch_gpt.py), interleaved")
    p.add_argument("--torch-attention", choices=("math", "sdpa"), default="math",
                   help="PyTorch attention: 'math' = the same algorithm as minilora (default), 'sdpa' = fused kernel")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for NumPy's OpenBLAS and torch (default: what OpenBLAS uses, for both)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    p.add_argument("--quick", action="store_true", help="tiny config, few repeats (for tests)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None, prog: str = "python -m benchmarks.bench") -> int:
    args = build_parser(prog).parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    if args.quick and args.configs == "tiny,medium":
        configs = ["tiny"]
    if args.gpt2:
        configs = (configs if args.configs != "tiny,medium" else []) + ["gpt2"]
        configs = list(dict.fromkeys(configs))
    if args.joint and args.configs == "tiny,medium" and not args.gpt2:
        configs = []  # --joint alone
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    try:
        announce_blas()
        rows = []
        if args.joint:
            rows += bench_joint(args.joint_base, steps=args.joint_steps,
                                rounds=args.repeats if args.repeats is not None else 2, seed=args.seed)
        rows += run(configs, [m for m in args.modes.split(",") if m], repeats=repeats, warmup=warmup,
                   compare_torch=args.compare_torch, threads=args.threads, backend=args.backend,
                   attention=args.torch_attention, seed=args.seed, gpt2_memory=not args.no_memory,
                   announce=False)
    except (BenchError, bk.BackendUnavailableError) as exc:
        print(f"minilora bench: {exc}", file=sys.stderr)
        return 2
    print()
    plain = [r for r in rows if r["config"] in CONFIGS]
    tables = [format_table(plain) if plain else "", format_gpt2_table(rows), format_joint_table(rows)]
    print("\n\n".join(t for t in tables if t))
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(row, default=_json_default) + "\n" for row in rows)
        print(f"\nwrote {len(rows)} JSON lines to {args.json}")
    return 0


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


if __name__ == "__main__":
    sys.exit(main())
