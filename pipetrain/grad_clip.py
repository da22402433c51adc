"""Global gradient-norm clipping over every stage of the pipeline, as the unsplit model would clip.

Each stage reports the 2-norm of each of its parameter gradients; the driver combines them into the
norm of all gradients of the model and the factor that brings it to ``train.clip_grad_norm`` at most,
with the same float32 arithmetic as :func:`torch.nn.utils.clip_grad_norm_`, so a pipelined run clips
exactly like the unsplit one. A norm that is not finite skips the optimizer step on every stage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["GlobalNorm", "clip_by_global_norm"]


@dataclass(frozen=True)
class GlobalNorm:
    """The gradient norm of the whole model in one step, and what clipping makes of it."""

    total_norm: float
    """2-norm of all parameter gradients of the model (before clipping)."""
    grad_scale: float
    """Factor applied to every gradient: ``min(max_norm / (total_norm + 1e-6), 1)``."""

    @property
    def finite(self) -> bool:
        """Whether the norm is finite (otherwise the step is skipped on every stage)."""
        return math.isfinite(self.total_norm)


def clip_by_global_norm(norms: Sequence[float], max_norm: float) -> GlobalNorm:
    """The global norm of gradients whose per-tensor 2-norms are ``norms`` (the model's parameter order),
    and the factor that clips it to ``max_norm``."""
    if not norms:
        return GlobalNorm(total_norm=0.0, grad_scale=1.0)
    total = torch.linalg.vector_norm(torch.tensor(norms, dtype=torch.float32), 2)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return GlobalNorm(total_norm=float(total), grad_scale=float(scale))
