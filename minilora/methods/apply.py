"""``apply_method``: install one fine-tuning method into a GPT and make only its parameters trainable.

One small function per method, in the table ``APPLY``; each one's keyword parameters are the
hyper-parameters the method takes, so the check for unknown ones is read from the table. The
parameters that ``HYPERPARAMS[method]`` holds have no default here: the table is their one home.
"""

from __future__ import annotations

import inspect

from .. import backend as bk
from .. import lora
from .. import nn
from ..data import Tokenizer
from ..models.gpt import GPT
from .adapters import AdaptedLinear, Adapter
from .preembed import PreEmbedGPT, PromptVectors
from .table import HYPERPARAMS, METHODS, TRAINING_KEYS, lora_alpha

__all__ = ["APPLY", "OPTIONS", "apply_method", "expected_trainable", "randomize_zero_init"]


def _trainable(params) -> None:
    for p in params:
        p.requires_grad = True


def _full(model):
    model.requires_grad_(True)
    return model


def _ft_top2(model, *, n_top):
    n_top, n_layer = int(n_top), model.config.n_layer
    if not 1 <= n_top <= n_layer:
        raise ValueError(f"ft_top2: n_top must be in 1..{n_layer} (the model's blocks), got {n_top}")
    for block in list(model.blocks)[-n_top:]:
        _trainable(block.parameters())
    return model


def _bitfit(model):
    _trainable(p for name, p in model.named_parameters() if name.endswith(".bias"))
    return model


def _adapters(model, method: str, r, train_layer_norms: bool):
    """Adapter^H (an adapter after attn.o and after mlp.proj) or Adapter^L (after mlp.proj, behind a LayerNorm)."""
    houlsby = method == "adapter_h"
    cfg, dtype, r = model.config, model.dtype, int(r)
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
            model.replace_submodule(f"blocks.{i}.{site}", AdaptedLinear(linear, adapter))  # parameter order stays GPT-2's
            _trainable(adapter.parameters())
        if houlsby and train_layer_norms:
            _trainable(block.ln1.parameters() + block.ln2.parameters())
    return model


def _adapter_h(model, *, r, train_layer_norms=True):
    return _adapters(model, "adapter_h", r, train_layer_norms)


def _adapter_l(model, *, r):
    return _adapters(model, "adapter_l", r, False)


def _preembed(model, *, l_p, l_i, sep_id=None):
    sep_id = Tokenizer.default().sep_id if sep_id is None else sep_id
    vectors = PromptVectors(model.wte, int(l_p), int(l_i), sep_id, model.config.block_size)
    _trainable(vectors.parameters())
    return PreEmbedGPT(model, vectors)


def _lora(model, *, r, targets, alpha=None, adapter_name="default", init="kaiming", dropout=0.0):
    config = lora.LoRAConfig(r=r, alpha=lora_alpha(r, alpha), target_modules=tuple(targets), dropout=dropout, init=init)
    lora.apply_lora(model, config, adapter_name=adapter_name)
    lora.mark_only_lora_as_trainable(model)
    return model


APPLY = {"full": _full, "ft_top2": _ft_top2, "bitfit": _bitfit, "adapter_h": _adapter_h, "adapter_l": _adapter_l,
         "preembed": _preembed, "lora": _lora}
# the hyper-parameters each method takes: its function's keyword parameters
OPTIONS = {method: tuple(sorted(set(inspect.signature(fn).parameters) - {"model"})) for method, fn in APPLY.items()}


def apply_method(model: GPT, method: str, **hp) -> nn.Module:
    """Install ``method`` into ``model``, make only its parameters trainable, return the model to train.

    The returned model is ``model`` itself, changed in place, for every method but PreEmbed, which
    returns a ``PreEmbedGPT`` holding ``model``'s layers (PreEmbed changes the input, not a layer).
    |Θ| is ``model.num_parameters(trainable_only=True)``.

    Hyper-parameters (``OPTIONS[method]``; unknown ones raise; defaults from ``HYPERPARAMS[method]``):
      ft_top2: ``n_top``; adapter_h: ``r`` (bottleneck), ``train_layer_norms`` (True, as
      Houlsby); adapter_l: ``r``; preembed: ``l_p``, ``l_i``, ``sep_id`` (the tokenizer's "=>");
      lora: ``r``, ``alpha`` (``lora_alpha``: 2r), ``targets``, ``adapter_name`` ("default"), ``init``, ``dropout``.
    The training keys of ``HYPERPARAMS`` (``lr``, ``weight_decay``, ``steps``, ``length_group``) are accepted and
    ignored, so ``apply_method(model, m, **HYPERPARAMS[m])`` works.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if not isinstance(model, GPT):
        raise TypeError(f"apply_method needs a minilora GPT, got {type(model).__name__} (was a method applied already?)")
    allowed = OPTIONS[method]
    hp = {k: v for k, v in hp.items() if k not in TRAINING_KEYS}
    unknown = sorted(set(hp) - set(allowed))
    if unknown:
        raise TypeError(f"apply_method({method!r}): unknown hyper-parameters {unknown}; it takes {list(allowed) or 'none'}")
    hp = {**{k: v for k, v in HYPERPARAMS[method].items() if k not in TRAINING_KEYS}, **hp}
    model.requires_grad_(False)
    return APPLY[method](model, **hp)


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
