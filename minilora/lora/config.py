"""LoRAConfig: what to adapt, at which rank, with which scaling — plain, validated data.

    cfg = LoRAConfig(r=4, alpha=32, target_modules=("q", "v"))
    cfg.scaling            # alpha / r = 8.0   (alpha / sqrt(r) with use_rslora=True)
    LoRAConfig(r=4, alpha=8, target_modules=("q", "v"), use_dora=True)   # DoRA: a learned magnitude per row
    LoRAConfig(r=4, alpha=8, target_modules=("q", "v"), init="pissa")    # PiSSA: A, B from the top-r SVD of W0

The paper (Hu et al. 2021, Sec. 4.1) scales ΔW x by α/r so that changing r needs
little re-tuning of the learning rate; rsLoRA (Kalajdzievski 2023, arXiv 2312.03732)
argues for α/√r so that larger ranks keep learning. DoRA (Liu et al. 2024, arXiv 2402.09353)
and PiSSA (Meng et al. 2024, arXiv 2404.02948) are switches of the same config.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, fields

__all__ = ["ADAPTER_PARTS", "BASE_ADAPTER", "BIAS_MODES", "INIT_MODES", "MAX_DROPOUT", "MAX_SCALING", "LoRAConfig",
           "as_adapter_names", "check_adapter_name", "check_rank", "check_scaling"]

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("kaiming", "gaussian", "pissa")

# The limits every reader and writer of adapters shares (LoRAConfig, the CLI, adapter files, the PEFT reader):
MAX_SCALING = 1e4  # s = alpha / r (or alpha / sqrt(r)); the paper's runs use s of about 1..32
MAX_DROPOUT = 0.9  # in adapter files (LoRAConfig allows [0, 1)); above 0.9 the adapter sees almost nothing of x


def check_scaling(alpha, r: int, use_rslora: bool = False, where: str = "LoRAConfig") -> float:
    """s = alpha / r (alpha / √r with rsLoRA), or ValueError when s is outside (0, MAX_SCALING]."""
    s = alpha / (math.sqrt(r) if use_rslora else r)
    if not (math.isfinite(s) and 0.0 < s <= MAX_SCALING):
        raise ValueError(
            f"{where}: alpha {alpha:.6g} with r {r} gives the scaling s = alpha / {'√r' if use_rslora else 'r'} = "
            f"{s:.3g}, outside (0, {MAX_SCALING:g}] (the paper's runs use s of about 1..32); lower alpha"
        )
    return s


def check_rank(r: int, shape, where: str) -> None:
    """ValueError unless a rank-r update fits the (d, k) weight ``shape`` of the layer ``where`` names."""
    d, k = shape
    if r > min(d, k):
        raise ValueError(
            f"LoRAConfig.r={r} is larger than min(d, k) = {min(d, k)} of {where}: "
            f"a rank-r update of a {d}x{k} matrix needs r <= {min(d, k)}"
        )


# The parameters an adapter adds to a layer: ``<layer>.<part>.<adapter>`` (lora_magnitude: DoRA adapters only).
ADAPTER_PARTS = ("lora_A", "lora_B", "lora_magnitude")

# The name a mixed-task batch uses for "no adapter: the base model" (``lora.mixed_batch(model, [...])``).
BASE_ADAPTER = "__base__"

_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")


def check_adapter_name(name) -> str:
    """Adapter names become parameter-name components (``blocks.0.attn.q.lora_A.<name>``)."""
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name) or name == BASE_ADAPTER:
        raise ValueError(
            f"adapter name {name!r} is not allowed: use letters, digits, '_' and '-' (no dots, it becomes part of "
            f"parameter names like 'blocks.0.attn.q.lora_A.<name>'), and not {BASE_ADAPTER!r}, which a mixed batch "
            "uses for the base model"
        )
    return name


def as_adapter_names(names) -> list:
    """One adapter name, or a sequence of them, as a list of names."""
    return [names] if isinstance(names, str) else list(names)


@dataclass(frozen=True)
class LoRAConfig:
    """The hyper-parameters of one adapter.

    r: the rank of ΔW = B A (B ∈ R^{d×r}, A ∈ R^{r×k}); 1 <= r <= min(d, k) of every target
       (checked by ``apply_lora``, which knows the shapes).
    alpha: ΔW x is scaled by alpha / r (the paper sets alpha to the first r it tries and does not tune it);
       the scaling must lie in (0, MAX_SCALING].
    target_modules: Linear layers to adapt, by the last component of their path ("q" matches
       ``blocks.0.attn.q``) or by a dotted suffix / full path ("blocks.0.attn.q").
    dropout: dropout on the adapter's input x (the base path W0 x is not dropped), as in loralib.
    bias: which biases the adapter trains: "none", "all", or "lora_only" (those of adapted layers).
       They train as the adapter's own deltas ``<module>.lora_bias.<adapter>`` (``lora.bias``), never
       in the base biases, and are saved with the adapter.
    init: how A and B start (the adapted model always starts equal to the base):
       "kaiming" — U(-1/√k, 1/√k), loralib's ``kaiming_uniform_(A, a=√5)`` (and PEFT's default);
       "gaussian" — N(0, σ²) with σ = 1/r, PEFT's ``init_lora_weights="gaussian"``; the paper
       (Sec. 4.1) says only "a random Gaussian initialization for A".
       "pissa" — A and B from the top-r singular triplets of W₀ and W₀ replaced by the residual
       (Meng et al. 2024), so again the model starts equal to the base (``lora.layer``).
    use_rslora: scale by alpha / √r instead of alpha / r (rank-stabilised LoRA).
    use_dora: DoRA, W′ = m ⊙ (W₀ + s·B·A) / ‖W₀ + s·B·A‖ row by row, with a learned magnitude m
       (``<layer>.lora_magnitude.<adapter>``, shape (d,)) that starts at the row norms of W₀.
    dora_detach_norm: treat ‖W₀ + s·B·A‖ as a constant in the backward (DoRA paper, Sec. 4.3, and
       PEFT); the default, False, is the exact gradient.
    """

    r: int
    alpha: float
    target_modules: tuple
    dropout: float = 0.0
    bias: str = "none"
    init: str = "kaiming"
    use_rslora: bool = False
    use_dora: bool = False
    dora_detach_norm: bool = False

    def __post_init__(self):
        r = self.r
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
            raise ValueError(f"LoRAConfig: r must be an integer >= 1 (the rank of ΔW = B A), got {r!r}")
        object.__setattr__(self, "r", int(r))
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(
                f"LoRAConfig: alpha must be a finite number > 0 (ΔW x is scaled by alpha / r), got {alpha!r}"
            )
        object.__setattr__(self, "alpha", float(alpha))
        targets = self.target_modules
        if isinstance(targets, str):
            targets = (targets,)
        try:
            targets = tuple(targets)
        except TypeError:
            raise ValueError(
                f"LoRAConfig: target_modules must be a name or a sequence of names such as ('q', 'v'), got {targets!r}"
            ) from None
        if not targets or not all(isinstance(t, str) and t and not t.startswith(".") and not t.endswith(".")
                                  for t in targets):
            raise ValueError(
                f"LoRAConfig: target_modules must be a non-empty sequence of layer names such as ('q', 'v'), "
                f"got {self.target_modules!r}"
            )
        object.__setattr__(self, "target_modules", tuple(dict.fromkeys(targets)))  # drop repeats, keep order
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRAConfig: dropout must be in [0, 1), got {dropout!r}")
        object.__setattr__(self, "dropout", float(dropout))
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoRAConfig: bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init not in INIT_MODES:
            raise ValueError(
                f"LoRAConfig: init must be one of {INIT_MODES} ('kaiming' as loralib, 'gaussian' as the paper, 'pissa' from the SVD of W0), "
                f"got {self.init!r}"
            )
        for flag in ("use_rslora", "use_dora", "dora_detach_norm"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"LoRAConfig: {flag} must be True or False, got {getattr(self, flag)!r}")  # noqa: TRY004
        check_scaling(self.alpha, self.r, self.use_rslora)
        if self.dora_detach_norm and not self.use_dora:
            raise ValueError("LoRAConfig: dora_detach_norm=True only means something for DoRA; pass use_dora=True too")

    @property
    def scaling(self) -> float:
        """s in h = W0 x + s·B A x: alpha / r (paper, Sec. 4.1), or alpha / √r with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        """JSON-ready: stored in adapter files' metadata."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LoRAConfig:
        """The inverse of ``to_dict``; keys this version does not know are ignored (newer files)."""
        if not isinstance(d, dict):
            raise ValueError(f"LoRAConfig.from_dict needs a dict, got {type(d).__name__}")  # noqa: TRY004
        missing = [name for name in ("r", "alpha", "target_modules") if name not in d]
        if missing:
            raise ValueError(f"LoRAConfig.from_dict: missing {missing} in {d!r}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
