"""What the benchmark measures: the model configurations, the modes, the LoRA settings, FLOPs per mode."""

from __future__ import annotations

from dataclasses import dataclass

from minilora.flops import forward_flops, step_flops
from minilora.models import GPTConfig

__all__ = ["CONFIGS", "MODES", "TRAIN_MODES", "BenchConfig", "BenchError", "mode_flops"]


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


def mode_flops(cfg: BenchConfig, mode: str) -> int:
    m, b = cfg.model, cfg.batch
    if mode == "full":
        return step_flops(m, b)
    if mode == "lora":
        return step_flops(m, b, LORA_TARGETS, LORA_R)
    if mode in ("infer", "merged"):
        return forward_flops(m, b)
    return forward_flops(m, b, LORA_TARGETS, LORA_R)  # unmerged, mixed16, mixed16-loop
