"""What a training run records: its steps, losses, learning rates, evaluations, time and tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["History"]


@dataclass
class History:
    steps: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    evals: list = field(default_factory=list)  # [(step, {name: value}), ...]
    seconds: float = 0.0
    tokens: int = 0
    best: dict | None = None  # {"step": s, "value": v, "key": name}

    def to_dict(self) -> dict:
        return {
            "steps": self.steps, "losses": self.losses, "lrs": self.lrs, "evals": self.evals,
            "seconds": self.seconds, "tokens": self.tokens, "best": self.best,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        h = cls(**{k: d[k] for k in ("steps", "losses", "lrs", "seconds", "tokens", "best")})
        h.evals = [(s, dict(m)) for s, m in d["evals"]]
        return h
