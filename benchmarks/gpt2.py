"""minilora against Hugging Face ``transformers`` + ``peft`` at GPT-2-124M's shape: ``minilora bench --gpt2``.

    python -m benchmarks.bench --gpt2 --json gpt2.jsonl     # needs pip install -e '.[bench]'

What a user who would otherwise pick ``GPT2LMHeadModel`` + PEFT asks, measured side by side in one
process, interleaved round by round (``minilora.timing.interleaved``), on random weights of GPT-2
small's shape (12 layers, d 768, 12 heads, vocab 50,257, 1,024 positions; nothing is downloaded):

    lora          one LoRA training step (r 8, α 16 on W_q, W_v; AdamW on A, B), batch 4 × 128 tokens
    full          one full fine-tuning step (AdamW on all 124 M parameters), the same batch
    generate-1    greedy decoding of 32 new tokens after a 64-token prompt, KV cache, batch 1
    generate-16   the same for 16 prompts at once
    prefill-1     the prompt's forward alone (batch 1, one new token): subtracted from generate-1 to get
                  the time per decoded token, hence the bandwidth (every weight is read once per token)

Both sides hold the same weights: the transformers model is built from minilora's with
``minilora.hf.to_hf_state`` (the exact bridge), and the PEFT adapter is minilora's, written by
``minilora.hf.save_peft_adapter`` (q and v of a block become one ``c_attn`` LoRA of rank 16 with a
block-structured B) and read by ``PeftModel.from_pretrained``. Before timing, each training mode's
loss and each generation's tokens are compared; a mismatch stops the benchmark.

The figures beside the times:

- MFU: analytic matmul FLOPs per step (``minilora.flops.step_flops``) / time / the float32 sgemm peak
  of (512×768)@(768×3072), the shape of GPT-2's MLP at 512 tokens, timed in the same rounds
  (``PEAK_REPEATS`` products per call, so the sustained rate).
- Bandwidth of batch-1 decoding: the weights' bytes / time per decoded token, next to the gemv
  bandwidth of the (50,257×768) head matrix times a vector (``PEAK_REPEATS`` per call), timed in
  the same rounds.
- Peak memory of LoRA and of full training: each in a fresh Python process (``memory_child``), the
  RSS high-water mark (Linux ``VmHWM``, reset after the model is built) during two training steps,
  less the RSS after the imports. Split by part: weights, gradients, optimizer state (counted from
  the arrays), and the rest (activations, workspace, allocator slack).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minilora import lora
from minilora.flops import step_flops
from minilora.generate import generate
from minilora.hf import save_peft_adapter
from minilora.hf.checkpoint import hf_config, to_hf_state
from minilora.methods import randomize_zero_init
from minilora.models import GPT, GPTConfig
from minilora.tensor import no_grad
from minilora.timing import interleaved, median, paired_ratio, quartiles

from .config import LORA_ALPHA, LORA_B_STD, LORA_R, LORA_TARGETS, LR, BenchError
from .machine import machine_info
from .runners import Runner, adamw_step

__all__ = ["GPT2_124M", "GPT2Setup", "GPT2_MODES", "bench_gpt2", "build_pair", "format_gpt2_table",
           "memory_child", "random_gpt"]

REPO = Path(__file__).resolve().parents[1]
GPT2_124M = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768)
GPT2_MODES = ("lora", "full", "generate-1", "generate-16", "prefill-1")  # generate-N: one per GPT2Setup.gen_batches
HF = "hf"  # the impl name of transformers + PEFT in the rows


@dataclass(frozen=True)
class GPT2Setup:
    """The shapes of the comparison (GPT-2-124M by default; the tests pass a small model)."""

    model: GPTConfig = GPT2_124M
    batch: int = 4
    seq_len: int = 128
    prompt_len: int = 64
    new_tokens: int = 32
    gen_batches: tuple = (1, 16)
    sgemm: tuple = (512, 768, 3072)  # (m, k, n) of the peak's product
    gemv: tuple = (50257, 768)  # the matrix of the bandwidth probe: GPT-2's tied head

    @property
    def flop_config(self) -> GPTConfig:
        return dataclasses.replace(self.model, block_size=self.seq_len)  # FLOPs are counted at the batch's T

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "GPT2Setup":
        d = json.loads(text)
        d["model"] = GPTConfig.from_dict(d["model"])
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def require_hf():
    """torch, transformers, peft, or a BenchError that says how to install them."""
    missing = [m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise BenchError(
            f"--gpt2 compares minilora with transformers + PEFT, and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed here: pip install -e '.[bench]' from the "
            "repository root (torch 2.13 CPU). minilora itself never needs them."
        )
    import peft
    import torch
    import transformers

    transformers.logging.set_verbosity_error()  # no "generation flags" notices in the timed output
    return torch, transformers, peft


# ----------------------------------------------------------------------------- the two models
def random_gpt(cfg: GPTConfig, seed: int) -> GPT:
    """A minilora GPT with random float32 weights of GPT-2's init scales (a fast NumPy draw).

    Biases and LayerNorm parameters get small random values too, so that the agreement check with
    transformers also covers them. ``GPT(cfg)``'s own init draws the same distribution, slower.
    """
    model = GPT(cfg, init_weights=False)
    rng = np.random.default_rng(seed)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name, p in model.named_parameters():
        draw = rng.standard_normal(p.shape, dtype=np.float32)
        if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")):
            p.data[...] = 1.0 + 0.1 * draw
        elif name.endswith(".bias"):
            p.data[...] = 0.02 * draw
        else:
            p.data[...] = (residual_std if name.endswith(("attn.o.weight", "mlp.proj.weight")) else 0.02) * draw
    return model


def with_lora(model: GPT, seed: int) -> GPT:
    """The bench's LoRA (r 8, α 16 on q, v), B drawn N(0, 0.02²) so the adapter changes the output."""
    from minilora import backend as bk

    bk.manual_seed(seed)
    lora.apply_lora(model, lora.LoRAConfig(r=LORA_R, alpha=LORA_ALPHA, target_modules=LORA_TARGETS))
    randomize_zero_init(model, std=LORA_B_STD)
    lora.mark_only_lora_as_trainable(model)
    return model


def hf_gpt2(model: GPT, torch, transformers):
    """``GPT2LMHeadModel`` with ``model``'s base weights (copied, via ``minilora.hf.to_hf_state``)."""
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config(model)))
    state = {k: torch.tensor(v) for k, v in to_hf_state(model).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to transformer.wte.weight
    if missing or unexpected:
        raise BenchError(f"building GPT2LMHeadModel from minilora's weights: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]} (a transformers version with other parameter names?)")
    if hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr():
        raise BenchError("GPT2LMHeadModel's lm_head is not tied to wte: the two models would differ")
    return hf


def hf_peft(model: GPT, torch, transformers, peft):
    """PEFT's LoRA model holding ``model``'s adapter (written and read as a PEFT adapter folder), trainable."""
    base = hf_gpt2(model, torch, transformers)
    with tempfile.TemporaryDirectory() as folder:
        save_peft_adapter(folder, model)
        with warnings.catch_warnings():  # transformers' deprecation notices, raised from inside PEFT
            warnings.simplefilter("ignore", FutureWarning)
            return peft.PeftModel.from_pretrained(base, folder, is_trainable=True)


def _ml_loss(model, idx, targets):
    return model.loss(idx, targets)


def _hf_loss(model, idx, targets, torch):
    logits = model(input_ids=idx, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _param_bytes(params) -> int:
    seen, total = set(), 0
    for p in params:
        key = id(p)
        if key not in seen:
            seen.add(key)
            total += p.nbytes
    return int(total)


def build_pair(mode: str, setup: GPT2Setup, seed: int, torch, transformers, peft, data: dict):
    """(minilora Runner, transformers+PEFT Runner) of one mode, on the same weights and inputs.

    Training runners' ``loss()`` gives the loss on the current weights; generation runners'
    ``loss()`` gives the generated tokens (a list of lists).
    """
    if mode in ("lora", "full"):
        base = random_gpt(setup.model, seed)
        ml = with_lora(base, seed + 1) if mode == "lora" else base
        hf = hf_peft(ml, torch, transformers, peft) if mode == "lora" else hf_gpt2(ml, torch, transformers)
        ml.train()
        hf.train()
        ml_opt, ml_step = adamw_step(ml, data["idx"], data["targets"])
        hf_opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
        idx, targets = data["idx"], data["targets"]
        idx_t, targets_t = torch.as_tensor(idx), torch.as_tensor(targets)

        def hf_step():
            hf_opt.zero_grad(set_to_none=True)
            _hf_loss(hf, idx_t, targets_t, torch).backward()
            hf_opt.step()

        def ml_value():
            with no_grad():
                return float(_ml_loss(ml, idx, targets).item())

        def hf_value():
            with torch.no_grad():
                return float(_hf_loss(hf, idx_t, targets_t, torch))

        trainable = [p for p in hf.parameters() if p.requires_grad]
        ml_info = {"model": ml, "trainable_params": int(sum(p.data.size for p in ml_opt.params)),
                   "total_params": int(sum(p.data.size for _, p in ml.named_parameters())),
                   "optimizer_state_bytes": ml_opt.state_bytes()}
        hf_info = {"model": hf, "trainable_params": int(sum(p.numel() for p in trainable)),
                   "total_params": int(sum(p.numel() for p in hf.parameters()))}
        return (Runner(mode, "minilora", ml_step, ml_value, info=ml_info),
                Runner(mode, HF, hf_step, hf_value, info=hf_info))

    # generation: the base model on both sides, greedy, KV cache, eval mode
    if mode == "prefill-1":
        rows, new = 1, 1
    else:
        rows, new = int(mode.split("-")[1]), setup.new_tokens
    prompts = data["prompts"][:rows]
    if "generation_models" not in data:  # the generation modes share one pair of (unchanging) base models
        base = random_gpt(setup.model, seed)
        data["generation_models"] = (base, hf_gpt2(base, torch, transformers))
    base, hf = data["generation_models"]
    base.eval()
    hf.eval()
    prompts_t = torch.as_tensor(prompts)
    config = transformers.GenerationConfig(max_new_tokens=new, do_sample=False, num_beams=1, use_cache=True,
                                           pad_token_id=0, eos_token_id=None, bos_token_id=None)

    def ml_generate():
        return generate(base, prompts, max_new_tokens=new)

    def hf_generate():
        with torch.no_grad():
            out = hf.generate(input_ids=prompts_t, attention_mask=torch.ones_like(prompts_t), generation_config=config)
        return out[:, prompts.shape[1]:].tolist()

    # the bytes a decoding step reads: every weight (wte twice over: one row in, all of it for the head),
    # except the position table, of which it reads one row
    weights = _param_bytes(p.data for n, p in base.named_parameters() if n != "wpe.weight")
    info = {"new_tokens": new, "rows": rows, "prompt_len": int(prompts.shape[1]), "weight_bytes": weights,
            "trainable_params": 0, "total_params": int(sum(p.data.size for _, p in base.named_parameters()))}
    return (Runner(mode, "minilora", ml_generate, ml_generate, info=dict(info)),
            Runner(mode, HF, hf_generate, hf_generate, info=dict(info)))


def check_pair(mode: str, ml: Runner, hf: Runner, rtol: float = 1e-4) -> dict:
    """The agreement check (not timed): the same loss, or the same greedy tokens; a BenchError if not."""
    a, b = ml.loss(), hf.loss()
    if mode in ("lora", "full"):
        diff = abs(a - b)
        entry = {"minilora": a, HF: b, "abs_diff": diff, "ok": bool(diff <= rtol * max(1.0, abs(b)))}
        if not entry["ok"]:
            raise BenchError(f"[gpt2/{mode}] minilora's loss {a:.6f} and transformers+PEFT's {b:.6f} differ by "
                             f"{diff:.2e}: the two models do not compute the same thing")
        return entry
    same = [x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    first = all(ra[:1] == rb[:1] for ra, rb in zip(a, b))  # decided by the prompt's forward alone
    entry = {"tokens_equal": float(np.mean(same)) if same else 1.0, "first_tokens_equal": first,
             "lengths": [len(r) for r in a], "ok": bool(first and all(len(ra) == len(rb) for ra, rb in zip(a, b)))}
    if not entry["ok"]:
        raise BenchError(f"[gpt2/{mode}] minilora's greedy tokens and transformers' differ from the first token "
                         f"(or in length): {a[0][:8]} vs {b[0][:8]}; the models do not compute the same thing")
    return entry


# ----------------------------------------------------------------------------- peak runners
# Each peak call repeats its product: one product of a few ms, timed alone right after a long step,
# measures the BLAS threads waking up and the caches refilling more than the sustained rate.
PEAK_REPEATS = 20


def _sgemm_runner(shape):
    m, k, n = shape
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    out = np.empty((m, n), dtype=np.float32)

    def call():
        for _ in range(PEAK_REPEATS):
            np.matmul(a, b, out=out)

    return Runner("sgemm", "numpy", call, info={"flops": PEAK_REPEATS * 2 * m * k * n})


def _torch_sgemm_runner(shape, torch):
    m, k, n = shape
    a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)

    def call():
        for _ in range(PEAK_REPEATS):
            torch.matmul(a, b, out=out)

    return Runner("sgemm", "torch", call, info={"flops": PEAK_REPEATS * 2 * m * k * n})


def _gemv_runner(shape):
    rows, cols = shape
    rng = np.random.default_rng(1)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    x = rng.standard_normal(cols, dtype=np.float32)
    out = np.empty(rows, dtype=np.float32)

    def call():
        for _ in range(PEAK_REPEATS):
            np.matmul(w, x, out=out)

    return Runner("gemv", "numpy", call, info={"bytes": PEAK_REPEATS * int(w.nbytes)})


# ----------------------------------------------------------------------------- memory, in fresh processes
def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"/proc/self/status has no {field}")


def _release_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back, so RSS is the live memory
    except (OSError, AttributeError):
        pass


def memory_child(impl: str, mode: str, setup: GPT2Setup, seed: int = 0) -> dict:
    """Peak memory of ``steps`` training steps of one (impl, mode), measured in THIS process (a fresh one).

    RSS after the imports, then the model and optimizer are built, the building's leftovers freed,
    the high-water mark reset (``/proc/self/clear_refs``), two steps run; the peak is
    VmHWM − the RSS after the imports, so it holds weights, gradients, optimizer state and activations.
    """
    torch = transformers = peft = None
    if impl == HF:
        torch, transformers, peft = require_hf()
    _release_freed_memory()
    rss_imports = _proc_status("VmRSS")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, setup.model.vocab_size, (setup.batch, setup.seq_len))
    targets = rng.integers(0, setup.model.vocab_size, (setup.batch, setup.seq_len))
    ml = random_gpt(setup.model, seed)
    if mode == "lora":
        ml = with_lora(ml, seed + 1)
    if impl == "minilora":
        ml.train()
        opt, step = adamw_step(ml, idx, targets)

        weights = _param_bytes(p.data for _, p in ml.named_parameters())
        trainable = [p.data for p in opt.params]
        state_bytes = opt.state_bytes
    else:
        model = hf_peft(ml, torch, transformers, peft) if mode == "lora" else hf_gpt2(ml, torch, transformers)
        del ml
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
        idx_t, targets_t = torch.as_tensor(idx), torch.as_tensor(targets)

        def step():
            opt.zero_grad(set_to_none=True)
            _hf_loss(model, idx_t, targets_t, torch).backward()
            opt.step()

        weights = int(sum(p.numel() * p.element_size() for p in model.parameters()))
        trainable = [p.detach().numpy() for p in params]

        def state_bytes():
            return int(sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                           if torch.is_tensor(v)))
    _release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError as exc:
        raise BenchError(f"cannot reset the RSS high-water mark (/proc/self/clear_refs: {exc}); "
                         "the memory figures need Linux") from exc
    rss_built = _proc_status("VmRSS")
    for _ in range(2):
        step()
    peak = _proc_status("VmHWM")
    grads = _param_bytes(trainable)
    state = int(state_bytes())
    total = peak - rss_imports
    return {"impl": impl, "mode": mode, "rss_after_imports": rss_imports, "rss_built": rss_built, "vm_hwm": peak,
            "peak_bytes": total, "weight_bytes": weights, "gradient_bytes": grads, "optimizer_state_bytes": state,
            "activation_and_other_bytes": total - weights - grads - state}


def measure_memory(setup: GPT2Setup, seed: int, threads: int | None, log=print) -> dict:
    """{(impl, mode): memory_child's dict}, each from its own Python process."""
    out = {}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if threads:
        env["OPENBLAS_NUM_THREADS"] = str(threads)
    for impl in ("minilora", HF):
        for mode in ("lora", "full"):
            cmd = [sys.executable, "-m", "benchmarks.gpt2", "--memory-child", impl, mode, "--setup", setup.to_json(),
                   "--seed", str(seed)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, check=False)
            if proc.returncode != 0:
                raise BenchError(f"[gpt2] the memory run of {impl}/{mode} failed (exit {proc.returncode}): "
                                 f"{proc.stderr.strip()[-800:]}")
            out[(impl, mode)] = json.loads(proc.stdout.strip().splitlines()[-1])
            log(f"[gpt2] peak memory {impl}/{mode}: {out[(impl, mode)]['peak_bytes'] / 1e9:.2f} GB")
    return out


# ----------------------------------------------------------------------------- the run
def bench_gpt2(setup: GPT2Setup = GPT2Setup(), *, repeats: int = 5, warmup: int = 1, seed: int = 0,
               memory: bool = True, threads: int | None = None, log=print) -> list:
    """Build, check, warm up and time every mode on both sides; return the JSON rows."""
    torch, transformers, peft = require_hf()
    m = setup.model
    rng = np.random.default_rng(seed)
    data = {"idx": rng.integers(0, m.vocab_size, (setup.batch, setup.seq_len)),
            "targets": rng.integers(0, m.vocab_size, (setup.batch, setup.seq_len)),
            "prompts": rng.integers(0, m.vocab_size, (max(setup.gen_batches), setup.prompt_len))}
    modes = ["lora", "full"] + [f"generate-{b}" for b in setup.gen_batches] + ["prefill-1"]
    log(f"[gpt2] building {', '.join(modes)}: minilora and transformers {transformers.__version__} + peft "
        f"{peft.__version__} (d {m.d_model}, {m.n_layer} layers, {m.n_head} heads, vocab {m.vocab_size}; "
        f"training batch {setup.batch} × {setup.seq_len}, generation {setup.prompt_len} + {setup.new_tokens} tokens)")
    pairs, checks = {}, {}
    for mode in modes:
        pairs[mode] = build_pair(mode, setup, seed, torch, transformers, peft, data)
        checks[mode] = check_pair(mode, *pairs[mode])
        gc.collect()
    peaks = [_sgemm_runner(setup.sgemm), _torch_sgemm_runner(setup.sgemm, torch), _gemv_runner(setup.gemv)]
    order = [r for mode in modes for r in pairs[mode]] + peaks
    log(f"[gpt2] timing {len(order)} runners × {repeats} rounds (interleaved)")
    times = interleaved({i: r.call for i, r in enumerate(order)}, repeats, warmup=warmup, before_round=gc.collect)
    for i, r in enumerate(order):
        r.times = times[i]
    sgemm, torch_sgemm, gemv = peaks
    peak = sgemm.info["flops"] / median(sgemm.times)
    torch_peak = torch_sgemm.info["flops"] / median(torch_sgemm.times)
    gemv_bw = gemv.info["bytes"] / median(gemv.times)
    log(f"[gpt2] sgemm {setup.sgemm[0]}×{setup.sgemm[1]} @ {setup.sgemm[1]}×{setup.sgemm[2]}: NumPy "
        f"{peak / 1e9:.0f} GFLOP/s, torch {torch_peak / 1e9:.0f} GFLOP/s; gemv {setup.gemv[0]}×{setup.gemv[1]}: "
        f"{gemv_bw / 1e9:.1f} GB/s")
    mem = measure_memory(setup, seed, threads, log) if memory else {}

    machine = machine_info()
    machine["transformers"], machine["peft"] = transformers.__version__, peft.__version__
    rows = []
    for mode in modes:
        for impl, r in zip(("minilora", HF), pairs[mode]):
            med = median(r.times)
            q1, q3 = quartiles(r.times)
            row = {"config": "gpt2", "mode": mode, "impl": impl,
                   "backend": "numpy" if impl == "minilora" else "torch-cpu", "batch": setup.batch,
                   "seq_len": setup.seq_len, "d_model": m.d_model, "n_layer": m.n_layer, "n_head": m.n_head,
                   "vocab_size": m.vocab_size, "repeats": len(r.times), "warmup": warmup,
                   "median_ms": med * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "min_ms": min(r.times) * 1e3,
                   "iqr_rel": (q3 - q1) / med if med else None,
                   "matmul_peak_gflops": peak / 1e9, "matmul_peak_shape": list(setup.sgemm),
                   "torch_matmul_peak_gflops": torch_peak / 1e9, "gemv_gb_per_s": gemv_bw / 1e9,
                   "gemv_shape": list(setup.gemv),
                   "trainable_params": r.info.get("trainable_params"), "total_params": r.info.get("total_params"),
                   "check": checks[mode], "relative": {}, "machine": machine}
            other = pairs[mode][1] if impl == "minilora" else pairs[mode][0]
            row["ratio_vs_hf"] = paired_ratio(r.times, other.times) if impl == "minilora" else None
            if mode in ("lora", "full"):
                flops = step_flops(setup.flop_config, setup.batch, LORA_TARGETS if mode == "lora" else None,
                                   LORA_R if mode == "lora" else 0)
                row.update(tokens_per_step=setup.batch * setup.seq_len, flops_per_step=flops,
                           achieved_gflops=flops / med / 1e9, mfu=flops / med / peak,
                           tokens_per_s=setup.batch * setup.seq_len / med)
                if (impl, mode) in mem:
                    row["memory"] = mem[(impl, mode)]
                if mode == "lora":
                    side = 0 if impl == "minilora" else 1
                    row["relative"]["speedup_vs_full"] = paired_ratio(pairs["full"][side].times, r.times)
                    if ("minilora" if side == 0 else HF, "full") in mem and (impl, "lora") in mem:
                        row["relative"]["peak_memory_full_vs_lora"] = (
                            mem[(impl, "full")]["peak_bytes"] / mem[(impl, "lora")]["peak_bytes"])
            else:
                rows_, new = r.info["rows"], r.info["new_tokens"]
                row.update(batch=rows_, prompt_len=r.info["prompt_len"], new_tokens=new,
                           tokens_per_s=rows_ * new / med)
            rows.append(row)
    _decode_bandwidth(rows, pairs, setup, gemv_bw)
    return rows


def _decode_bandwidth(rows, pairs, setup, gemv_bw) -> None:
    """Batch-1 decoding: (generate-1 − prefill-1) / (new_tokens − 1) per token; weights read / that time."""
    if "generate-1" not in pairs or setup.new_tokens < 2:
        return
    for side, impl in enumerate(("minilora", HF)):
        gen, pre = pairs["generate-1"][side], pairs["prefill-1"][side]
        per_token = (median(gen.times) - median(pre.times)) / (setup.new_tokens - 1)
        weights = gen.info["weight_bytes"]
        for row in rows:
            if row["mode"] == "generate-1" and row["impl"] == impl:
                row["decode_ms_per_token"] = per_token * 1e3
                row["weight_bytes"] = weights
                row["decode_gb_per_s"] = weights / per_token / 1e9 if per_token > 0 else None
                row["decode_bandwidth_vs_gemv"] = weights / per_token / gemv_bw if per_token > 0 else None


# ----------------------------------------------------------------------------- the report
def format_gpt2_table(rows) -> str:
    by = {(r["mode"], r["impl"]): r for r in rows if r["config"] == "gpt2"}
    if not by:
        return ""
    any_row = next(iter(by.values()))
    head = (f"{'gpt2 mode':<12} {'minilora ms':>11} {'±IQR':>5} {'hf ms':>9} {'±IQR':>5} {'ml/hf':>6} "
            f"{'MFU ml':>7} {'MFU hf':>7} {'tok/s ml':>9} {'tok/s hf':>9} {'peak mem ml':>11} {'peak mem hf':>11}")
    lines = [head, "-" * len(head)]
    modes = list(dict.fromkeys(r["mode"] for r in rows if r["config"] == "gpt2"))
    for mode in modes:
        a, b = by.get((mode, "minilora")), by.get((mode, HF))
        if a is None or b is None:
            continue
        mfu = lambda r: f"{100 * r['mfu']:>6.1f}%" if "mfu" in r else f"{'-':>7}"
        memo = lambda r: f"{r['memory']['peak_bytes'] / 1e9:>8.2f} GB" if "memory" in r else f"{'-':>11}"
        lines.append(f"{mode:<12} {a['median_ms']:>11.1f} {100 * (a['iqr_rel'] or 0):>4.0f}% {b['median_ms']:>9.1f} "
                     f"{100 * (b['iqr_rel'] or 0):>4.0f}% {a['ratio_vs_hf']:>6.2f} {mfu(a)} {mfu(b)} "
                     f"{a['tokens_per_s']:>9.0f} {b['tokens_per_s']:>9.0f} {memo(a)} {memo(b)}")
    lines.append("")
    lines.append(f"sgemm peak {any_row['matmul_peak_shape']}: NumPy {any_row['matmul_peak_gflops']:.0f} GFLOP/s "
                 f"(torch {any_row['torch_matmul_peak_gflops']:.0f}); gemv {any_row['gemv_gb_per_s']:.1f} GB/s")
    for impl in ("minilora", HF):
        g = by.get(("generate-1", impl))
        if g and g.get("decode_gb_per_s"):
            lines.append(f"batch-1 decoding, {impl}: {g['decode_ms_per_token']:.1f} ms/token, reads "
                         f"{g['weight_bytes'] / 1e6:.0f} MB of weights per token at {g['decode_gb_per_s']:.1f} GB/s "
                         f"({100 * g['decode_bandwidth_vs_gemv']:.0f} % of gemv)")
        lo = by.get(("lora", impl))
        if lo and lo["relative"]:
            rel = lo["relative"]
            parts = [f"full/lora step time {rel['speedup_vs_full']:.2f}×"]
            if "peak_memory_full_vs_lora" in rel:
                parts.append(f"peak memory full/lora {rel['peak_memory_full_vs_lora']:.2f}×")
            lines.append(f"{impl}: " + "; ".join(parts))
    checks = [(mode, by[(mode, "minilora")]["check"]) for mode in modes if (mode, "minilora") in by]
    lines.append("agreement: " + ", ".join(
        f"{mode} |Δloss| {c['abs_diff']:.1e}" if "abs_diff" in c else f"{mode} tokens equal {100 * c['tokens_equal']:.0f} %"
        for mode, c in checks))
    return "\n".join(lines)


def _child_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpt2", description="one memory measurement (internal)")
    p.add_argument("--memory-child", nargs=2, metavar=("IMPL", "MODE"), required=True)
    p.add_argument("--setup", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    impl, mode = args.memory_child
    if impl not in ("minilora", HF) or mode not in ("lora", "full") or not re.match(r"^\{", args.setup):
        p.error("IMPL is minilora or hf, MODE lora or full, --setup a GPT2Setup as JSON")
    print(json.dumps(memory_child(impl, mode, GPT2Setup.from_json(args.setup), args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
