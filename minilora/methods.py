"""The fine-tuning methods the paper compares (Hu et al. 2021, Sec. 5.1), installed into a GPT by one call.

    model = apply_method(model, "adapter_h", r=4)   # only the adapters (and LayerNorms) train
    model.num_parameters(trainable_only=True)       # |Θ|

    method      paper name   what trains                                  |Θ| (checked in the tests)
    full        FT           every weight (eq. 1)                         |Φ₀|
    ft_top2     FT^Top2      the last two blocks only                     2 blocks
    bitfit      BitFit       every bias (Linear and LayerNorm biases)     Σ biases
    adapter_h   Adapter^H    2 bottleneck adapters per block (Houlsby)    L̂_Adpt·(2·d·r + r + d) + 2·L̂_LN·d
                             + the block's LayerNorms                     with L̂_Adpt = L̂_LN = 2·n_layer
    adapter_l   Adapter^L    1 adapter after the MLP, behind its own      the same formula with
                             LayerNorm (Lin et al. 2020)                  L̂_Adpt = L̂_LN = n_layer
    preembed    PreEmbed     l_p prefix + l_i infix input vectors         d·(l_p + l_i)
    lora        LoRA         A and B of the adapted matrices (eq. 2)      2·L̂·d·r

Each new op is a ``Function`` with its hand-written backward beside its forward, like the
layers of ``minilora.functional``: ``bottleneck_adapter`` (down-projection, ReLU,
up-projection, residual; one fused op), ``insert_prompt_vectors`` and ``gather_positions``
(PreEmbed). ``HYPERPARAMS`` is the one table of hyper-parameters per method (AdamW's and the
method's own); ``minilora.recipes.finetune(task, method)`` trains with it.

Adapters start equal to the base model (the up-projection is 0, as LoRA's B), so a fine-tuning
run begins at the pre-trained model. PreEmbed cannot: inserting vectors changes the input.
PreEmbed also costs context: the l_p + l_i vectors occupy positions of the model's
``block_size``, so the ``PreEmbedGPT`` that ``apply_method`` returns has a ``config.block_size``
l_p + l_i smaller than the base's, and a sequence that does not fit raises an error that says so
(the paper, Sec. 3: "reserving a part of the sequence length for adaptation necessarily reduces
the sequence length available").
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import backend as bk
from . import functional as F
from . import nn
from . import lora
from .backend import get_array_module
from .data import Tokenizer
from .function import Function
from .functional import _rows
from .lora.model import _replace_child
from .models.gpt import GPT
from .tensor import Tensor

__all__ = [
    "HYPERPARAMS",
    "METHODS",
    "PAPER_NAMES",
    "TASK_HYPERPARAMS",
    "TRAINING_KEYS",
    "AdaptedLinear",
    "Adapter",
    "PreEmbedGPT",
    "PromptVectors",
    "apply_method",
    "bottleneck_adapter",
    "expected_trainable",
    "gather_positions",
    "hyperparams",
    "insert_prompt_vectors",
    "randomize_zero_init",
]

METHODS = ("full", "ft_top2", "bitfit", "adapter_h", "adapter_l", "preembed", "lora")
PAPER_NAMES = {
    "full": "FT", "ft_top2": "FT^Top2", "bitfit": "BitFit", "adapter_h": "Adapter^H",
    "adapter_l": "Adapter^L", "preembed": "PreEmbed", "lora": "LoRA",
}

# THE hyper-parameter table, for the shipped 4-layer, d = 128 model: ``lr`` and ``weight_decay``
# go to AdamW, ``steps`` is the run's length (batch 16, linear warm-up over the first 10 %),
# ``length_group`` > 1 batches examples of similar length together (train.length_grouped_batches),
# the rest goes to ``apply_method``. LoRA's alpha defaults to 2r. FT's and LoRA's learning rates
# are chosen on the val split (docs/results.md, "Choosing the learning rates"); the other methods'
# rows are fixed settings that the experiments do not tune. Budgets are close to LoRA's r = 4 on Wq, Wv.
HYPERPARAMS = {
    "full": {"lr": 1e-3, "weight_decay": 0.01, "steps": 150, "length_group": 16},
    "ft_top2": {"lr": 3e-3, "weight_decay": 0.01, "steps": 300, "n_top": 2},
    "bitfit": {"lr": 3e-2, "weight_decay": 0.0, "steps": 300},
    "adapter_h": {"lr": 1e-2, "weight_decay": 0.0, "steps": 300, "r": 4},
    "adapter_l": {"lr": 1e-2, "weight_decay": 0.0, "steps": 300, "r": 8},
    "preembed": {"lr": 3e-2, "weight_decay": 0.0, "steps": 300, "l_p": 4, "l_i": 2},
    "lora": {"lr": 1e-2, "weight_decay": 0.0, "steps": 200, "r": 4, "targets": ("q", "v"), "length_group": 16},
}
TRAINING_KEYS = ("lr", "weight_decay", "steps", "length_group")  # the keys of HYPERPARAMS that are not apply_method's

# Where one task departs from its method's row of HYPERPARAMS: the learning rates chosen on val
# (docs/results.md), and the steps. classify decides everything at the one "=>" position, so a
# run sees ~16x less signal per step than on e2e or parse and needs more steps; sql writes a query
# language the base has never produced, so both methods need more steps to learn it.
TASK_HYPERPARAMS = {("lora", "parse"): {"lr": 2e-2},
                    ("full", "classify"): {"lr": 3e-4, "steps": 750},
                    ("lora", "classify"): {"lr": 5e-3, "steps": 500},
                    ("full", "sql"): {"lr": 3e-3, "steps": 250},
                    ("lora", "sql"): {"lr": 2e-2, "steps": 600}}


def hyperparams(method: str, task: str | None = None) -> dict:
    """``HYPERPARAMS[method]`` with ``task``'s departures (``TASK_HYPERPARAMS``) applied: the
    settings ``recipes.finetune(task, method)`` trains with when nothing overrides them."""
    if method not in HYPERPARAMS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    return {**HYPERPARAMS[method], **TASK_HYPERPARAMS.get((method, task), {})}


# ----------------------------------------------------------------------------- the adapter op
class BottleneckAdapter(Function):
    """y = res + up(relu(down(x))) = res + relu(x W_dᵀ + b_d) W_uᵀ + b_u   (res = x unless given).

    The adapter of Houlsby et al. (2019) and Lin et al. (2020): a bottleneck of width r with
    a skip connection. With z = x W_dᵀ + b_d (N × r), a = relu(z) and g = ∂L/∂y (N × d):

        ∂L/∂W_u = gᵀ a,   ∂L/∂b_u = Σ g,   ∂L/∂a = g W_u,   ∂L/∂z = ∂L/∂a ⊙ [z > 0]
        ∂L/∂W_d = (∂L/∂z)ᵀ x,   ∂L/∂b_d = Σ ∂L/∂z,   ∂L/∂x = (∂L/∂z) W_d  (+ g when res = x)
        ∂L/∂res = g.
    """

    def forward(self, x, down_weight, down_bias, up_weight, up_bias, residual=None):
        r, k = down_weight.shape
        if x.shape[-1] != k or up_weight.shape != (k if residual is None else residual.shape[-1], r):
            raise ValueError(
                f"bottleneck_adapter: input {tuple(x.shape)}, down {tuple(down_weight.shape)} (r, d) and up "
                f"{tuple(up_weight.shape)} (d, r) do not fit together"
            )
        x2 = _rows(x)
        z = x2 @ down_weight.T  # (N, r): the bottleneck
        z += down_bias
        a = z * (z > 0)  # relu
        y = a @ up_weight.T  # (N, d)
        y += up_bias
        y = y.reshape(*x.shape[:-1], up_weight.shape[0])
        y += x if residual is None else residual
        self.save_for_backward(x2, z, a, down_weight, up_weight)
        self.in_shape, self.own_residual = x.shape, residual is None
        return y

    def backward(self, grad):
        x2, z, a, down_weight, up_weight = self.saved
        need_x, need_dw, need_db, need_uw, need_ub, need_res = self.needs_input_grad
        g = _rows(grad)  # (N, d)
        d_up_w = g.T @ a if need_uw else None  # (d, r)
        d_up_b = g.sum(axis=0) if need_ub else None
        dx = d_down_w = d_down_b = None
        if need_x or need_dw or need_db:
            dz = g @ up_weight  # (N, r)
            dz *= z > 0
            if need_dw:
                d_down_w = dz.T @ x2  # (r, k)
            if need_db:
                d_down_b = dz.sum(axis=0)
            if need_x:
                dx = (dz @ down_weight).reshape(self.in_shape)
                if self.own_residual:
                    dx += grad
        d_res = grad if need_res else None
        return dx, d_down_w, d_down_b, d_up_w, d_up_b, d_res


def bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, residual=None):
    """res + relu(x W_dᵀ + b_d) W_uᵀ + b_u, with res = x when ``residual`` is None (one fused op)."""
    return BottleneckAdapter.apply(x, down_weight, down_bias, up_weight, up_bias, residual)


class Adapter(nn.Module):
    """A bottleneck adapter d → r → d with a skip connection; optionally behind its own LayerNorm.

    Houlsby (``layer_norm=False``): h + up(relu(down(h))).
    Lin et al. (``layer_norm=True``): h + up(relu(down(LN(h)))).
    ``up`` starts at 0 (weight and bias), so the adapter starts as the identity.
    """

    def __init__(self, d: int, r: int, layer_norm: bool = False, eps: float = 1e-5, dtype=np.float32):
        super().__init__()
        if not 1 <= r:
            raise ValueError(f"Adapter: the bottleneck width r must be >= 1, got {r}")
        self.d, self.r = d, r
        self.ln = nn.LayerNorm(d, eps=eps, dtype=dtype) if layer_norm else None
        self.down = nn.Linear(d, r, dtype=dtype)  # (r, d): PyTorch's default init
        self.up = nn.Linear(r, d, dtype=dtype)  # (d, r): zeros, below
        self.up.weight.data[...] = 0.0
        self.up.bias.data[...] = 0.0

    def forward(self, h):
        if self.ln is None:
            return bottleneck_adapter(h, self.down.weight, self.down.bias, self.up.weight, self.up.bias)
        return bottleneck_adapter(self.ln(h), self.down.weight, self.down.bias, self.up.weight, self.up.bias,
                                  residual=h)

    def extra_repr(self) -> str:
        return f"d={self.d}, r={self.r}, layer_norm={self.ln is not None}"


class AdaptedLinear(nn.Module):
    """A Linear followed by an adapter: adapter(x Wᵀ + b).

    It owns the Linear's own ``weight`` and ``bias`` Parameters, so their names
    (``blocks.0.attn.o.weight``) do not change and a base checkpoint still loads. Placed on
    ``attn.o`` and ``mlp.proj`` the adapter acts on a sub-layer's output before the residual
    addition, where Houlsby et al. put it.
    """

    def __init__(self, linear: nn.Linear, adapter: Adapter):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.adapter = adapter

    def forward(self, x):
        return self.adapter(F.linear(x, self.weight, self.bias))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# ----------------------------------------------------------------------------- PreEmbed ops
class InsertPromptVectors(Function):
    """Build the longer input [prefix, x_0..x_s, infix, x_{s+1}..] of every row (s: its separator).

    out[b, token_pos[b, t]] = x[b, t],  out[b, :l_p] = prefix,  out[b, infix_pos[b, j]] = infix[j].
    Backward gathers the same places: dx = g[b, token_pos], dprefix = Σ_b g[b, :l_p],
    dinfix[j] = Σ_b g[b, infix_pos[b, j]].
    """

    def forward(self, x, prefix, infix, token_pos=None, infix_pos=None, length=0):
        xp = get_array_module(x)
        Bsz, _, C = x.shape
        rows = xp.arange(Bsz)[:, None]
        out = xp.empty((Bsz, length, C), dtype=x.dtype)
        out[rows, token_pos] = x
        if prefix is not None:
            out[:, :prefix.shape[0]] = prefix
        if infix is not None:
            out[rows, infix_pos] = infix
        self.rows, self.token_pos, self.infix_pos = rows, token_pos, infix_pos
        self.n_prefix = 0 if prefix is None else prefix.shape[0]
        return out

    def backward(self, grad):
        need_x, need_prefix, need_infix = self.needs_input_grad
        dx = grad[self.rows, self.token_pos] if need_x else None
        dprefix = grad[:, :self.n_prefix].sum(axis=0) if need_prefix else None
        dinfix = grad[self.rows, self.infix_pos].sum(axis=0) if need_infix else None
        return dx, dprefix, dinfix


def insert_prompt_vectors(x, prefix, infix, token_pos, infix_pos, length):
    """x (B, T, C) -> (B, length, C) with the prefix (l_p, C) first and the infix (l_i, C) at ``infix_pos``."""
    return InsertPromptVectors.apply(x, prefix, infix, token_pos=token_pos, infix_pos=infix_pos, length=length)


class GatherPositions(Function):
    """y[b, t] = h[b, pos[b, t]] for positions that are distinct within a row.

    Backward: dh = 0 except dh[b, pos[b, t]] = g[b, t] (distinct positions: no sums needed).
    """

    def forward(self, h, pos=None):
        xp = get_array_module(h)
        self.rows, self.pos, self.in_shape = xp.arange(h.shape[0])[:, None], pos, h.shape
        return h[self.rows, pos]

    def backward(self, grad):
        xp = get_array_module(grad)
        dh = xp.zeros(self.in_shape, dtype=grad.dtype)
        dh[self.rows, self.pos] = grad
        return dh


def gather_positions(h, pos):
    """h (B, T', C), pos (B, T) distinct per row -> (B, T, C)."""
    return GatherPositions.apply(h, pos=pos)


class PromptVectors(nn.Module):
    """The trainable input vectors of PreEmbed: ``prefix`` (l_p, d) and ``infix`` (l_i, d).

    They start as copies of the token embeddings of random vocabulary words (Li & Liang 2021
    found that real-word initialisations train more stably than random vectors).
    """

    def __init__(self, wte: nn.Embedding, l_p: int, l_i: int, sep_id: int, context_size: int):
        super().__init__()
        if l_p < 0 or l_i < 0 or l_p + l_i < 1:
            raise ValueError(f"PreEmbed needs l_p >= 0, l_i >= 0 and l_p + l_i >= 1, got l_p={l_p}, l_i={l_i}")
        if l_p + l_i >= context_size:
            raise ValueError(
                f"PreEmbed: l_p + l_i = {l_p + l_i} vectors would fill the whole context of {context_size} positions"
            )
        self.l_p, self.l_i, self.sep_id, self.context_size = int(l_p), int(l_i), int(sep_id), int(context_size)
        V = wte.weight.shape[0]
        words = (bk.to_numpy(bk.random_uniform((l_p + l_i,), np.float64)) * V).astype(np.int64)
        init = wte.weight.data[bk.asarray(words, backend=wte.weight.backend)].copy()
        self.prefix = nn.Parameter(init[:l_p], backend=wte.weight.backend) if l_p else None  # the model's backend
        self.infix = nn.Parameter(init[l_p:], backend=wte.weight.backend) if l_i else None

    def extra_repr(self) -> str:
        return f"l_p={self.l_p}, l_i={self.l_i}, sep_id={self.sep_id}"


class PreEmbedGPT(nn.Module):
    """A GPT whose input is [prefix] x [sep] [infix] y: PreEmbed (prefix-embedding tuning).

    ``apply_method(model, "preembed")`` returns one. It holds the GPT's own layers (the same
    objects: parameter names stay GPT-2's, ``preembed.prefix`` and ``preembed.infix`` are added)
    and runs them through ``GPT.forward_embeddings``, so the model code is not copied.
    ``model(idx)`` still takes the plain token ids and returns logits (B, T, V) for them, so
    ``loss``, ``generate(model, ...)`` and ``evaluate`` work unchanged: the output for the separator is read
    at the last infix vector, whose next position holds y₁. The vectors occupy l_p + l_i of the
    pre-trained positions, so ``config.block_size`` is the usable length (the base's minus
    l_p + l_i); ``preembed.context_size`` keeps the base's.
    """

    loss = GPT.loss  # the same loss as a GPT: it only calls self(idx)

    def __init__(self, gpt: GPT, vectors: PromptVectors):
        super().__init__()
        for name, child in gpt._modules.items():  # wte, wpe, drop, blocks, ln_f: shared, not copied
            setattr(self, name, child)
        self.preembed = vectors
        object.__setattr__(self, "gpt", gpt)  # not a child: its layers are registered above
        self.config = dataclasses.replace(gpt.config, block_size=gpt.config.block_size - vectors.l_p - vectors.l_i)

    def _positions(self, idx):
        """New places of every token and infix vector, and where each output is read."""
        pe: PromptVectors = self.preembed
        xp = get_array_module(idx)
        is_sep = idx == pe.sep_id
        has_sep = is_sep.any(axis=1)
        if not bool(has_sep.all()):
            rows = [int(i) for i in np.flatnonzero(~bk.to_numpy(has_sep))[:5]]
            raise ValueError(
                f"PreEmbed inserts its {pe.l_i} infix vectors after the separator token (id {pe.sep_id}), but rows {rows} "
                "have none: feed [bos] x [sep] ... sequences (minilora.data.collate / prompt_ids)"
            )
        sep = is_sep.argmax(axis=1)[:, None]  # (B, 1): the first separator of each row
        t = xp.arange(idx.shape[1])[None, :]  # (1, T)
        token_pos = pe.l_p + t + pe.l_i * (t > sep)  # (B, T)
        read_pos = pe.l_p + t + pe.l_i * (t >= sep)  # the separator is read at the last infix vector
        infix_pos = pe.l_p + sep + 1 + xp.arange(pe.l_i)[None, :]  # (B, l_i)
        return token_pos, read_pos, infix_pos

    def forward(self, idx, cache=None) -> Tensor:
        pe: PromptVectors = self.preembed
        idx = bk.asarray(idx.data if isinstance(idx, Tensor) else idx, backend=self.wte.weight.backend)
        if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"PreEmbedGPT expects integer token ids of shape (batch, time), got {idx.dtype} {tuple(idx.shape)}")
        T = idx.shape[1]
        past = cache.length if cache is not None else 0
        inserting = past == 0  # the first call (the whole prompt) gets the vectors; cached steps append tokens
        length = T + (pe.l_p + pe.l_i if inserting else 0)
        if past + length > pe.context_size:
            used = past - pe.l_p - pe.l_i if not inserting else 0
            raise ValueError(
                f"PreEmbed: {used + T} tokens + {pe.l_p} prefix + {pe.l_i} infix vectors = {past + length} positions, "
                f"more than the {pe.context_size} the model has; with PreEmbed at most {self.config.block_size} tokens "
                "fit (model.config.block_size): shorten the sequence or use smaller l_p + l_i"
            )
        x = self.wte(idx)  # (B, T, C)
        if not inserting:
            return self.gpt.forward_embeddings(x, cache)  # (B, T, V)
        token_pos, read_pos, infix_pos = self._positions(idx)
        x = insert_prompt_vectors(x, pe.prefix, pe.infix, token_pos, infix_pos, length)  # (B, T', C)
        logits = self.gpt.forward_embeddings(x, cache)  # (B, T', V)
        return gather_positions(logits, read_pos)  # (B, T, V): one output per input token


# ----------------------------------------------------------------------------- apply_method
def _trainable(params) -> None:
    for p in params:
        p.requires_grad = True


def _lora(model, r, alpha=None, targets=("q", "v"), adapter_name="default", init="kaiming", dropout=0.0):
    config = lora.LoRAConfig(r=r, alpha=float(alpha if alpha is not None else 2 * r), target_modules=tuple(targets),
                             dropout=dropout, init=init)
    lora.apply_lora(model, config, adapter_name=adapter_name)
    lora.mark_only_lora_as_trainable(model)


def apply_method(model: GPT, method: str, **hp) -> nn.Module:
    """Install ``method`` into ``model``, make only its parameters trainable, return the model to train.

    The returned model is ``model`` itself, changed in place, for every method but PreEmbed, which
    returns a ``PreEmbedGPT`` holding ``model``'s layers (PreEmbed changes the input, not a layer).
    |Θ| is ``model.num_parameters(trainable_only=True)``.

    Hyper-parameters (unknown ones raise; defaults from ``HYPERPARAMS[method]``):
      ft_top2: ``n_top``; adapter_h: ``r`` (bottleneck), ``train_layer_norms`` (True, as
      Houlsby); adapter_l: ``r``; preembed: ``l_p``, ``l_i``, ``sep_id`` (the tokenizer's "=>");
      lora: ``r``, ``alpha`` (2r), ``targets``, ``adapter_name`` ("default"), ``init``, ``dropout``.
    The training keys of ``HYPERPARAMS`` (``lr``, ``weight_decay``, ``steps``, ``length_group``) are accepted and
    ignored, so ``apply_method(model, m, **HYPERPARAMS[m])`` works.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if not isinstance(model, GPT):
        raise TypeError(f"apply_method needs a minilora GPT, got {type(model).__name__} (was a method applied already?)")
    allowed = {
        "full": set(), "bitfit": set(), "ft_top2": {"n_top"}, "adapter_h": {"r", "train_layer_norms"},
        "adapter_l": {"r"}, "preembed": {"l_p", "l_i", "sep_id"},
        "lora": {"r", "alpha", "targets", "adapter_name", "init", "dropout"},
    }[method]
    hp = {k: v for k, v in hp.items() if k not in TRAINING_KEYS}
    unknown = sorted(set(hp) - allowed)
    if unknown:
        raise TypeError(f"apply_method({method!r}): unknown hyper-parameters {unknown}; it takes {sorted(allowed) or 'none'}")
    hp = {**{k: v for k, v in HYPERPARAMS[method].items() if k not in TRAINING_KEYS}, **hp}
    model.requires_grad_(False)
    cfg, dtype = model.config, model.dtype
    if method == "full":
        model.requires_grad_(True)
    elif method == "ft_top2":
        n_top = int(hp["n_top"])
        if not 1 <= n_top <= cfg.n_layer:
            raise ValueError(f"ft_top2: n_top must be in 1..{cfg.n_layer} (the model's blocks), got {n_top}")
        for block in list(model.blocks)[-n_top:]:
            _trainable(block.parameters())
    elif method == "bitfit":
        _trainable(p for name, p in model.named_parameters() if name.endswith(".bias"))
    elif method in ("adapter_h", "adapter_l"):
        houlsby = method == "adapter_h"
        r = int(hp["r"])
        if not 1 <= r <= cfg.d_model:
            raise ValueError(f"{method}: the bottleneck width r must be in 1..d_model={cfg.d_model}, got {r}")
        sites = ("attn.o", "mlp.proj") if houlsby else ("mlp.proj",)
        for i, block in enumerate(model.blocks):
            for site in sites:
                linear = getattr(getattr(block, site.split(".")[0]), site.split(".")[1])
                if not isinstance(linear, nn.Linear):
                    raise TypeError(f"{method}: {site} is a {type(linear).__name__}, not a plain Linear (was a method applied already?)")
                adapter = Adapter(cfg.d_model, r, layer_norm=not houlsby, eps=cfg.layer_norm_eps, dtype=dtype)
                adapter.to(backend=linear.weight.backend)
                _replace_child(model, f"blocks.{i}.{site}", AdaptedLinear(linear, adapter))  # parameter order stays GPT-2's
                _trainable(adapter.parameters())
            if houlsby and hp.get("train_layer_norms", True):
                _trainable(block.ln1.parameters() + block.ln2.parameters())
    elif method == "preembed":
        sep_id = hp.get("sep_id", Tokenizer.default().sep_id)
        vectors = PromptVectors(model.wte, int(hp["l_p"]), int(hp["l_i"]), sep_id, cfg.block_size)
        _trainable(vectors.parameters())
        return PreEmbedGPT(model, vectors)
    elif method == "lora":
        _lora(model, **hp)
    return model


def expected_trainable(method: str, config, **hp) -> int:
    """|Θ| by the paper's formulas (Sec. 5.1 and Table footnotes), for a GPTConfig ``config``.

    LoRA: 2·L̂·d·r; adapters: L̂_Adpt·(2·d·r + r + d) + 2·L̂_LN·d; PreEmbed: d·(l_p + l_i).
    """
    d, L = config.d_model, config.n_layer
    hp = {**HYPERPARAMS.get(method, {}), **hp}
    if method == "lora":
        return 2 * len(tuple(hp["targets"])) * L * d * hp["r"]
    if method in ("adapter_h", "adapter_l"):
        r = hp["r"]
        if method == "adapter_h":
            n_adapters, n_ln = 2 * L, (2 * L if hp.get("train_layer_norms", True) else 0)
        else:
            n_adapters, n_ln = L, L
        return n_adapters * (2 * d * r + r + d) + 2 * n_ln * d
    if method == "preembed":
        return d * (hp["l_p"] + hp["l_i"])
    raise ValueError(f"the paper gives no closed formula for {method!r}; count model.num_parameters(trainable_only=True)")


def randomize_zero_init(model: nn.Module, std: float = 0.02) -> None:
    """Give the matrices that start at 0 (LoRA's B, the adapters' up-projection) random N(0, std²) values.

    A freshly installed adapter is the identity; timing runs and gradient checks want one that
    changes the output, as a trained adapter does. Draws from minilora's generator (``manual_seed``).
    """
    for name, p in model.named_parameters():
        if ".lora_B." in name or ".adapter.up." in name:
            p.data[...] = bk.random_normal(p.shape, p.dtype, backend=p.backend, std=std)
