"""The tables of docs/performance.md, rendered from the benchmarks' JSON lines.

    python -m benchmarks.report docs/bench-gpt2.jsonl docs/bench-joint.jsonl docs/bench-cpu.jsonl docs/bench-profile.jsonl

Prints one Markdown section per kind of row it finds (GPT-2 against transformers + PEFT, its
memory by part, joint against separate training, tiny/medium against the PyTorch twin, the
profile of a step), each with the machine line of its rows. Every figure comes from the rows;
``tests/test_bench.py`` checks that docs/performance.md holds these tables as rendered from the
committed JSON lines.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["machine_line", "render", "tables"]


def _read(paths) -> list:
    rows = []
    for path in paths:
        rows += [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows


def machine_line(row) -> str:
    m = row["machine"]
    blas = m.get("blas", {})
    kernel = blas.get("kernel") or {}
    parts = [f"{m.get('cpu') or 'CPU'}, {m['cpu_count']} cores", f"Python {m['python']}", f"NumPy {m['numpy']}"]
    if kernel:
        parts.append(f"{kernel.get('library')} {kernel.get('version') or ''} kernel {kernel.get('kernel')}".replace("  ", " "))
    threads = row.get("blas_threads", blas.get("threads"))
    parts.append(f"{threads} BLAS thread{'' if threads == 1 else 's'}")
    if m.get("torch"):
        parts.append(f"torch {m['torch']} ({m.get('torch_threads')} threads)")
    if m.get("transformers"):
        parts.append(f"transformers {m['transformers']}, peft {m['peft']}")
    overrides = blas.get("overrides")
    parts.append("OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unset" if overrides == {} else
                 f"overrides {overrides}" if overrides else "overrides not recorded")
    return "Machine: " + "; ".join(parts) + "."


def _ms(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _gb(n):
    return f"{n / 1e9:.2f} GB"


def _gpt2(rows) -> list[str]:
    by = {(r["mode"], r["impl"]): r for r in rows}
    lo, fu = by[("lora", "minilora")], by[("full", "minilora")]
    out = ["| GPT-2-124M shape | minilora | transformers + PEFT | minilora / HF |", "|---|---:|---:|---:|"]
    for mode, label in (("lora", f"LoRA step, batch {lo['batch']} × {lo['seq_len']} (ms)"),
                        ("full", f"full step, batch {fu['batch']} × {fu['seq_len']} (ms)")):
        a, b = by[(mode, "minilora")], by[(mode, "hf")]
        out.append(f"| {label} | {_ms(a['median_ms'])} | {_ms(b['median_ms'])} | **{a['ratio_vs_hf']:.2f}** |")
        out.append(f"| {'LoRA' if mode == 'lora' else 'full'} step MFU | {100 * a['mfu']:.0f} % | {100 * b['mfu']:.0f} % | |")
    for mode in [m for m in dict.fromkeys(r["mode"] for r in rows) if m.startswith("generate-")]:
        a, b = by[(mode, "minilora")], by[(mode, "hf")]
        out.append(f"| greedy generation, batch {a['batch']}, {a['prompt_len']} + {a['new_tokens']} tokens (ms) | "
                   f"{_ms(a['median_ms'])} | {_ms(b['median_ms'])} | **{a['ratio_vs_hf']:.2f}** |")
        out.append(f"| generated tokens/s, batch {a['batch']} | {a['tokens_per_s']:,.0f} | {b['tokens_per_s']:,.0f} | "
                   f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}× |")
    a, b = by.get(("generate-1", "minilora")), by.get(("generate-1", "hf"))
    if a and a.get("decode_gb_per_s") and b.get("decode_gb_per_s"):
        out.append(f"| batch-1 decoding: ms per token | {a['decode_ms_per_token']:.1f} | {b['decode_ms_per_token']:.1f} | "
                   f"{a['decode_ms_per_token'] / b['decode_ms_per_token']:.2f} |")
        out.append(f"| batch-1 decoding: weights read (GB/s, % of gemv) | {a['decode_gb_per_s']:.1f} "
                   f"({100 * a['decode_bandwidth_vs_gemv']:.0f} %) | {b['decode_gb_per_s']:.1f} "
                   f"({100 * b['decode_bandwidth_vs_gemv']:.0f} %) | |")
    if "memory" in lo:
        for mode in ("lora", "full"):
            a, b = by[(mode, "minilora")], by[(mode, "hf")]
            out.append(f"| peak memory, {'LoRA' if mode == 'lora' else 'full'} training (RSS) | {_gb(a['memory']['peak_bytes'])} | "
                       f"{_gb(b['memory']['peak_bytes'])} | {a['memory']['peak_bytes'] / b['memory']['peak_bytes']:.2f} |")
        a, b = by[("lora", "minilora")]["relative"], by[("lora", "hf")]["relative"]
        out.append(f"| peak memory full / LoRA | {a['peak_memory_full_vs_lora']:.2f}× | "
                   f"{b['peak_memory_full_vs_lora']:.2f}× | |")
    out.append(f"| full / LoRA step time | {lo['relative']['speedup_vs_full']:.2f}× | "
               f"{by[('lora', 'hf')]['relative']['speedup_vs_full']:.2f}× | |")
    out += ["", f"sgemm ({lo['matmul_peak_shape'][0]}×{lo['matmul_peak_shape'][1]})@({lo['matmul_peak_shape'][1]}×"
            f"{lo['matmul_peak_shape'][2]}) in the same rounds: NumPy {lo['matmul_peak_gflops']:.0f} GFLOP/s, torch "
            f"{lo['torch_matmul_peak_gflops']:.0f} GFLOP/s; gemv ({lo['gemv_shape'][0]:,} × {lo['gemv_shape'][1]}) "
            f"{lo['gemv_gb_per_s']:.1f} GB/s. "
            f"Medians of {lo['repeats']} interleaved rounds after {lo['warmup']} warm-up round{'' if lo['warmup'] == 1 else 's'}; "
            f"|Δloss| {lo['check']['abs_diff']:.1e} (LoRA), {fu['check']['abs_diff']:.1e} (full)."]
    return out


def _memory(rows) -> list[str]:
    by = {(r["mode"], r["impl"]): r["memory"] for r in rows if "memory" in r}
    if len(by) < 4:
        return []
    cols = [("minilora", "lora"), ("minilora", "full"), ("hf", "lora"), ("hf", "full")]
    out = ["| part | minilora LoRA | minilora full | HF + PEFT LoRA | HF full |", "|---|---:|---:|---:|---:|"]
    for key, label in (("weight_bytes", "weights"), ("gradient_bytes", "gradients"),
                       ("optimizer_state_bytes", "AdamW state"),
                       ("activation_and_other_bytes", "activations, workspace, allocator (the rest)"),
                       ("peak_bytes", "**peak (RSS high-water mark)**")):
        out.append(f"| {label} | " + " | ".join(_gb(by[(mode, impl)][key]) for impl, mode in cols) + " |")
    return out


def _joint(rows) -> list[str]:
    out = ["| base | way | CPU s | × separate | token slots | × separate | max \\|Δ adapter\\| |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['config'][len('joint-'):]} ({r['n_layer']} layers, d {r['d_model']}) | {r['mode']} | "
                   f"{r['cpu_seconds']:.2f} | **{r['ratio_vs_separate']:.2f}** | {r['token_slots']:,} | "
                   f"{r['slots_vs_separate']:.2f} | {r['max_adapter_diff_vs_separate']:.1e} |")
    first = rows[0]
    out += ["", f"{first['steps']} steps × {first['batch_size']} rows per task ({', '.join(first['tasks'])}), LoRA r "
            f"{first['r']} on {', '.join(first['targets'])}, best of {first['rounds']} rounds; rows of other "
            "bases may have fewer steps (each row says)." if len({r['config'] for r in rows}) > 1 else
            f"{first['steps']} steps × {first['batch_size']} rows per task ({', '.join(first['tasks'])}), LoRA r "
            f"{first['r']} on {', '.join(first['targets'])}, best of {first['rounds']} rounds."]
    steps = {r["config"]: r["steps"] for r in rows}
    if len(set(steps.values())) > 1:
        out[-1] = (f"{first['batch_size']} rows per task ({', '.join(first['tasks'])}), LoRA r {first['r']} on "
                   f"{', '.join(first['targets'])}, best of {first['rounds']} rounds; steps: "
                   + ", ".join(f"{c[len('joint-'):]} {s}" for c, s in steps.items()) + ".")
    return out


def _twin(rows) -> list[str]:
    by = {(r["config"], r["mode"], r["impl"]): r for r in rows}
    out = ["| config | mode | minilora ms | torch ms | minilora/torch | MFU minilora | MFU torch |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["impl"] != "minilora":
            continue
        t = by.get((r["config"], r["mode"], "torch"))
        tail = (f"{t['median_ms']:.1f} | **{r['ratio_vs_torch']:.2f}** | {100 * r['mfu']:.1f} % | {100 * t['mfu']:.1f} %"
                if t else f"– | – | {100 * r['mfu']:.1f} % | –")
        out.append(f"| {r['config']} | {r['mode']} | {r['median_ms']:.1f} | {tail} |")
    first = rows[0]
    out += ["", f"Matmul peak (float32 1024³, in the rounds): NumPy {first['matmul_peak_gflops']:.0f} GFLOP/s "
            f"(tiny rounds). Medians of {first['repeats']} interleaved rounds."]
    return out


def _profile(rows) -> list[str]:
    keys = list(dict.fromkeys((r["config"], r["mode"]) for r in rows))
    parts = {}
    for r in rows:
        d = parts.setdefault((r["config"], r["mode"]), {})
        d[r["part"]] = d.get(r["part"], 0.0) + r["share"]
    order = sorted({p for d in parts.values() for p in d}, key=lambda p: -max(d.get(p, 0.0) for d in parts.values()))
    order = [p for p in order if max(d.get(p, 0.0) for d in parts.values()) >= 0.005]
    out = ["| part of the step | " + " | ".join(f"{c} {m}" for c, m in keys) + " |",
           "|---|" + "---:|" * len(keys)]
    for p in order:
        out.append(f"| {p} | " + " | ".join(f"{100 * parts[k].get(p, 0.0):.1f} %" for k in keys) + " |")
    step = {k: next(r["profiled_step_seconds"] for r in rows if (r["config"], r["mode"]) == k) for k in keys}
    out.append("| **the step under the profiler (ms)** | " + " | ".join(f"{1e3 * step[k]:,.0f}" for k in keys) + " |")
    return out


def tables(rows) -> dict:
    """{section name: [markdown lines]} for the kinds of rows present."""
    out = {}
    gpt2 = [r for r in rows if r.get("config") == "gpt2" and "part" not in r]
    if gpt2:
        out["gpt2"] = _gpt2(gpt2) + ["", machine_line(gpt2[0])]
        mem = _memory(gpt2)
        if mem:
            out["gpt2-memory"] = mem
    joint = [r for r in rows if str(r.get("config", "")).startswith("joint-")]
    if joint:
        out["joint"] = _joint(joint) + ["", machine_line(joint[0])]
    twin = [r for r in rows if r.get("config") in ("tiny", "medium") and "part" not in r]
    if twin:
        out["twin"] = _twin(twin) + ["", machine_line(twin[0])]
    prof = [r for r in rows if "part" in r]
    if prof:
        out["profile"] = _profile(prof) + ["", machine_line(prof[0])]
    return out


def render(paths) -> str:
    return "\n\n".join(f"<!-- {name} -->\n" + "\n".join(lines) for name, lines in tables(_read(paths)).items())


if __name__ == "__main__":
    print(render(sys.argv[1:]))
