"""The things the benchmark times: one ``Runner`` per (mode, implementation), minilora's and PyTorch's.

Each runner holds a ``step()`` (one training step or forward pass on the config's batch), a
``loss()`` for the agreement check (not timed) and, on minilora's side, a ``memory()`` that
measures one extra step under tracemalloc. PyTorch is imported only here, lazily, and only
under ``--compare-torch``; its model is the twin in ``benchmarks/torch_gpt.py``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib
import importlib.util
import tracemalloc
from dataclasses import dataclass, field

import numpy as np

from minilora import backend as bk
from minilora import functional as F
from minilora import lora, optim
from minilora.methods import randomize_zero_init
from minilora.models import GPT
from minilora.tensor import no_grad

from .config import LORA_ALPHA, LORA_B_STD, LORA_R, LORA_TARGETS, LR, N_ADAPTERS, TRAIN_MODES, BenchConfig, BenchError

__all__ = ["Runner", "load_torch_twin", "minilora_runners", "peak_runner", "torch_peak_runner", "torch_runners"]


def load_torch_twin():
    """Import torch and ``benchmarks/torch_gpt.py`` (only under --compare-torch)."""
    if importlib.util.find_spec("torch") is None:
        raise BenchError(
            "--compare-torch needs PyTorch, which is not installed here (pip install torch). "
            "minilora itself never needs it; run without --compare-torch to benchmark minilora alone."
        )
    return importlib.import_module(".torch_gpt", __package__)


def _sync(backend: str) -> None:
    if backend == "cupy":
        bk.module_for("cupy").cuda.get_current_stream().synchronize()


PEAK_N, PEAK_MATMULS = 1024, 3  # the peak runner: 3 float32 (1024×1024)@(1024×1024) products per round


def adamw_step(model, idx, targets):
    """(AdamW on the model's trainable parameters, one minilora training step on (idx, targets)): every bench's step."""
    opt = optim.AdamW(model.named_parameters(), lr=LR, weight_decay=0.01)

    def step():
        opt.zero_grad()
        model.loss(idx, targets).backward()
        opt.step()

    return opt, step


def peak_runner(backend: str) -> Runner:
    a = bk.random_normal((PEAK_N, PEAK_N), np.float32, backend=backend)
    b = bk.random_normal((PEAK_N, PEAK_N), np.float32, backend=backend)

    def step():
        for _ in range(PEAK_MATMULS):
            a @ b

    return Runner("matmul-peak", "minilora", step, sync=(lambda: _sync(backend)) if backend == "cupy" else None)


def torch_peak_runner(device: str) -> Runner:
    import torch  # only under --compare-torch

    a = torch.randn(PEAK_N, PEAK_N, device=device)
    b = torch.randn(PEAK_N, PEAK_N, device=device)

    def step():
        for _ in range(PEAK_MATMULS):
            a @ b

    return Runner("matmul-peak", "torch", step, sync=torch.cuda.synchronize if device != "cpu" else None)


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
    times: list = field(default_factory=list)  # seconds of each timed round

    def call(self) -> None:
        """One step, finished (the GPU waited for): what a round times."""
        self.step()
        if self.sync is not None:
            self.sync()


def _lora_config():
    return lora.LoRAConfig(r=LORA_R, alpha=LORA_ALPHA, target_modules=LORA_TARGETS)


def _adapter_names(n=N_ADAPTERS):
    return [f"task{i:02d}" for i in range(n)]


def _add_adapters(model, names, seed: int):
    """apply_lora once per adapter name, then give every B random values (B = 0 would make LoRA a no-op).

    Seeded, so every model built with the same names and seed holds the same adapters.
    """
    bk.manual_seed(seed)  # A's init and B's values draw from minilora's generator
    cfg = _lora_config()
    for name in names:
        lora.apply_lora(model, cfg, adapter_name=name)
    randomize_zero_init(model, std=LORA_B_STD)
    return model


def _lora_arrays(model, names) -> dict:
    """{module path: [(A, B, scaling) per adapter in ``names`` order]} as host arrays (for the torch twin)."""
    A, Bm = {}, {}
    for pname, p in model.named_parameters():
        path, kind, adapter = pname.rsplit(".", 2) if pname.count(".") >= 2 else (None, None, None)
        if kind == "lora_A":
            A[(path, adapter)] = bk.to_numpy(p.data)
        elif kind == "lora_B":
            Bm[(path, adapter)] = bk.to_numpy(p.data)
    paths = sorted({path for path, _ in A})
    scaling = _lora_config().scaling
    return {path: [(A[(path, n)], Bm[(path, n)], scaling) for n in names] for path in paths}


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


def minilora_runners(bc: BenchConfig, modes, base: GPT, idx, targets, backend: str, seed: int) -> dict:
    """The minilora side of every mode: {mode: Runner}."""
    sync = (lambda: _sync(backend)) if backend == "cupy" else None
    runners = {}

    def routed(model, adapter_ids):  # a mixed batch, or every row through the active adapter
        return lora.mixed_batch(model, adapter_ids) if adapter_ids is not None else contextlib.nullcontext()

    def forward_loss(model, adapter_ids=None):
        with no_grad(), routed(model, adapter_ids):
            return _host_float(F.cross_entropy(model(idx), targets))

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
        opt, step = adamw_step(model, idx, targets)

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
                with no_grad(), routed(model, adapter_ids):
                    model(idx)

            def loss_only():
                return forward_loss(model, adapter_ids)
        else:
            def step():
                with no_grad():
                    for _, name, rows in loop_groups:
                        with lora.mixed_batch(model, [name] * len(rows)):
                            model(idx[rows[0]:rows[-1] + 1])

            def loss_only():  # the loop's logits, put back in row order
                with no_grad():
                    parts = []
                    for _, name, rows in loop_groups:
                        with lora.mixed_batch(model, [name] * len(rows)):
                            parts.append(bk.to_numpy(model(idx[rows[0]:rows[-1] + 1]).data))
                logits = bk.asarray(np.concatenate(parts, axis=0), backend=backend)
                return _host_float(F.cross_entropy(logits, targets))
        info = {"optimizer_state_bytes": 0, "trainable_params": 0,
                "total_params": int(sum(p.data.size for _, p in model.named_parameters()))}
        return Runner(mode, "minilora", step, loss_only, sync, memory_of(step, model), info)

    names = _adapter_names()
    lora_sources = {}  # mode -> the adapters' starting (A, B, scaling), host copies, for the PyTorch side
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


def torch_runners(bc: BenchConfig, modes, ref, base_sd: dict, lora_sources: dict, idx_np, targets_np,
                   attention: str, device: str) -> dict:
    """The PyTorch side of every mode, on the same weights as minilora's."""
    import torch  # only reached under --compare-torch

    idx = torch.as_tensor(idx_np, dtype=torch.long, device=device)
    targets = torch.as_tensor(targets_np, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device != "cpu" else None
    names = _adapter_names()
    runners = {}

    def build(lora=None, merge=False):
        return ref.build_torch_gpt(bc.model, base_sd, lora, merge=merge, dtype=torch.float32, device=device,
                                   attention=attention)

    def forward_loss(model):
        with torch.no_grad():
            logits = model(idx)
            return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)))

    for mode in modes:
        if mode in TRAIN_MODES:
            model = build() if mode == "full" else build(lora_sources["lora"])
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
            model = build()
        else:  # merged: W0 + s·B A in plain Linears; unmerged, mixed16, mixed16-loop: TorchLoRALinear
            model = build(lora_sources[mode], merge=mode == "merged")
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
                for i, (A, Bm, _) in enumerate(adapters):
                    m.lora_A[i].copy_(torch.as_tensor(A, dtype=m.lora_A[i].dtype))
                    m.lora_B[i].copy_(torch.as_tensor(Bm, dtype=m.lora_B[i].dtype))

