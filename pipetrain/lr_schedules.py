"""Learning-rate schedules that ``torch.optim.lr_scheduler`` does not offer as one class.

Each is a factory ``(optimizer, **settings) -> LRScheduler``, usable as an ``lr_scheduler`` target spec
(``_partial_: true``), e.g. ``lr_scheduler=warmup_cosine``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["WarmupCosine", "warmup_cosine"]


@dataclass(frozen=True)
class WarmupCosine:
    """The factor on the base learning rate at step ``t``: linear warm-up, then cosine decay."""

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm up linearly over ``warmup_steps`` (from ``lr / warmup_steps`` to ``lr``), then decay along a
    cosine to ``min_lr_ratio * lr`` at ``total_steps``."""
    if warmup_steps < 0 or total_steps < 1 or warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps}, total_steps={total_steps}: need 0 <= warmup_steps <= total_steps"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio={min_lr_ratio}: must be between 0 and 1")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_lr_ratio))
