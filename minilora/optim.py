"""Optimizers for the trainable parameters only: SGD, AdamW, parameter groups (LoRA+), gradient clipping.

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

The LR schedules (``warmup_linear``, ``warmup_cosine``, ``LRScheduler``) live in
``minilora.schedules`` and are importable from here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


from . import backend as bk
from .optim_state import SavedState
from .schedules import LRScheduler, warmup_cosine, warmup_linear
from .tensor import Tensor

__all__ = [
    "SGD",
    "AdamW",
    "LRScheduler",
    "Optimizer",
    "clip_grad_norm_",
    "lora_plus_param_groups",
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


def _split_groups(params, where: str) -> list[tuple[dict, list]]:
    """[(group options, [(name or None, Tensor)])]: one group, or one per ``{"params": [...], ...}`` dict."""
    if not isinstance(params, (Tensor, Mapping)):
        params = list(params)
        if params and all(isinstance(g, Mapping) for g in params):
            groups = []
            for k, group in enumerate(params):
                if "params" not in group:
                    raise ValueError(f"{where}: parameter group {k} has no 'params' key: {sorted(group)}")
                options = {key: value for key, value in group.items() if key not in ("params", "name")}
                options["name"] = str(group.get("name", k))
                groups.append((options, _named_tensors(group["params"], f"{where} (parameter group {k})")))
            return groups
    return [({}, _named_tensors(params, where))]


def _layout(a) -> tuple:
    return bk.backend_of(a), a.dtype, a.shape


def _nonnegative(what: str, value) -> float:
    """``value`` as a float, if it is a finite number >= 0; else ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


class _GroupValue:
    """``opt.lr``, ``opt.weight_decay``, ...: the value of the first parameter group.

    Setting it changes the only group. With several groups (LoRA+), set
    ``opt.param_groups[i]["lr"]`` instead, or let ``LRScheduler`` scale them all.
    """

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, opt, owner=None):
        if opt is None:
            return self
        return opt.param_groups[0][self.name]

    def __set__(self, opt, value):
        if len(opt.param_groups) != 1:
            raise AttributeError(
                f"{type(opt).__name__} has {len(opt.param_groups)} parameter groups; set "
                f"opt.param_groups[i][{self.name!r}] for each group (LRScheduler scales every group's lr)"
            )
        opt.param_groups[0][self.name] = opt._check_option(self.name, value)


# ----------------------------------------------------------------------------- base
class Optimizer(SavedState):
    """The shared part: trainable parameters in groups, preallocated state, checkpointing.

    ``params`` is an iterable of Tensors, of (name, Tensor) pairs (``model.named_parameters()``),
    a {name: Tensor} dict, or a list of parameter groups, each a dict
    ``{"params": <any of those>, "lr": ..., "weight_decay": ...}`` whose missing options take the
    constructor's values (as in ``torch.optim``; ``lora_plus_param_groups`` makes such a list).

    A subclass names its per-parameter state arrays in ``_state_keys`` (each is allocated as
    ``zeros_like(p.data)``), its hyperparameters in ``_hyperparameters`` (those a group may set
    in ``_group_options``), validates one value in ``_check_option(name, value)``, and implements
    ``_update(i, param, grad, group)``, which changes ``param`` (= ``p.data``) in place using the
    hyperparameters of the parameter's ``group``.

    Attributes: ``params`` (the trained Tensors), ``names`` (their names, or "0", "1", ... when
    the optimizer was given plain Tensors), ``param_groups`` (one dict of hyperparameters per
    group, plus "params": the group's trained Tensors), ``group_of`` (each parameter's group
    index), ``lr`` (the first group's; set it freely when there is one group; ``LRScheduler``
    scales every group), ``state`` (one {key: array} dict per parameter) and ``steps``
    (per-parameter update counts; a parameter whose ``grad`` is None at a step is skipped and
    its count does not advance, as in PyTorch).
    """

    _state_keys: tuple[str, ...] = ()
    _hyperparameters: tuple[str, ...] = ("lr",)
    _group_options: tuple[str, ...] = ("lr",)
    _n_scratch = 1  # scratch buffers of the largest parameter's size, shared by all parameters
    _nonnegative_state: tuple[str, ...] = ()  # state arrays that can never be negative (checked on load)
    lr = _GroupValue()

    def __init__(self, params, **defaults):
        where = type(self).__name__
        defaults = {key: self._check_option(key, value) for key, value in defaults.items()}
        named, seen, self.param_groups, self.group_of = [], {}, [], []
        position = 0
        for k, (options, items) in enumerate(_split_groups(params, where)):
            label = options.pop("name", str(k))
            unknown = sorted(set(options) - set(self._group_options))
            if unknown:
                raise ValueError(f"{where}: parameter group {k} sets {unknown}; a group may set {list(self._group_options)} "
                                 "(the other hyperparameters are the optimizer's)")
            group = {**defaults, **{key: self._check_option(key, value) for key, value in options.items()},
                     "name": label, "params": []}
            for name, p in items:
                if id(p) in seen:  # tied weights count once; in two groups is an error
                    if seen[id(p)] != k:
                        raise ValueError(f"{where}: parameter {name or position!r} is in groups {seen[id(p)]} and {k}; "
                                         "a parameter may belong to one group only")
                elif p.requires_grad:  # frozen W0 gets nothing
                    seen[id(p)] = k
                    named.append((str(position) if name is None else name, p))
                    group["params"].append(p)
                    self.group_of.append(k)
                position += 1
            self.param_groups.append(group)
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

    def _check_option(self, name: str, value):
        """Validate and normalise one hyperparameter (a subclass checks its own)."""
        if name == "lr":
            return _nonnegative(f"{type(self).__name__}: lr", value)
        return value

    # ------------------------------------------------------------------ the loop
    def zero_grad(self) -> None:
        """Drop the gradients (``p.grad = None``). The next backward starts from nothing."""
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """Update, in place, every trained parameter that has a gradient."""
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
            self._update(i, param, grad, self.param_groups[self.group_of[i]])

    def _update(self, i: int, param, grad, group: dict) -> None:
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
        groups = f"; {len(self.param_groups)} groups" if len(self.param_groups) > 1 else ""
        n = sum(p.size for p in self.params)
        return (f"{type(self).__name__}({hyper}{groups}; {len(self.params)} tensors, {n:,} values, "
                f"state {self.state_bytes():,} bytes)")


# ----------------------------------------------------------------------------- SGD
class SGD(Optimizer):
    """Stochastic gradient descent with PyTorch's semantics (dampening 0).

        d ← g + λ·p                        (weight_decay λ: L2 added to the gradient, coupled)
        b ← μ·b + d                        (momentum μ > 0; b starts at 0, so b₁ = d₁)
        d ← d + μ·b   if nesterov,   else   d ← b
        p ← p − lr·d

    A parameter group may set its own ``lr`` and ``weight_decay``; momentum and nesterov are
    the optimizer's (they decide which state arrays exist).
    State: one ``momentum_buffer`` per parameter when μ > 0, and none otherwise.
    """

    _hyperparameters = ("lr", "momentum", "weight_decay", "nesterov")
    _group_options = ("lr", "weight_decay")
    weight_decay = _GroupValue()

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False):
        if momentum < 0:
            raise ValueError(f"SGD: momentum must be >= 0, got {momentum}")
        if nesterov and momentum <= 0:
            raise ValueError("SGD: nesterov=True needs momentum > 0")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        self._state_keys = ("momentum_buffer",) if self.momentum else ()
        self._n_scratch = 2 if self.nesterov else 1
        super().__init__(params, lr=lr, weight_decay=weight_decay)

    def _check_option(self, name, value):
        if name in ("weight_decay", "momentum"):
            return _nonnegative(f"SGD: {name}", value)
        if name == "nesterov":
            if not isinstance(value, bool):
                raise ValueError(f"SGD: nesterov must be True or False, got {value!r}")
            return value
        return super()._check_option(name, value)

    def _check_layout(self, hyperparameters: dict, where: str) -> None:
        """A saved momentum / nesterov must need the state arrays and scratch buffers this SGD has."""
        momentum, nesterov = hyperparameters.get("momentum", self.momentum), hyperparameters.get("nesterov", self.nesterov)
        if bool(momentum) != bool(self.momentum) or nesterov != self.nesterov:
            raise ValueError(f"{where}: the state was saved with momentum={momentum!r}, nesterov={nesterov!r}; this SGD "
                             f"has momentum={self.momentum!r}, nesterov={self.nesterov!r}. Build the SGD with the "
                             "saved momentum (zero or not) and nesterov")

    def _update(self, i, param, grad, group):
        xp = bk.get_array_module(param)
        scratch = self._scratch_for(param)
        d = grad  # read only: never written
        if group["weight_decay"]:
            xp.multiply(param, group["weight_decay"], out=scratch)
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
        xp.multiply(d, group["lr"], out=scratch)
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

    A parameter group may set its own ``lr``, ``betas``, ``eps`` and ``weight_decay``.
    State: ``exp_avg`` and ``exp_avg_sq`` per trained parameter, so 2 × the parameters' bytes.
    For LoRA those are the A and B matrices only.
    """

    _state_keys = ("exp_avg", "exp_avg_sq")
    _nonnegative_state = ("exp_avg_sq",)
    _hyperparameters = ("lr", "betas", "eps", "weight_decay")
    _group_options = ("lr", "betas", "eps", "weight_decay")
    betas, eps, weight_decay = _GroupValue(), _GroupValue(), _GroupValue()

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def _check_option(self, name, value):
        if name == "betas":
            beta1, beta2 = (float(b) for b in value)
            if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
                raise ValueError(f"AdamW: betas must lie in [0, 1), got {tuple(value)}")
            return beta1, beta2
        if name in ("eps", "weight_decay"):
            return _nonnegative(f"AdamW: {name}", value)
        return super()._check_option(name, value)

    def _update(self, i, param, grad, group):
        m, v = self.state[i]["exp_avg"], self.state[i]["exp_avg_sq"]
        scratch = self._scratch_for(param)
        if not _in_pieces(param, grad, m, v):
            _adamw_pass(param, grad, m, v, scratch, group, self.steps[i])
            return
        flat = [a.reshape(-1) for a in (param, grad, m, v, scratch)]  # views: every array is C-contiguous
        for start in range(0, param.size, _PIECE):
            _adamw_pass(*(a[start:start + _PIECE] for a in flat), group, self.steps[i])


# On the CPU the 13 passes run over cache-sized pieces of a large parameter, each piece through
# all of them before the next: elementwise, so bit for bit the same, and faster than 13 passes
# over RAM (docs/performance.md, "Where a GPT-2-size training step spends its time").
_PIECE = 1 << 16  # values: 256 KB of float32 per array


def _in_pieces(*arrays) -> bool:
    """Update piece by piece: a large NumPy parameter whose arrays are all C-contiguous (so flat views exist)."""
    return (arrays[0].size > _PIECE and bk.backend_of(arrays[0]) == "numpy"
            and all(a.flags.c_contiguous for a in arrays))


def _adamw_pass(param, grad, m, v, scratch, group: dict, t: int) -> None:
    """One AdamW update of ``param`` in place (see ``AdamW``): 13 elementwise passes, no allocation."""
    xp = bk.get_array_module(param)
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    beta1, beta2 = group["betas"]
    if weight_decay:
        param *= 1.0 - lr * weight_decay  # p = p(1 - lr·λ)
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
    scratch += eps * bias_correction2_sqrt  # √v + ε√(1-β2ᵗ)
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


# ----------------------------------------------------------------------------- LoRA+
def lora_plus_param_groups(model, lr: float, ratio: float = 16.0, weight_decay: float = 0.0) -> list[dict]:
    """Parameter groups for LoRA+ (Hayou et al. 2024, arXiv 2402.12354): lr_B = ratio × lr_A.

    LoRA+ argues that with width n → ∞ the same learning rate for A and B is inefficient and
    that B should learn faster, by a fixed ratio λ = lr_B / lr_A (the paper recommends ~16 for
    large models; ratio=1 gives plain LoRA). Returns, for the model's trainable parameters:

        [{"name": "lora_A", "params": [(name, A), ...], "lr": lr,         "weight_decay": wd},
         {"name": "lora_B", "params": [(name, B), ...], "lr": ratio · lr, "weight_decay": wd},
         {"name": "other",  "params": [...],            "lr": lr,         "weight_decay": wd}]

    "other" (the adapter's bias deltas, DoRA magnitudes, a trained head) is left out when empty. The
    "name" key is a label only (``optim.AdamW(groups, ...)`` ignores it). A and B are found
    by their parameter names (``.lora_A.`` / ``.lora_B.``), so any model made with
    ``lora.apply_lora`` works.
    """
    if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0):
        raise ValueError(f"lora_plus_param_groups: ratio = lr_B / lr_A must be a number > 0, got {ratio!r}")
    groups = {"lora_A": [], "lora_B": [], "other": []}
    for name, p in model.named_parameters(trainable_only=True):
        kind = "lora_A" if ".lora_A." in name else "lora_B" if ".lora_B." in name else "other"
        groups[kind].append((name, p))
    if not groups["lora_A"] or not groups["lora_B"]:
        raise ValueError(
            "lora_plus_param_groups: the model has no trainable lora_A / lora_B parameters; call "
            "lora.apply_lora(model, cfg) and lora.mark_only_lora_as_trainable(model) first"
        )
    lrs = {"lora_A": float(lr), "lora_B": float(lr) * float(ratio), "other": float(lr)}
    return [{"name": kind, "params": params, "lr": lrs[kind], "weight_decay": float(weight_decay)}
            for kind, params in groups.items() if params]
