"""A user model and optimizer that take their time and say what they are doing, for failure tests.

Each unit sleeps ``delay_s`` in forward and in backward, and the optimizer in ``step``; every process
writes its current phase and pid to ``$PIPETRAIN_TEST_MARKERS/rank<RANK>``, so a test can kill a real
stage process in the middle of a forward, a backward or an optimizer step. Plain user code: pipetrain
knows nothing about it.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn


def slow_model_overrides(delay_s: float) -> list[str]:
    """The Hydra overrides that train :func:`slow_mlp` with units that sleep ``delay_s`` per pass.

    ``in_features`` and ``num_classes`` are given (``++``: the default model has them too), so the
    default synthetic data, which takes them from the model, fits.
    """
    return [
        "model._target_=slow_parts.slow_mlp",
        f"+model.delay_s={delay_s}",
        "++model.in_features=32",
        "++model.num_classes=10",
    ]


def _mark(phase: str) -> None:
    directory = os.environ.get("PIPETRAIN_TEST_MARKERS")
    if not directory:
        return
    path = os.path.join(directory, f"rank{os.environ.get('RANK', '0')}")
    with open(path + ".tmp", "w") as handle:
        handle.write(f"{phase} {os.getpid()}")
    os.replace(path + ".tmp", path)


class _SlowIdentity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, delay_s: float) -> torch.Tensor:
        ctx.delay_s = delay_s
        if x.device.type != "meta":  # pre-flight shape checks run on the meta device: not training
            _mark("forward")
            time.sleep(delay_s)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _mark("backward")
        time.sleep(ctx.delay_s)
        return grad, None


class SlowUnit(nn.Module):
    """``Linear -> ReLU`` that sleeps ``delay_s`` in forward and in backward."""

    def __init__(self, in_features: int, out_features: int, delay_s: float, relu: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.relu = relu
        self.delay_s = delay_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        if self.relu:
            x = torch.relu(x)
        return _SlowIdentity.apply(x, self.delay_s)


class SlowMLP(nn.Module):
    """Units ``layers.0 .. layers.{depth}``, ``head``, like pipetrain's MLP."""

    def __init__(self, in_features: int, hidden: int, depth: int, num_classes: int, delay_s: float) -> None:
        super().__init__()
        widths = [in_features] + [hidden] * (depth + 1)
        self.layers = nn.ModuleList(
            SlowUnit(a, b, delay_s) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.head = SlowUnit(hidden, num_classes, delay_s, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def slow_mlp(
    in_features: int = 32, hidden: int = 64, depth: int = 4, num_classes: int = 10, delay_s: float = 0.1
) -> nn.Module:
    """A :class:`SlowMLP`."""
    return SlowMLP(in_features, hidden, depth, num_classes, delay_s)


class SlowSGD(torch.optim.SGD):
    """SGD whose step sleeps ``delay_s`` (and says so)."""

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.0, delay_s: float = 1.0) -> None:
        super().__init__(params, lr=lr, momentum=momentum)
        self.delay_s = delay_s

    def step(self, closure=None):
        _mark("step")
        time.sleep(self.delay_s)
        result = super().step(closure)
        _mark("stepped")
        return result
