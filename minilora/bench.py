"""Benchmarks: step time, throughput, FLOPs, MFU and memory of minilora's GPT, optionally next to PyTorch.

    python -m minilora.bench                              # tiny + medium, every mode
    python -m minilora.bench --configs tiny --modes full,lora --compare-torch --json bench.jsonl
    minilora bench --quick                                # the same through the CLI (a short run)

What is measured, per (config, mode):

    full          one training step: forward, loss, backward, AdamW on every parameter (eq. 1)
    lora          one training step with LoRA r=8 on W_q, W_v: only A and B train (eq. 2)
    infer         a forward pass of the base model under ``no_grad``
    merged        the same after ``lora.merge``: W = W0 + s·B A, a plain Linear (no extra latency)
    unmerged      LoRA kept apart: W0 x + s·B A x in every adapted layer
    mixed16       a batch that mixes tasks: 16 adapters are loaded, the rows are split into
                  min(batch, 16) contiguous groups, group j uses adapter j, all in one
                  ``model(idx, adapter_ids=[...])`` (tiny, batch 16: 16 adapters, one row each;
                  medium, batch 8: the 16 are loaded, 8 of them are in the batch, one row each)
    mixed16-loop  the reference mixed16 is compared with: one forward per adapter, on its rows only

Every (mode, implementation) of a config is built first, warmed up, then timed in rounds: each
round runs every one of them once, in a rotated order, so minilora and PyTorch (``--compare-torch``)
alternate and see the same machine load. Reported: medians over the rounds, and ratios as the
median of the per-round ratios (minilora / torch, lora / full, mixed16 / infer, ...), never single
runs — the development machine has 2 cores and is shared.

Other figures: FLOPs per step (matmuls only, counted analytically: ``step_flops``), MFU against a
float32 (1024×1024)@(1024×1024) matmul peak measured in the same rounds on the same backend,
optimizer-state bytes (``optimizer.state_bytes()``), and peak memory of one extra step under
tracemalloc (separate from the timed steps, which tracemalloc would slow down).

Before timing, with ``--compare-torch``, the loss of every mode is computed by both
implementations on the same weights and batch and must agree to 1e-4 (float32): the timings
compare the same computation. PyTorch is imported only here, lazily, and only under
``--compare-torch``; the PyTorch model lives in ``benchmarks/torch_reference.py`` of a source
checkout.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import backend as bk
from . import functional as F
from . import optim
from .models import GPT, GPTConfig
from .tensor import no_grad

__all__ = [
    "CONFIGS",
    "MODES",
    "BenchConfig",
    "BenchError",
    "blas_threads",
    "forward_flops",
    "main",
    "matmul_peak",
    "run",
    "step_flops",
]

# ----------------------------------------------------------------------------- what is benchmarked


@dataclass(frozen=True)
class BenchConfig:
    name: str
    model: GPTConfig
    batch: int

    @property
    def tokens(self) -> int:
        return self.batch * self.model.block_size


CONFIGS = {
    "tiny": BenchConfig("tiny", GPTConfig(vocab_size=96, block_size=64, n_layer=4, n_head=4, d_model=128), batch=16),
    "medium": BenchConfig("medium", GPTConfig(vocab_size=96, block_size=128, n_layer=4, n_head=8, d_model=512), batch=8),
}
MODES = ("full", "lora", "infer", "merged", "unmerged", "mixed16", "mixed16-loop")
TRAIN_MODES = ("full", "lora")
LORA_R, LORA_ALPHA, LORA_TARGETS = 8, 16.0, ("q", "v")
N_ADAPTERS = 16
LORA_B_STD = 0.02  # B starts at 0 in LoRA; here it is random so that the LoRA path changes the output
LOSS_RTOL = 1e-4  # |loss_minilora − loss_torch| <= LOSS_RTOL · max(1, |loss_torch|)
LR = 1e-4


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked (missing PyTorch, a failed agreement check, ...)."""


# ----------------------------------------------------------------------------- FLOPs
_LAYER_LINEARS = (("q", 1, 1), ("k", 1, 1), ("v", 1, 1), ("o", 1, 1), ("fc", 1, 4), ("proj", 4, 1))  # (name, in/d, out/d)


def forward_flops(cfg: GPTConfig, batch: int, lora_targets=(), r: int = 0, seq_len: int | None = None) -> int:
    """Matmul FLOPs of one forward pass (2·m·n·k per (m×k)@(k×n) product), with N = batch·T tokens.

        per layer:  q, k, v, o            4 · 2·N·d·d
                    fc (d→4d), proj        2 · 2·N·d·4d            (together 24·N·d²)
                    q kᵀ and P v           2 · 2·N·T·d             (all T×T scores: the causal mask
                                                                    is added, not skipped)
        LM head:    2·N·d·V
        LoRA:       2·N·r·(d_in + d_out) per adapted matrix        (x Aᵀ, then u Bᵀ; 4·N·d·r for q, v)

        F = L·(24·N·d² + 4·N·T·d) + 2·N·d·V  [+ L·|targets|·4·N·d·r]

    The embedding lookups, LayerNorm, GELU, softmax and the loss are not matmuls and are not counted.
    A mixed batch (each row through its own adapter) and the loop over adapters count the same: every
    row goes through W0 and through one adapter.
    """
    T = seq_len or cfg.block_size
    N, d, V, L = batch * T, cfg.d_model, cfg.vocab_size, cfg.n_layer
    per_layer = 24 * N * d * d + 4 * N * T * d
    lora = sum(2 * N * r * (i + o) * d for name, i, o in _LAYER_LINEARS if name in lora_targets)
    return L * (per_layer + lora) + 2 * N * d * V


def step_flops(cfg: GPTConfig, batch: int, lora_targets=None, r: int = 0, seq_len: int | None = None) -> int:
    """Matmul FLOPs of one training step: forward + backward (the AdamW update is elementwise: 0).

    Full fine-tuning (``lora_targets=None``): every product y = x W has two gradients of its own cost,
    dx = g W and dW = gᵀ x, and each attention product two input gradients (dq, dk; dP, dv):

        full = 3 · F

    LoRA (W0, embeddings and LayerNorms frozen; only A, B train) skips every dW0 and every gradient
    nobody needs. With N = batch·T and a LoRA'd matrix (d_in → d_out):

        base Linear:   forward + dx                        = 2 × its forward
                       (forward only where its input needs no gradient: in layer 0 the input of
                       q, k, v is LayerNorm(frozen embeddings))
        LM head:       forward + dx (wte is frozen)        = 2 × 2·N·d·V
        attention:     forward q kᵀ and P v, then dP, dv, dq, dk (2·N·T·d each); dk only if k needs a
                       gradient (not in layer 0 when k is not adapted), dv / dq likewise
        adapter:       forward x Aᵀ, u Bᵀ; backward g B, dA = (g B)ᵀ x, dB = gᵀ u (2·N·r·d each, for
                       d_in = d_out = d), and (g B) A for dx where the input needs a gradient

    For r=8 on q, v (the ``lora`` mode) this is

        lora = 2·L·24·N·d² − 3·2·N·d²           (layer 0: no dx for q, k, v)
             + 2·2·N·d·V
             + L·6·2·N·T·d − 2·N·T·d            (layer 0: no dk)
             + 2·(L·12·N·d·r − 2·N·d·r)         (layer 0: no low-rank dx)

    Computed here by walking the layers and tracking which activations need a gradient — what both
    autograd engines (minilora's ``needs_input_grad``, PyTorch's) actually compute. minilora's
    embedding backward (a one-hot matmul, ``F.embedding``) is an implementation detail, not counted.
    """
    T = seq_len or cfg.block_size
    N, d, V, L = batch * T, cfg.d_model, cfg.vocab_size, cfg.n_layer
    if lora_targets is None:
        return 3 * forward_flops(cfg, batch, seq_len=T)
    targets = set(lora_targets)
    unknown = targets - {name for name, _, _ in _LAYER_LINEARS}
    if unknown:
        raise ValueError(f"step_flops: unknown LoRA targets {sorted(unknown)}")
    att = 2 * N * T * d  # one attention product (q kᵀ, P v, or one of their gradients)
    total = 0
    x_grad = False  # does the residual stream entering this layer need a gradient? (embeddings frozen)

    def linear(name, i, o, input_grad):
        """forward + dx (if needed) + the adapter's products; returns (flops, output needs grad)."""
        base = 2 * N * (i * d) * (o * d)
        flops = base * (2 if input_grad else 1)
        adapted = name in targets
        if adapted:
            low = 2 * N * r * d  # one of the thin products, for d_in = i·d, d_out = o·d
            xa, ub = low * i, low * o
            flops += xa + ub  # forward
            flops += ub + ub + xa  # g B (N×d_out @ d_out×r), dB = gᵀ u, dA = (gB)ᵀ x
            if input_grad:
                flops += xa  # (g B) A for dx
        return flops, input_grad or adapted

    for _ in range(L):
        fl_q, q_g = linear("q", 1, 1, x_grad)
        fl_k, k_g = linear("k", 1, 1, x_grad)
        fl_v, v_g = linear("v", 1, 1, x_grad)
        total += fl_q + fl_k + fl_v
        total += 2 * att  # forward: scores and P v
        total += att * (int(q_g or k_g) + int(v_g) + int(q_g) + int(k_g))  # dP, dv, dq, dk
        y_g = q_g or k_g or v_g
        fl_o, o_g = linear("o", 1, 1, y_g)
        x_grad = x_grad or o_g
        fl_fc, fc_g = linear("fc", 1, 4, x_grad)
        fl_proj, proj_g = linear("proj", 4, 1, fc_g)
        total += fl_o + fl_fc + fl_proj
        x_grad = x_grad or proj_g
    total += 2 * N * d * V * (2 if x_grad else 1)  # tied head: dx only (wte frozen)
    return total


def mode_flops(cfg: BenchConfig, mode: str) -> int:
    m, b = cfg.model, cfg.batch
    if mode == "full":
        return step_flops(m, b)
    if mode == "lora":
        return step_flops(m, b, LORA_TARGETS, LORA_R)
    if mode in ("infer", "merged"):
        return forward_flops(m, b)
    return forward_flops(m, b, LORA_TARGETS, LORA_R)  # unmerged, mixed16, mixed16-loop


# ----------------------------------------------------------------------------- the machine
def blas_threads() -> dict:
    """What NumPy's BLAS uses: {'library', 'threads', 'OPENBLAS_NUM_THREADS', ...}.

    NumPy's OpenBLAS fixes its thread count when it loads (from OPENBLAS_NUM_THREADS, else the
    number of cores); it is read here through OpenBLAS's own C API, found among the loaded
    libraries (Linux), with ``None`` where that is not possible.
    """
    info = {"library": None, "threads": None}
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    lib = _openblas()
    if lib is not None:
        info["library"] = "openblas"
        getter = _openblas_fn(lib, "get_num_threads")
        if getter is not None:
            getter.restype = ctypes.c_int
            info["threads"] = int(getter())
    return info


_OPENBLAS = []


def _openblas():
    if not _OPENBLAS:
        lib = None
        try:
            with open("/proc/self/maps") as f:
                paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
            for path in paths:
                try:
                    candidate = ctypes.CDLL(path)
                except OSError:
                    continue
                if _openblas_fn(candidate, "get_num_threads") is not None:
                    lib = candidate
                    break
        except OSError:  # not Linux
            pass
        _OPENBLAS.append(lib)
    return _OPENBLAS[0]


def _openblas_fn(lib, what):
    for prefix in ("scipy_openblas_", "openblas_"):
        for suffix in ("64_", ""):
            fn = getattr(lib, f"{prefix}{what}{suffix}", None)
            if fn is not None:
                return fn
    return None


def set_blas_threads(n: int) -> bool:
    """Set NumPy's OpenBLAS thread count (True), or say it cannot be done here (False)."""
    lib = _openblas()
    setter = _openblas_fn(lib, "set_num_threads") if lib is not None else None
    if setter is None:
        return False
    setter.argtypes = [ctypes.c_int]
    setter(int(n))
    return True


def _sync(backend: str) -> None:
    if backend == "cupy":
        bk.module_for("cupy").cuda.get_current_stream().synchronize()


PEAK_N, PEAK_MATMULS = 1024, 3  # the peak runner: 3 float32 (1024×1024)@(1024×1024) products per round


def _peak_runner(backend: str) -> Runner:
    a = bk.random_normal((PEAK_N, PEAK_N), np.float32, backend=backend)
    b = bk.random_normal((PEAK_N, PEAK_N), np.float32, backend=backend)

    def step():
        for _ in range(PEAK_MATMULS):
            a @ b

    return Runner("matmul-peak", "minilora", step, sync=(lambda: _sync(backend)) if backend == "cupy" else None)


def _torch_peak_runner(device: str) -> Runner:
    import torch

    a = torch.randn(PEAK_N, PEAK_N, device=device)
    b = torch.randn(PEAK_N, PEAK_N, device=device)

    def step():
        for _ in range(PEAK_MATMULS):
            a @ b

    return Runner("matmul-peak", "torch", step, sync=torch.cuda.synchronize if device != "cpu" else None)


def matmul_peak(backend: str = "numpy", n: int = 1024, repeats: int = 7) -> float:
    """FLOP/s of a float32 (n×n)@(n×n) matmul on ``backend``: the median of ``repeats`` timed runs."""
    a = bk.random_normal((n, n), np.float32, backend=backend)
    b = bk.random_normal((n, n), np.float32, backend=backend)
    a @ b
    _sync(backend)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        _sync(backend)
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times)


# ----------------------------------------------------------------------------- PyTorch, lazily
def _load_torch_reference():
    """Import torch and ``benchmarks/torch_reference.py`` (only under --compare-torch)."""
    if importlib.util.find_spec("torch") is None:
        raise BenchError(
            "--compare-torch needs PyTorch, which is not installed here (pip install torch). "
            "minilora itself never needs it; run without --compare-torch to benchmark minilora alone."
        )
    name = "minilora_bench_torch_reference"
    if name in sys.modules:
        return sys.modules[name]
    here = Path(__file__).resolve().parent
    candidates = [here.parent / "benchmarks" / "torch_reference.py", Path.cwd() / "benchmarks" / "torch_reference.py"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise BenchError(
            "--compare-torch needs benchmarks/torch_reference.py from a source checkout of minilora "
            f"(looked in {', '.join(str(p.parent) for p in candidates)}); run the benchmark from the repository root"
        )
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- runners
@dataclass
class Runner:
    """One thing to time: ``step()`` runs one (config, mode, impl) step; ``loss()`` is for the check."""

    mode: str
    impl: str  # "minilora" or "torch"
    step: object
    loss: object = None  # () -> float, for the agreement check (not timed)
    sync: object = None
    memory: object = None  # () -> dict, one extra step under tracemalloc (minilora only)
    info: dict = field(default_factory=dict)
    times: list = field(default_factory=list)

    def timed(self) -> float:
        t0 = time.perf_counter()
        self.step()
        if self.sync is not None:
            self.sync()
        dt = time.perf_counter() - t0
        self.times.append(dt)
        return dt


def _lora_config():
    from .lora import LoRAConfig

    return LoRAConfig(r=LORA_R, alpha=LORA_ALPHA, target_modules=LORA_TARGETS)


def _adapter_names(n=N_ADAPTERS):
    return [f"task{i:02d}" for i in range(n)]


def _add_adapters(model, names, seed: int):
    """apply_lora once per adapter name, then give every B random values (B = 0 would make LoRA a no-op).

    Seeded, so every model built with the same names and seed holds the same adapters.
    """
    from . import lora

    bk.manual_seed(seed)  # A's init draws from minilora's generator
    cfg = _lora_config()
    for name in names:
        lora.apply_lora(model, cfg, adapter_name=name)
    rng = np.random.default_rng(seed)
    for pname, p in model.named_parameters():
        if ".lora_B." in pname:
            p.data[...] = bk.asarray(rng.normal(0.0, LORA_B_STD, size=p.shape), dtype=p.dtype, backend=p.backend)
    return model


def _lora_arrays(model, names) -> dict:
    """{module path: [(A, B) per adapter in ``names`` order]} as host arrays (for the torch model)."""
    A, Bm = {}, {}
    for pname, p in model.named_parameters():
        path, kind, adapter = pname.rsplit(".", 2) if pname.count(".") >= 2 else (None, None, None)
        if kind == "lora_A":
            A[(path, adapter)] = bk.to_numpy(p.data)
        elif kind == "lora_B":
            Bm[(path, adapter)] = bk.to_numpy(p.data)
    paths = sorted({path for path, _ in A})
    return {path: [(A[(path, n)], Bm[(path, n)]) for n in names] for path in paths}


def _param_bytes(model) -> int:
    seen, total = set(), 0
    for _, p in model.named_parameters():
        if id(p.data) not in seen:
            seen.add(id(p.data))
            total += p.data.nbytes
    return int(total)


def _host_float(a) -> float:
    return float(bk.to_numpy(a))  # to_numpy takes Tensors; a device array's .data is its memory


def _groups(batch: int, names):
    """Rows split into min(batch, len(names)) contiguous groups, group j using adapter j.

    Returns adapter_ids (one name per row) and [(adapter index, name, rows)] in row order. With
    batch <= 16 every row is its own group (tiny: 16 adapters, one row each; medium: 8 of them).
    """
    used = min(batch, len(names))
    ids = [names[i * used // batch] for i in range(batch)]
    groups = []
    for j, name in enumerate(names[:used]):
        rows = [i for i in range(batch) if ids[i] == name]
        groups.append((j, name, rows))
    return ids, groups


def _ml_runners(bc: BenchConfig, modes, base: GPT, idx, targets, backend: str, seed: int) -> dict:
    """The minilora side of every mode: {mode: Runner}."""
    from . import lora

    sync = (lambda: _sync(backend)) if backend == "cupy" else None
    runners = {}

    def forward_loss(model, adapter_ids=None):
        with no_grad():
            return _host_float(F.cross_entropy(model(idx, adapter_ids=adapter_ids), targets))

    def memory_of(step, model, opt=None):
        def measure():
            gc.collect()
            state = opt.state_bytes() if opt is not None else 0
            params = _param_bytes(model)
            if backend == "cupy":  # tracemalloc sees host memory only: report CuPy's pool after a step instead
                pool = bk.module_for("cupy").get_default_memory_pool()
                step()
                _sync(backend)
                return {"step_peak_bytes": None, "param_bytes": params, "peak_memory_bytes": int(pool.total_bytes())}
            tracemalloc.start()
            try:
                tracemalloc.reset_peak()
                step()
                _, step_bytes = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            return {"step_peak_bytes": int(step_bytes), "param_bytes": params,
                    "peak_memory_bytes": int(step_bytes) + params + state}
        return measure

    def train_runner(mode, model):
        model.to(backend=backend)
        model.train()
        if mode == "lora":
            lora.mark_only_lora_as_trainable(model)
        opt = optim.AdamW(model.named_parameters(), lr=LR, weight_decay=0.01)

        def step():
            opt.zero_grad()
            loss = model.loss(idx, targets)
            loss.backward()
            opt.step()

        def loss_only():
            with no_grad():
                return _host_float(model.loss(idx, targets))

        info = {"optimizer_state_bytes": opt.state_bytes(),
                "trainable_params": int(sum(p.data.size for p in opt.params)),
                "total_params": int(sum(p.data.size for _, p in model.named_parameters()))}
        return Runner(mode, "minilora", step, loss_only, sync, memory_of(step, model, opt), info)

    def infer_runner(mode, model, adapter_ids=None, loop_groups=None):
        model.to(backend=backend)
        model.eval()
        if loop_groups is None:
            def step():
                with no_grad():
                    model(idx, adapter_ids=adapter_ids)

            def loss_only():
                return forward_loss(model, adapter_ids)
        else:
            def step():
                with no_grad():
                    for _, name, rows in loop_groups:
                        model(idx[rows[0]:rows[-1] + 1], adapter_ids=[name] * len(rows))

            def loss_only():  # the loop's logits, put back in row order
                with no_grad():
                    parts = [bk.to_numpy(model(idx[rows[0]:rows[-1] + 1], adapter_ids=[name] * len(rows)).data)
                             for _, name, rows in loop_groups]
                logits = bk.asarray(np.concatenate(parts, axis=0), backend=backend)
                return _host_float(F.cross_entropy(logits, targets))
        info = {"optimizer_state_bytes": 0, "trainable_params": 0,
                "total_params": int(sum(p.data.size for _, p in model.named_parameters()))}
        return Runner(mode, "minilora", step, loss_only, sync, memory_of(step, model), info)

    names = _adapter_names()
    lora_sources = {}  # mode -> the adapters' starting (A, B), host copies, for the PyTorch side
    shared = {}
    for mode in modes:
        if mode == "full":
            runners[mode] = train_runner(mode, copy.deepcopy(base))
        elif mode == "infer":
            runners[mode] = infer_runner(mode, copy.deepcopy(base))
        elif mode in ("lora", "merged", "unmerged"):
            model = _add_adapters(copy.deepcopy(base), ["default"], seed + 1)
            lora_sources[mode] = _lora_arrays(model, ["default"])
            if mode == "lora":
                runners[mode] = train_runner(mode, model)
            else:
                if mode == "merged":
                    lora.merge(model)
                runners[mode] = infer_runner(mode, model)
        elif mode in ("mixed16", "mixed16-loop"):
            if "mixed" not in shared:  # both modes run no_grad forwards: one model serves them
                shared["mixed"] = _add_adapters(copy.deepcopy(base), names, seed + 2)
                shared["mixed_arrays"] = _lora_arrays(shared["mixed"], names)
            model = shared["mixed"]
            lora_sources[mode] = shared["mixed_arrays"]
            ids, groups = _groups(bc.batch, names)
            r = infer_runner(mode, model, adapter_ids=ids if mode == "mixed16" else None,
                             loop_groups=groups if mode == "mixed16-loop" else None)
            r.info.update(n_adapters=len(names), adapters_in_batch=len(groups))
            runners[mode] = r
    return runners, lora_sources


def _torch_runners(bc: BenchConfig, modes, ref, base_sd: dict, lora_sources: dict, idx_np, targets_np,
                   attention: str, device: str) -> dict:
    """The PyTorch side of every mode, on the same weights as minilora's."""
    import torch  # only reached under --compare-torch

    idx = torch.as_tensor(idx_np, dtype=torch.long, device=device)
    targets = torch.as_tensor(targets_np, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device != "cpu" else None
    scaling = _lora_config().scaling
    names = _adapter_names()
    runners = {}

    def forward_loss(model):
        with torch.no_grad():
            logits = model(idx)
            return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)))

    for mode in modes:
        if mode in TRAIN_MODES:
            if mode == "full":
                model = ref.build_model(bc.model, base_sd, attention=attention, device=device)
            else:
                model = ref.build_model(bc.model, base_sd, lora_sources["lora"], scaling, mode="lora",
                                        attention=attention, device=device)
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)

            def step(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                loss = model.loss(idx, targets)
                loss.backward()
                opt.step()

            def loss_only(model=model):
                with torch.no_grad():
                    return float(model.loss(idx, targets))

            r = Runner(mode, "torch", step, loss_only, sync)
            step()  # AdamW allocates its state at the first step: count it after one
            r.info = {"optimizer_state_bytes": ref.optimizer_state_bytes(opt),
                      "trainable_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad))}
            # undo that step's change of the weights, so the loss check sees the same weights as minilora
            _reload(model, base_sd, lora_sources.get("lora") if mode == "lora" else None)
            opt.state.clear()
            runners[mode] = r
            continue
        if mode == "infer":
            model = ref.build_model(bc.model, base_sd, attention=attention, device=device)
        elif mode == "merged":
            model = ref.build_model(bc.model, base_sd, lora_sources["merged"], scaling, mode="merged",
                                    attention=attention, device=device)
        elif mode == "unmerged":
            model = ref.build_model(bc.model, base_sd, lora_sources["unmerged"], scaling, mode="lora",
                                    attention=attention, device=device)
        else:  # mixed16, mixed16-loop
            model = ref.build_model(bc.model, base_sd, lora_sources[mode], scaling, mode="lora",
                                    attention=attention, device=device)
        model.eval()
        if mode == "mixed16":
            ids, _ = _groups(bc.batch, names)
            ref.set_row_adapters(model, [names.index(n) for n in ids])
        if mode == "mixed16-loop":
            _, groups = _groups(bc.batch, names)
            slices = [(j, slice(rows[0], rows[-1] + 1)) for j, _, rows in groups]

            def step(model=model, slices=slices):
                with torch.no_grad():
                    for j, sl in slices:
                        ref.set_active_adapter(model, j)
                        model(idx[sl])

            def loss_only(model=model, slices=slices):
                with torch.no_grad():
                    parts = []
                    for j, sl in slices:
                        ref.set_active_adapter(model, j)
                        parts.append(model(idx[sl]))
                    logits = torch.cat(parts, dim=0)
                    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                   targets.reshape(-1)))
        else:
            def step(model=model):
                with torch.no_grad():
                    model(idx)

            def loss_only(model=model):
                return forward_loss(model)
        runners[mode] = Runner(mode, "torch", step, loss_only, sync,
                               info={"optimizer_state_bytes": 0, "trainable_params": 0})
    return runners


def _reload(model, base_sd, lora_arrays):
    """Put the starting weights back into a torch model (after the step that allocated AdamW's state)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in base_sd:
                p.copy_(torch.as_tensor(base_sd[name], dtype=p.dtype))
        if lora_arrays:
            for path, adapters in lora_arrays.items():
                m = model.get_submodule(path)
                for i, (A, Bm) in enumerate(adapters):
                    m.lora_A[i].copy_(torch.as_tensor(A, dtype=m.lora_A[i].dtype))
                    m.lora_B[i].copy_(torch.as_tensor(Bm, dtype=m.lora_B[i].dtype))


# ----------------------------------------------------------------------------- one config
def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _quantiles(xs):
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (float("nan"), float("nan"))
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def _paired_ratio(a: Runner, b: Runner) -> float:
    """Median over rounds of a's time / b's time in the same round."""
    return _median([x / y for x, y in zip(a.times, b.times)])


def bench_config(bc: BenchConfig, modes, *, repeats: int, warmup: int, compare_torch: bool, backend: str,
                 seed: int = 0, attention: str = "math", log=print) -> list:
    """Build, check, warm up and time every (mode, impl) of one config; return the JSON rows."""
    import minilora as ml

    ml.manual_seed(seed)
    base = GPT(bc.model)  # numpy; every mode starts from a copy of these weights
    base.eval()
    rng = np.random.default_rng(seed)
    idx_np = rng.integers(0, bc.model.vocab_size, size=(bc.batch, bc.model.block_size))
    targets_np = rng.integers(0, bc.model.vocab_size, size=(bc.batch, bc.model.block_size))
    idx = bk.asarray(idx_np, backend=backend)
    targets = bk.asarray(targets_np, backend=backend)

    log(f"[{bc.name}] building {', '.join(modes)} (batch {bc.batch}, T {bc.model.block_size}, d {bc.model.d_model}, "
        f"{bc.model.n_layer} layers, {bc.model.n_head} heads)")
    ml_runners, lora_sources = _ml_runners(bc, modes, base, idx, targets, backend, seed)
    torch_runners = {}
    if compare_torch:
        ref = _load_torch_reference()
        base_sd = {name: bk.to_numpy(a) for name, a in base.state_dict().items()}
        device = "cuda" if backend == "cupy" else "cpu"
        torch_runners = _torch_runners(bc, modes, ref, base_sd, lora_sources, idx_np, targets_np, attention, device)

    # the agreement check (not timed): same weights, same batch, same loss
    checks = {}
    for mode in modes:
        ml_loss = ml_runners[mode].loss()
        entry = {"minilora": ml_loss}
        if mode in torch_runners:
            t_loss = torch_runners[mode].loss()
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
        if mode in torch_runners:
            order.append(torch_runners[mode])
    # The matmul peak is timed inside the rounds too, so it sees the same machine load as the steps.
    peak_runners = [_peak_runner(backend)]
    if compare_torch:
        peak_runners.append(_torch_peak_runner("cuda" if backend == "cupy" else "cpu"))
    order += peak_runners
    for r in order:
        for _ in range(warmup):
            r.timed()
        r.times.clear()
    log(f"[{bc.name}] timing {len(order)} runners × {repeats} rounds (interleaved)")
    for i in range(repeats):
        gc.collect()
        k = i % len(order)
        for r in order[k:] + order[:k]:
            r.timed()
    memory = {mode: ml_runners[mode].memory() for mode in modes}
    peak = PEAK_MATMULS * 2.0 * PEAK_N**3 / _median(peak_runners[0].times)
    torch_peak = PEAK_MATMULS * 2.0 * PEAK_N**3 / _median(peak_runners[1].times) if compare_torch else None
    log(f"[{bc.name}] matmul peak (float32 {PEAK_N}³, in the rounds): {backend} {peak / 1e9:.0f} GFLOP/s"
        + (f", torch {torch_peak / 1e9:.0f} GFLOP/s" if torch_peak else ""))

    rows = []
    machine = _machine_info(backend)
    for mode in modes:
        for impl, r in (("minilora", ml_runners[mode]), ("torch", torch_runners.get(mode))):
            if r is None:
                continue
            med = _median(r.times)
            q1, q3 = _quantiles(r.times)
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
            if mode in torch_runners:
                row["ratio_vs_torch"] = _paired_ratio(ml_runners[mode], torch_runners[mode])
            rel = row["relative"]
            side = ml_runners if impl == "minilora" else torch_runners
            if mode == "lora" and "full" in side:
                rel["speedup_vs_full"] = _paired_ratio(side["full"], r)
            if mode in ("merged", "unmerged", "mixed16") and "infer" in side:
                rel["ratio_vs_infer"] = _paired_ratio(r, side["infer"])
            if mode == "mixed16" and "mixed16-loop" in side:
                rel["speedup_vs_loop"] = _paired_ratio(side["mixed16-loop"], r)
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


_MACHINE = {}


def _machine_info(backend: str) -> dict:
    if backend not in _MACHINE:
        info = {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform(),
                "cpu_count": os.cpu_count(), "blas": blas_threads()}
        torch = sys.modules.get("torch")
        if torch is not None:
            info["torch"] = torch.__version__
            info["torch_threads"] = torch.get_num_threads()
        _MACHINE[backend] = info
    return _MACHINE[backend]


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
def run(configs=("tiny", "medium"), modes=MODES, *, repeats: int = 7, warmup: int = 2, compare_torch: bool = False,
        threads: int | None = None, backend: str = "numpy", attention: str = "math", seed: int = 0,
        log=print) -> list:
    """Run the benchmark; return the rows (one dict per (config, mode, impl), as written to JSON lines)."""
    for c in configs:
        if c not in CONFIGS:
            raise BenchError(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}")
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
        if compare_torch:
            _load_torch_reference()
            import torch

            previous_torch = torch.get_num_threads()
            torch.set_num_threads(int(threads or blas["threads"] or os.cpu_count()))  # match NumPy's BLAS
            log(f"threads: NumPy BLAS ({blas['library']}) {blas['threads']}, torch {torch.get_num_threads()}{env}")
        else:
            log(f"threads: NumPy BLAS ({blas['library']}) {blas['threads']}{env}")
        _MACHINE.clear()

        rows = []
        for c in configs:
            rows += bench_config(CONFIGS[c], modes, repeats=repeats, warmup=warmup, compare_torch=compare_torch,
                                 backend=backend, seed=seed, attention=attention, log=log)
        return rows
    finally:  # leave the process's thread settings as they were (run() may be called from a notebook or a test)
        if threads is not None and previous_blas is not None:
            set_blas_threads(previous_blas)
        if previous_torch is not None:
            sys.modules["torch"].set_num_threads(previous_torch)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minilora.bench",
        description="Time minilora's GPT (training, LoRA training, inference: base, merged, unmerged, mixed-adapter "
                    "batches), optionally side by side with PyTorch. Medians after warm-up; ratios are medians of "
                    "per-round ratios. See benchmarks/README.md for the columns.",
    )
    p.add_argument("--configs", default="tiny,medium", help="comma-separated: tiny, medium (default: both)")
    p.add_argument("--modes", default=",".join(MODES[:-1]),
                   help=f"comma-separated from {', '.join(MODES)} (default: all; mixed16 brings mixed16-loop along)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per runner (default 7; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per runner first (default 2; 1 with --quick)")
    p.add_argument("--json", metavar="PATH", help="write one JSON object per line per (config, mode, impl)")
    p.add_argument("--compare-torch", action="store_true",
                   help="also run the same model in PyTorch (benchmarks/torch_reference.py), interleaved")
    p.add_argument("--torch-attention", choices=("math", "sdpa"), default="math",
                   help="PyTorch attention: 'math' = the same algorithm as minilora (default), 'sdpa' = fused kernel")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for NumPy's OpenBLAS and torch (default: what OpenBLAS uses, for both)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    p.add_argument("--quick", action="store_true", help="tiny config, few repeats (for tests)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    if args.quick and args.configs == "tiny,medium":
        configs = ["tiny"]
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    try:
        rows = run(configs, [m for m in args.modes.split(",") if m], repeats=repeats, warmup=warmup,
                   compare_torch=args.compare_torch, threads=args.threads, backend=args.backend,
                   attention=args.torch_attention, seed=args.seed)
    except (BenchError, bk.BackendUnavailableError) as exc:
        print(f"minilora bench: {exc}", file=sys.stderr)
        return 2
    print()
    print(format_table(rows))
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
