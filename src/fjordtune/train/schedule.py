"""The learning-rate schedule: a linear warm-up, then cosine or linear decay to `min_lr` at the last step.

A pure function of the step, so a resumed run is on the same schedule by construction; its parameters
are also written into every checkpoint, and a resume whose job changed them says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_WARMUP_FRACTION = 0.03


@dataclass(frozen=True)
class Schedule:
    name: str  # cosine | linear | constant
    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    @classmethod
    def for_job(cls, train: Any, total_steps: int) -> Schedule:
        """`train` is the job's TrainSection; `total_steps` the optimizer steps of the whole run."""
        warmup = train.warmup_steps
        if warmup is None:
            warmup = max(1, round(DEFAULT_WARMUP_FRACTION * total_steps))
        return cls(train.lr_schedule, train.lr, train.min_lr, min(warmup, total_steps), total_steps)

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based: the first step is 0)."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if self.name == "constant":
            return self.peak_lr
        span = self.total_steps - self.warmup_steps
        # the last step (total - 1) reaches min_lr exactly
        progress = min(1.0, (step - self.warmup_steps + 1) / span) if span > 0 else 1.0
        if self.name == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            factor = 1.0 - progress
        return self.min_lr + (self.peak_lr - self.min_lr) * factor

    def describe(self) -> str:
        head = f"warm-up {self.warmup_steps} step(s) to {self.peak_lr:.3g}"
        if self.name == "constant":
            return f"{head}, then constant, {self.total_steps} steps"
        return f"{head}, then {self.name} decay to {self.min_lr:.3g} at step {self.total_steps}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schedule:
        return cls(**{k: d[k] for k in ("name", "peak_lr", "min_lr", "warmup_steps", "total_steps")})

    def differences(self, other: Schedule) -> list[str]:
        return [f"{k} {getattr(other, k)} -> {getattr(self, k)}" for k in self.as_dict()
                if getattr(self, k) != getattr(other, k)]
