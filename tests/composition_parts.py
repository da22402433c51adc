"""User models whose ``forward`` is not the chain of their units, for the composition tests.

Each takes ``in_features`` and ``num_classes`` like pipetrain's MLP, so it trains on the synthetic
classification data; plain user code that pipetrain knows nothing about.
"""

from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    """A skip connection written in forward: ``x = x + block(x)``."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        x = x + self.block(x)
        return self.head(x)


class OutOfOrder(nn.Module):
    """Children registered as ``head, inp`` but called as ``inp, head``."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(16, num_classes)
        self.inp = nn.Linear(in_features, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inp(x))


class NeverCalled(nn.Module):
    """A child ``unused`` that forward never calls."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, 16)
        self.unused = nn.Linear(16, 16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inp(x))


class CalledTwice(nn.Module):
    """One child ``act`` called twice in forward."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, 16)
        self.act = nn.Tanh()
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.mid(self.act(self.inp(x)))))


class SharedModule(nn.Module):
    """One module registered under two names, ``first`` and ``second``."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, 16)
        shared = nn.Linear(16, 16)
        self.first = shared
        self.second = shared
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.second(self.first(self.inp(x))))


class Scaled(nn.Module):
    """An extra op in forward: the hidden features are scaled by 3."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, 16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(3.0 * self.inp(x))


class FlattenInForward(nn.Module):
    """``x.flatten(1)`` in forward where the units need an ``nn.Flatten()`` child."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, 16)
        self.head = nn.Linear(16 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inp(x.unsqueeze(1).expand(-1, 2, -1)).flatten(1))


class TupleOut(nn.Module):
    """Returns ``(logits, features)`` from forward but only the logits through its units."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, 16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.inp(x)
        return self.head(features), features


class Composes(nn.Module):
    """Forward is its units in registration order, the flatten and the skip connection inside units."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, 16)
        self.blocks = nn.ModuleList(_ResidualBlock(16) for _ in range(2))
        self.flatten = nn.Flatten()
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.flatten(x))


class _ResidualBlock(nn.Module):
    """``x + relu(linear(x))``: the skip connection lives in the unit."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.linear(x))


def make_residual_model(in_features: int = 32, num_classes: int = 10, **_other: object) -> nn.Module:
    """A :class:`Residual` model (a skip connection in forward), as a ``model._target_``.

    Takes (and ignores) any other argument of the built-in ``model`` group, such as ``hidden``.
    """
    return Residual(in_features, num_classes)
