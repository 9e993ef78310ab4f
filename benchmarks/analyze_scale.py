"""``minilora analyze`` on a big base: peak memory and time, with random weights in sharded safetensors.

    python -m benchmarks.analyze_scale --size gpt2-124m --dir /tmp/analyze-scale
    python -m benchmarks.analyze_scale --size llama-1b --dir /tmp/analyze-scale

Writes a random base (``gpt2-124m``: GPT-2's layout and size, float32, Conv1D tensors stored
(in, out); ``llama-1b``: TinyLlama-1.1B's shapes, bfloat16) as shards of about 200 MB, one tensor in
memory at a time, and a PEFT LoRA adapter of rank 16 on every linear layer of every block, then
times ``hf.analyze_adapter(adapter, base=...)`` once, in a fresh process (so that writing the
base does not count), and prints one JSON line: the seconds, the peak of Python's heap
(tracemalloc), the process's peak resident memory (VmHWM) before and after, the adapter, the
largest adapted base matrix and the whole base, in bytes. Reading the base one tensor at a time is what keeps the peak near one
matrix (the safetensors shards are memory-mapped and read only where a tensor lies).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc

import numpy as np
from safetensors.numpy import save_file

SHARD_BYTES = 200 * 2**20
SIZES = {  # tensor name -> shape, in the checkpoint's own layout; the adapted modules
    "gpt2-124m": dict(layers=12, dtype="F32", fan_in_fan_out=True, block=lambda i: {
        f"transformer.h.{i}.attn.c_attn.weight": (768, 2304), f"transformer.h.{i}.attn.c_proj.weight": (768, 768),
        f"transformer.h.{i}.mlp.c_fc.weight": (768, 3072), f"transformer.h.{i}.mlp.c_proj.weight": (3072, 768)},
        rest={"transformer.wte.weight": (50257, 768), "transformer.wpe.weight": (1024, 768)}),
    "llama-1b": dict(layers=22, dtype="BF16", fan_in_fan_out=False, block=lambda i: {
        f"model.layers.{i}.self_attn.q_proj.weight": (2048, 2048), f"model.layers.{i}.self_attn.k_proj.weight": (256, 2048),
        f"model.layers.{i}.self_attn.v_proj.weight": (256, 2048), f"model.layers.{i}.self_attn.o_proj.weight": (2048, 2048),
        f"model.layers.{i}.mlp.gate_proj.weight": (5632, 2048), f"model.layers.{i}.mlp.up_proj.weight": (5632, 2048),
        f"model.layers.{i}.mlp.down_proj.weight": (2048, 5632)},
        rest={"model.embed_tokens.weight": (32000, 2048), "lm_head.weight": (32000, 2048)}),
}


def _write_shard(path, tensors: dict, dtype: str, rng) -> None:
    """A safetensors file written tensor by tensor (random normal × 0.02), so only one is in memory."""
    size = 4 if dtype == "F32" else 2
    header, offset = {}, 0
    for name, shape in tensors.items():
        n = int(np.prod(shape)) * size
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for shape in tensors.values():
            w = (0.02 * rng.standard_normal(shape, dtype=np.float32))
            f.write(w.tobytes() if dtype == "F32" else (w.view(np.uint32) >> 16).astype("<u2").tobytes())


def write_base(folder: str, size: str, seed: int = 0) -> dict:
    """The random base as shards of about SHARD_BYTES and their index; returns {name: shape}."""
    spec, shapes = SIZES[size], _shapes(size)
    per = 4 if spec["dtype"] == "F32" else 2
    shards, current, used = [], {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * per
        if current and used + n > SHARD_BYTES:
            shards.append(current)
            current, used = {}, 0
        current[name], used = shape, used + n
    shards.append(current)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for k, part in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(os.path.join(folder, file), part, spec["dtype"], rng)
        weight_map.update({n: file for n in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return shapes


def write_adapter(folder: str, size: str, shapes: dict, r: int = 16, seed: int = 1) -> None:
    """A PEFT LoRA folder of rank ``r`` on every adapted module of every block (A ~ N(0, 1/in), B small)."""
    spec = SIZES[size]
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(spec["layers"]):
        for name, shape in spec["block"](i).items():
            out_f, in_f = shape[::-1] if spec["fan_in_fan_out"] else shape
            module = f"base_model.model.{name.removesuffix('.weight')}"
            tensors[f"{module}.lora_A.weight"] = rng.standard_normal((r, in_f), dtype=np.float32) / np.sqrt(in_f)
            tensors[f"{module}.lora_B.weight"] = 0.01 * rng.standard_normal((out_f, r), dtype=np.float32)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    targets = sorted({n.split(".")[-2] for n in spec["block"](0)})
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": targets,
                   "fan_in_fan_out": spec["fan_in_fan_out"], "init_lora_weights": True}, f)


def _shapes(size: str) -> dict:
    spec = SIZES[size]
    shapes = dict(spec["rest"])
    for i in range(spec["layers"]):
        shapes.update(spec["block"](i))
    return shapes


def _peak_rss() -> int:
    """The process's peak resident memory in bytes (VmHWM; unlike ru_maxrss it does not carry a parent's over exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(size: str, adapter: str, base: str) -> dict:
    """One ``analyze_adapter`` run: seconds, tracemalloc peak, peak RSS, and the sizes to compare them with."""
    from minilora.hf import analyze_adapter

    spec, shapes = SIZES[size], _shapes(size)
    per = 4 if spec["dtype"] == "F32" else 2
    rss_before = _peak_rss()
    tracemalloc.start()
    start = time.perf_counter()
    report = analyze_adapter(adapter, base=base)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"size": size, "matrices": len(report["rows"]), "seconds": round(seconds, 2),
            "tracemalloc_peak_bytes": peak, "max_rss_bytes": _peak_rss(),
            "max_rss_before_bytes": rss_before,
            "adapter_bytes": os.path.getsize(os.path.join(adapter, "adapter_model.safetensors")),
            "largest_adapted_matrix_bytes": max(int(np.prod(s)) for s in spec["block"](0).values()) * per,
            "base_bytes": sum(int(np.prod(s)) for s in shapes.values()) * per,
            "parameters": sum(int(np.prod(s)) for s in shapes.values()),
            "shards": len({*json.load(open(os.path.join(base, "model.safetensors.index.json")))["weight_map"].values()}),
            "threads": os.environ.get("OPENBLAS_NUM_THREADS")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), required=True)
    parser.add_argument("--dir", required=True, help="where the base and the adapter are written (reused if there)")
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)  # the fresh process
    args = parser.parse_args(argv)
    base, adapter = os.path.join(args.dir, f"{args.size}-base"), os.path.join(args.dir, f"{args.size}-adapter")
    if args.measure_only:
        print(json.dumps(measure(args.size, adapter, base)))
        return 0
    if not os.path.exists(os.path.join(base, "model.safetensors.index.json")):
        write_base(base, args.size)
    write_adapter(adapter, args.size, _shapes(args.size))
    return subprocess.call([sys.executable, "-m", "benchmarks.analyze_scale", "--size", args.size, "--dir", args.dir,
                            "--measure-only"])


if __name__ == "__main__":
    raise SystemExit(main())
