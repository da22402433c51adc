"""A user model one of whose units only works inside the whole model's no-grad check, for the balance tests.

Plain user code: the middle unit reads its input through numpy, which fails on a tensor that requires grad,
as every stage's input does when the unit runs alone (profiled, or first in its stage).
"""

from __future__ import annotations

import torch
from torch import nn


class ThroughNumpy(nn.Module):
    """Identity computed through numpy (so no gradient flows, and a tensor requiring grad is refused)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.numpy().copy())


def numpy_middle(in_features: int = 8, num_classes: int = 5) -> nn.Module:
    """Linear, the numpy unit, linear."""
    return nn.Sequential(nn.Linear(in_features, 16), ThroughNumpy(), nn.Linear(16, num_classes))
