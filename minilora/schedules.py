"""Learning-rate schedules: multipliers of the base lr per step, and the scheduler that applies them.

    sched = optim.LRScheduler(opt, functools.partial(optim.warmup_cosine, total=1000, warmup=50))

Importable from ``minilora.optim`` as well (``optim.warmup_linear`` and friends).
"""

from __future__ import annotations

import math

__all__ = ["LRScheduler", "warmup_cosine", "warmup_linear"]


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
    """Sets every group's ``lr = base_lr · fn(step)``, like ``torch.optim.lr_scheduler.LambdaLR``.

    ``base_lrs`` are the groups' lrs at construction (``base_lr``: the first group's). The
    constructor already applies ``fn(0)``. Call ``step()`` after each ``optimizer.step()``.
    With LoRA+ groups the ratio lr_B / lr_A stays what ``lora_plus_param_groups`` made it.

        sched = LRScheduler(opt, functools.partial(warmup_cosine, total=1000, warmup=50))

    To resume, restore the optimizer's state first and then ``sched.load_state_dict(...)``,
    which re-applies the lr of the saved step.
    """

    def __init__(self, optimizer, fn):
        self.optimizer = optimizer
        self.fn = fn
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    @property
    def base_lr(self) -> float:
        return self.base_lrs[0]

    def _apply(self) -> None:
        factor = float(self.fn(self.last_step))
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    @property
    def lr(self) -> float:
        return self.optimizer.lr

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "base_lrs": list(self.base_lrs), "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        base_lrs = [float(v) for v in state.get("base_lrs", [state["base_lr"]])]
        if len(base_lrs) != len(self.optimizer.param_groups):
            raise ValueError(f"LRScheduler.load_state_dict: the state has {len(base_lrs)} base lrs, the optimizer "
                             f"{len(self.optimizer.param_groups)} parameter groups")
        self.base_lrs = base_lrs
        self.last_step = int(state["last_step"])
        self._apply()
