"""A plain multi-layer perceptron classifier split into evenly sized units."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MLP", "mlp"]


class MLP(nn.Module):
    """Stack of ``Linear -> ReLU`` blocks followed by a linear classification head.

    Children: ``layers`` (an ``nn.ModuleList`` of ``1 + depth`` blocks; the first maps
    ``in_features -> hidden``, the others ``hidden -> hidden``) and ``head``
    (``Linear(hidden, num_classes)``). Its units are therefore ``layers.0 .. layers.{depth}, head``.
    """

    def __init__(self, in_features: int, hidden: int, depth: int, num_classes: int) -> None:
        super().__init__()
        if min(in_features, hidden, num_classes) < 1 or depth < 0:
            raise ValueError(
                f"invalid MLP sizes: in_features={in_features}, hidden={hidden}, depth={depth}, "
                f"num_classes={num_classes}"
            )
        widths = [in_features] + [hidden] * (depth + 1)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(w_in, w_out), nn.ReLU())
            for w_in, w_out in zip(widths[:-1], widths[1:], strict=True)
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a ``(B, in_features)`` float tensor to ``(B, num_classes)`` logits."""
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def mlp(in_features: int = 32, hidden: int = 256, depth: int = 4, num_classes: int = 10) -> nn.Module:
    """Build an :class:`MLP` with ``depth`` hidden ``hidden -> hidden`` blocks.

    With the defaults the model has 6 units: ``layers.0`` .. ``layers.4`` and ``head``.
    """
    return MLP(in_features, hidden, depth, num_classes)
