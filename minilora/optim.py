"""Optimizers for the trainable parameters only: SGD, AdamW, gradient clipping, LR schedules.

LoRA's memory saving happens here (Sec. 4.2 of the paper). An optimizer keeps state only for
the parameters with ``requires_grad=True``. The frozen W₀ gets no moment buffers, so AdamW
holds 2 × |Θ| numbers instead of 2 × |Φ₀|. To see the difference, compare
``opt.state_bytes()`` for LoRA and for full fine-tuning.

    opt = optim.AdamW(model.named_parameters(), lr=2e-4, weight_decay=0.01)   # skips frozen W0
    sched = optim.LRScheduler(opt, lambda s: optim.warmup_linear(s, total=1000, warmup=100))
    for batch in batches:
        loss = model.loss(*batch); opt.zero_grad(); loss.backward()
        optim.clip_grad_norm_(opt.params, 1.0)
        opt.step(); sched.step()

Every optimizer here follows these rules, and the tests check them:
- ``p.grad`` is read and never written, because two tensors may share one gradient array.
  ``clip_grad_norm_`` gives ``p.grad`` a new, scaled array.
- ``p.data`` is updated in place (``-=``, ``out=``), so views of it (merged weights, a tied
  LM head) and references to it stay valid.
- Every scalar is a Python float, so float32 parameters and state stay float32 (NEP 50).
- State and scratch space are allocated once, at construction; ``step()`` allocates nothing.
- The set of trained parameters is fixed at construction. Make the optimizer after
  ``mark_only_lora_as_trainable`` and after ``model.to(...)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from . import backend as bk
from .tensor import Tensor

__all__ = [
    "SGD",
    "AdamW",
    "LRScheduler",
    "Optimizer",
    "clip_grad_norm_",
    "warmup_cosine",
    "warmup_linear",
]


# ----------------------------------------------------------------------------- parameters
def _named_tensors(params, where: str) -> list[tuple[str | None, Tensor]]:
    """``params`` as (name or None, Tensor) pairs. It may hold Tensors, (name, Tensor) pairs or a {name: Tensor} dict."""
    if isinstance(params, Tensor):
        raise TypeError(
            f"{where} takes an iterable of Tensors (e.g. model.parameters()), not a single Tensor; "
            "wrap it in a list: [param]"
        )
    items = list(params.items()) if isinstance(params, Mapping) else list(params)
    out = []
    for position, item in enumerate(items):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, p = item
        else:
            name, p = None, item
        if not isinstance(p, Tensor):
            raise TypeError(
                f"{where}: expected Tensors or (name, Tensor) pairs, got {type(p).__name__} at position {position}"
            )
        out.append((name, p))
    return out


def _layout(a) -> tuple:
    return bk.backend_of(a), a.dtype, a.shape


# ----------------------------------------------------------------------------- base
class Optimizer:
    """The shared part: trainable parameters, preallocated state, checkpointing.

    A subclass names its per-parameter state arrays in ``_state_keys`` (each is allocated as
    ``zeros_like(p.data)``), its hyperparameters in ``_hyperparameters``, and implements
    ``_update(i, param, grad, lr)``, which changes ``param`` (= ``p.data``) in place.

    Attributes: ``params`` (the trained Tensors), ``names`` (their names, or "0", "1", ... when
    the optimizer was given plain Tensors), ``lr`` (set it freely; ``LRScheduler`` does),
    ``state`` (one {key: array} dict per parameter) and ``steps`` (per-parameter update counts;
    a parameter whose ``grad`` is None at a step is skipped and its count does not advance, as
    in PyTorch).
    """

    _state_keys: tuple[str, ...] = ()
    _hyperparameters: tuple[str, ...] = ("lr",)
    _n_scratch = 1  # scratch buffers of the largest parameter's size, shared by all parameters

    def __init__(self, params, lr: float):
        where = type(self).__name__
        named, seen = [], set()
        for position, (name, p) in enumerate(_named_tensors(params, where)):
            if id(p) in seen or not p.requires_grad:  # tied weights count once; frozen W0 gets nothing
                continue
            seen.add(id(p))
            named.append((str(position) if name is None else name, p))
        if not named:
            raise ValueError(
                f"{where} got no parameter with requires_grad=True. For LoRA, call "
                "lora.mark_only_lora_as_trainable(model) after lora.apply_lora(...); for full "
                "fine-tuning, pass model.parameters() of an unfrozen model"
            )
        self.names = [name for name, _ in named]
        if len(set(self.names)) != len(self.names):
            duplicates = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(f"{where}: two parameters share a name: {duplicates}")
        self.params = [p for _, p in named]
        self.lr = float(lr)
        self.steps = [0] * len(self.params)
        self._layouts = [_layout(p.data) for p in self.params]
        self.state = [
            {key: bk.get_array_module(p.data).zeros_like(p.data) for key in self._state_keys} for p in self.params
        ]
        # Scratch for intermediate results: per (backend, dtype), flat buffers as large as the biggest param.
        sizes: dict[tuple, int] = {}
        for p in self.params:
            key = (bk.backend_of(p.data), p.data.dtype)
            sizes[key] = max(sizes.get(key, 0), p.data.size)
        self._scratch = {
            key: [bk.module_for(key[0]).empty(size, dtype=key[1]) for _ in range(self._n_scratch)]
            for key, size in sizes.items()
        }

    # ------------------------------------------------------------------ the loop
    def zero_grad(self) -> None:
        """Drop the gradients (``p.grad = None``). The next backward starts from nothing."""
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """Update, in place, every trained parameter that has a gradient."""
        lr = float(self.lr)
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue
            param = p.data
            if _layout(param) != self._layouts[i]:
                backend, dtype, shape = self._layouts[i]
                raise RuntimeError(
                    f"{type(self).__name__}: parameter {self.names[i]!r} was {backend} {dtype} {shape} when the "
                    f"optimizer was made and is {_layout(param)} now; make the optimizer after model.to(...)"
                )
            if grad.shape != param.shape or grad.dtype != param.dtype or bk.backend_of(grad) != self._layouts[i][0]:
                raise ValueError(
                    f"{type(self).__name__}: parameter {self.names[i]!r} is {_layout(param)} but its grad is "
                    f"{_layout(grad)}; a gradient must match its parameter's backend, dtype and shape"
                )
            self.steps[i] += 1
            self._update(i, param, grad, lr)

    def _update(self, i: int, param, grad, lr: float) -> None:
        raise NotImplementedError

    def _scratch_for(self, param, slot: int = 0):
        """A scratch view of ``param``'s shape (its contents are garbage; the next param reuses it)."""
        flat = self._scratch[(bk.backend_of(param), param.dtype)][slot]
        return flat[: param.size].reshape(param.shape)

    # ------------------------------------------------------------------ memory
    def state_bytes(self) -> int:
        """Total bytes of the optimizer state arrays. Scratch buffers are not counted.

        AdamW holds 2 × the bytes of the trained parameters. SGD with momentum holds 1 ×, and
        plain SGD holds 0. For LoRA this counts only A and B, which is the memory the paper saves.
        """
        return int(sum(a.nbytes for state in self.state for a in state.values()))

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._hyperparameters)
        n = sum(p.size for p in self.params)
        return f"{type(self).__name__}({hyper}; {len(self.params)} tensors, {n:,} values, state {self.state_bytes():,} bytes)"

    # ------------------------------------------------------------------ checkpoints
    def state_meta(self) -> dict:
        """The JSON-able part of the state: the optimizer's type, hyperparameters, and per-parameter name, shape, dtype and step count."""
        hyper = {}
        for key in self._hyperparameters:
            value = getattr(self, key)
            hyper[key] = list(value) if isinstance(value, tuple) else value
        return {
            "optimizer": type(self).__name__,
            "format": 1,
            "hyperparameters": hyper,
            "params": [
                {"name": name, "shape": list(shape), "dtype": str(dtype), "step": step}
                for name, (_, dtype, shape), step in zip(self.names, self._layouts, self.steps)
            ],
        }

    def state_arrays(self) -> dict:
        """The state arrays as host NumPy copies, keyed ``"<param name>.<state key>"``.

        The dict is ready for ``safetensors.numpy.save_file``. The arrays are copies, so later
        steps do not change a saved state.
        """
        out = {}
        for name, state in zip(self.names, self.state):
            for key, buf in state.items():
                host = bk.to_numpy(buf)
                out[f"{name}.{key}"] = host.copy() if host is buf else host
        return out

    def state_dict(self) -> dict:
        """``{"meta": state_meta(), "arrays": state_arrays()}``. ``load_state_dict`` takes it back."""
        return {"meta": self.state_meta(), "arrays": self.state_arrays()}

    def load_state_dict(self, state: dict, arrays: dict | None = None, strict: bool = True) -> None:
        """Restore a saved state in place: ``load_state_dict(sd)`` or ``load_state_dict(meta, arrays)``.

        ``sd`` comes from ``state_dict()``. ``meta`` and ``arrays`` come from ``state_meta()``
        and ``state_arrays()``, possibly after a trip through JSON and safetensors. As in
        PyTorch, the hyperparameters (lr included) are restored too. Training then continues
        bit for bit as if it had never stopped. Everything is checked before anything changes.
        With ``strict=False``, keys in ``arrays`` that belong to no parameter are ignored.
        """
        meta = state["meta"] if arrays is None else state
        arrays = state["arrays"] if arrays is None else arrays
        where = f"{type(self).__name__}.load_state_dict"
        if meta.get("optimizer") != type(self).__name__:
            raise ValueError(f"{where}: the state was saved by {meta.get('optimizer')!r}, not {type(self).__name__!r}")
        saved = {entry["name"]: entry for entry in meta["params"]}
        missing = [n for n in self.names if n not in saved]
        ours = set(self.names)
        unexpected = [n for n in saved if n not in ours]
        if missing or unexpected:
            raise ValueError(
                f"{where}: the saved parameters do not match this optimizer's: missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. "
                "Build the optimizer from the same (named) parameters, with the same ones trainable"
            )
        wanted = {f"{name}.{key}" for name in self.names for key in self._state_keys}
        missing_arrays = sorted(wanted - set(arrays))
        if missing_arrays:
            raise ValueError(f"{where}: state arrays missing: {missing_arrays[:5]}")
        if strict and set(arrays) - wanted:
            raise ValueError(f"{where}: unexpected state arrays {sorted(set(arrays) - wanted)[:5]} (pass strict=False to ignore)")
        for name, (_, _, shape) in zip(self.names, self._layouts):
            if tuple(saved[name]["shape"]) != tuple(shape):
                raise ValueError(f"{where}: parameter {name!r} has shape {tuple(shape)}, the saved state {tuple(saved[name]['shape'])}")
            for key in self._state_keys:
                if tuple(arrays[f"{name}.{key}"].shape) != tuple(shape):
                    raise ValueError(f"{where}: {name}.{key} has shape {tuple(arrays[f'{name}.{key}'].shape)}, expected {tuple(shape)}")
        # All checked: now change things.
        for key, value in meta["hyperparameters"].items():
            if key in self._hyperparameters:
                setattr(self, key, tuple(value) if isinstance(value, list) else value)
        for i, (name, buffers) in enumerate(zip(self.names, self.state)):
            self.steps[i] = int(saved[name]["step"])
            for key, buf in buffers.items():
                source = bk.asarray(arrays[f"{name}.{key}"], dtype=buf.dtype, backend=bk.backend_of(buf))
                bk.get_array_module(buf).copyto(buf, source)


# ----------------------------------------------------------------------------- SGD
class SGD(Optimizer):
    """Stochastic gradient descent with PyTorch's semantics (dampening 0).

        d ← g + λ·p                        (weight_decay λ: L2 added to the gradient, coupled)
        b ← μ·b + d                        (momentum μ > 0; b starts at 0, so b₁ = d₁)
        d ← d + μ·b   if nesterov,   else   d ← b
        p ← p − lr·d

    State: one ``momentum_buffer`` per parameter when μ > 0, and none otherwise.
    """

    _hyperparameters = ("lr", "momentum", "weight_decay", "nesterov")

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        if nesterov and momentum <= 0:
            raise ValueError("SGD: nesterov=True needs momentum > 0")
        self.momentum, self.weight_decay, self.nesterov = float(momentum), float(weight_decay), bool(nesterov)
        self._state_keys = ("momentum_buffer",) if self.momentum else ()
        self._n_scratch = 2 if self.nesterov else 1
        super().__init__(params, lr)

    def _update(self, i, param, grad, lr):
        xp = bk.get_array_module(param)
        scratch = self._scratch_for(param)
        d = grad  # read only: never written
        if self.weight_decay:
            xp.multiply(param, self.weight_decay, out=scratch)
            scratch += grad  # d = g + λp
            d = scratch
        if self.momentum:
            buf = self.state[i]["momentum_buffer"]
            buf *= self.momentum
            buf += d  # b = μb + d
            if self.nesterov:
                look_ahead = self._scratch_for(param, 1)
                xp.multiply(buf, self.momentum, out=look_ahead)
                look_ahead += d  # d = d + μb
                d = look_ahead
            else:
                d = buf
        xp.multiply(d, lr, out=scratch)
        param -= scratch  # p = p - lr·d


# ----------------------------------------------------------------------------- AdamW
class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as in ``torch.optim.AdamW``.

    At the t-th update of a parameter (t counts that parameter's steps):

        p ← p · (1 − lr·λ)                          (decoupled decay, before the moments)
        m ← β₁·m + (1 − β₁)·g                       (``exp_avg``)
        v ← β₂·v + (1 − β₂)·g²                      (``exp_avg_sq``)
        p ← p − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)

    The last line is computed in the equivalent form
    ``p ← p − (lr·√(1−β₂ᵗ)/(1−β₁ᵗ)) · m / (√v + ε·√(1−β₂ᵗ))``. That is one pass fewer, and it
    agrees with PyTorch to rounding (≤ 1e-12 in float64 in the oracle tests). The update makes 13
    in-place elementwise passes and allocates nothing.

    State: ``exp_avg`` and ``exp_avg_sq`` per trained parameter, so 2 × the parameters' bytes.
    For LoRA those are the A and B matrices only.
    """

    _state_keys = ("exp_avg", "exp_avg_sq")
    _hyperparameters = ("lr", "betas", "eps", "weight_decay")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        beta1, beta2 = (float(b) for b in betas)
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"AdamW: betas must lie in [0, 1), got {tuple(betas)}")
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"AdamW: lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        self.betas, self.eps, self.weight_decay = (beta1, beta2), float(eps), float(weight_decay)
        super().__init__(params, lr)

    def _update(self, i, param, grad, lr):
        xp = bk.get_array_module(param)
        beta1, beta2 = self.betas
        t = self.steps[i]
        m, v = self.state[i]["exp_avg"], self.state[i]["exp_avg_sq"]
        scratch = self._scratch_for(param)
        if self.weight_decay:
            param *= 1.0 - lr * self.weight_decay  # p = p(1 - lr·λ)
        m *= beta1
        xp.multiply(grad, 1.0 - beta1, out=scratch)
        m += scratch  # m = β1 m + (1-β1) g
        v *= beta2
        xp.multiply(grad, 1.0 - beta2, out=scratch)
        scratch *= grad
        v += scratch  # v = β2 v + (1-β2) g²
        bias_correction1 = 1.0 - beta1**t
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**t)
        xp.sqrt(v, out=scratch)
        scratch += self.eps * bias_correction2_sqrt  # √v + ε√(1-β2ᵗ)
        xp.divide(m, scratch, out=scratch)
        scratch *= lr * bias_correction2_sqrt / bias_correction1
        param -= scratch


# ----------------------------------------------------------------------------- clipping
def clip_grad_norm_(params, max_norm: float, error_if_nonfinite: bool = False) -> float:
    """Scale all gradients together so that their global L2 norm is at most ``max_norm``.

        total = √(Σ_p ‖g_p‖²)            (float64 accumulation, over every p with a grad)
        c = max_norm / (total + 1e-6)
        if c < 1:  g_p ← c · g_p         (as torch.nn.utils.clip_grad_norm_)

    Returns ``total``, the norm before clipping, as a Python float. ``params`` can hold
    Tensors or (name, Tensor) pairs. Gradients are never changed in place: each ``p.grad``
    is replaced by a new scaled array of the same dtype. A non-finite norm leaves the
    gradients alone, whereas PyTorch would multiply them by NaN. Check the returned value,
    or pass ``error_if_nonfinite=True`` to raise.
    """
    if not max_norm >= 0:
        raise ValueError(f"clip_grad_norm_: max_norm must be >= 0, got {max_norm}")
    tensors = [p for _, p in _named_tensors(params, "clip_grad_norm_") if p.grad is not None]
    partial_sums: dict[int, tuple] = {}  # per array module: (module, [0-d float64 arrays]); one host sync each
    for p in tensors:
        xp = bk.get_array_module(p.grad)
        flat = p.grad.astype(xp.float64, copy=False).reshape(-1)
        partial_sums.setdefault(id(xp), (xp, []))[1].append(xp.dot(flat, flat))
    total_sq = sum(float(xp.sum(xp.stack(parts))) for xp, parts in partial_sums.values())
    total = math.sqrt(total_sq)
    if not math.isfinite(total):
        if error_if_nonfinite:
            raise RuntimeError(f"clip_grad_norm_: the total gradient norm is {total}; a gradient has NaN or inf entries")
        return total
    clip_coef = float(max_norm) / (total + 1e-6)
    if clip_coef < 1.0:
        for p in tensors:
            p.grad = p.grad * clip_coef  # a new array: the old one may be shared
    return total


# ----------------------------------------------------------------------------- schedules
def _check_schedule(step: int, total: int, warmup: int) -> None:
    if total < 1 or not 0 <= warmup <= total:
        raise ValueError(f"schedule: need total >= 1 and 0 <= warmup <= total, got total={total}, warmup={warmup}")
    if step < 0:
        raise ValueError(f"schedule: step must be >= 0, got {step}")


def warmup_linear(step: int, total: int, warmup: int) -> float:
    """LR multiplier: a linear ramp 0 → 1 over ``warmup`` steps, then linear decay to 0 at ``total``.

        step < warmup:  step / warmup
        otherwise:      max(0, (total − step) / max(1, total − warmup))

    This is the Hugging Face ``get_linear_schedule_with_warmup``, the schedule of the paper's
    GPT-2 experiments. Its value is 0 at step 0, 1 at ``warmup`` and 0 at ``total``.
    """
    _check_schedule(step, total, warmup)
    if step < warmup:
        return step / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: a linear ramp 0 → 1 over ``warmup`` steps, then a half cosine down to ``min_ratio``.

        step < warmup:  step / warmup
        otherwise:      min_ratio + (1 − min_ratio) · ½ · (1 + cos(π · q)),
                        q = min(1, (step − warmup) / max(1, total − warmup))

    Its value is 1 at ``warmup``, ``min_ratio`` at ``total``, and it stays there afterwards.
    """
    _check_schedule(step, total, warmup)
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"warmup_cosine: min_ratio must lie in [0, 1], got {min_ratio}")
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LRScheduler:
    """Sets ``optimizer.lr = base_lr · fn(step)``, like ``torch.optim.lr_scheduler.LambdaLR``.

    ``base_lr`` is the optimizer's lr at construction. The constructor already applies
    ``fn(0)``. Call ``step()`` after each ``optimizer.step()``.

        sched = LRScheduler(opt, functools.partial(warmup_cosine, total=1000, warmup=50))

    To resume, restore the optimizer's state first and then ``sched.load_state_dict(...)``,
    which re-applies the lr of the saved step.
    """

    def __init__(self, optimizer: Optimizer, fn):
        self.optimizer = optimizer
        self.fn = fn
        self.base_lr = float(optimizer.lr)
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        self.optimizer.lr = self.base_lr * float(self.fn(self.last_step))

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    @property
    def lr(self) -> float:
        return self.optimizer.lr

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.base_lr = float(state["base_lr"])
        self.last_step = int(state["last_step"])
        self._apply()
