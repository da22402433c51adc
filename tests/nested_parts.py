"""User models whose units pass tuples or dicts between them, and one with a parameter-free unit.

Plain user code for the boundary tests: pipetrain knows nothing about it. Each model's forward is exactly
the chain of its units (``split``, ``blocks.0 ..``, ``head``), so any cut between units is a valid split.

``style="tuple"``: units pass ``(hidden, mask, depth)``: a float tensor, a bool mask computed from the
input, and an int counting the blocks run so far. ``style="dict"``: units pass
``{"hidden", "mask", "depth", "inputs", "note"}``, where ``inputs`` (the raw input, carried unchanged
through every block) feeds the head's skip connection and ``note`` is ``None``. ``style="relu"``: plain
tensors through ``inner``, ``act`` (an ``nn.ReLU`` alone, no parameters) and ``head``. The first unit of
the tuple and dict styles (``split``) has no parameters either.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["Split", "Block", "Head", "NestedModel", "make_model"]

_STYLES = ("tuple", "dict", "relu")


class Split(nn.Module):
    """``x -> (x, mask, 0)`` or the dict equivalent; no parameters."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style

    def forward(self, x: torch.Tensor) -> Any:
        mask = x.sum(dim=1, keepdim=True) > 0
        if self.style == "dict":
            return {"hidden": x, "mask": mask, "depth": 0, "inputs": x, "note": None}
        return x, mask, 0


class Block(nn.Module):
    """``tanh(linear(hidden))`` where the mask is set, half of it elsewhere; counts the depth."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, state: Any) -> Any:
        if isinstance(state, dict):
            y = torch.tanh(self.linear(state["hidden"]))
            hidden = torch.where(state["mask"], y, 0.5 * y)
            return {**state, "hidden": hidden, "depth": state["depth"] + 1}
        hidden, mask, depth = state
        y = torch.tanh(self.linear(hidden))
        return torch.where(mask, y, 0.5 * y), mask, depth + 1


class Head(nn.Module):
    """Logits ``linear(hidden) / depth`` (plus ``skip(inputs)`` in the dict style)."""

    def __init__(self, hidden: int, in_features: int, num_classes: int, style: str) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, num_classes)
        self.skip = nn.Linear(in_features, num_classes) if style == "dict" else None

    def forward(self, state: Any) -> torch.Tensor:
        if isinstance(state, dict):
            assert state["note"] is None
            return self.linear(state["hidden"]) / state["depth"] + self.skip(state["inputs"])
        hidden, _, depth = state
        return self.linear(hidden) / depth


class NestedModel(nn.Module):
    """The units of one style, applied in order."""

    def __init__(self, in_features: int, hidden: int, depth: int, num_classes: int, style: str) -> None:
        super().__init__()
        if style not in _STYLES:
            raise ValueError(f"model.style: {style!r} is not one of {list(_STYLES)}")
        if style == "relu":
            self.inner = nn.Linear(in_features, hidden)
            self.act = nn.ReLU()
            self.head = nn.Linear(hidden, num_classes)
            return
        widths = [in_features] + [hidden] * depth
        self.split = Split(style)
        self.blocks = nn.ModuleList(Block(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.head = Head(widths[-1], in_features, num_classes, style)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply every unit in order (``blocks`` element by element)."""
        for child in self.children():
            for unit in child if isinstance(child, nn.ModuleList) else [child]:
                x = unit(x)
        return x


def make_model(
    in_features: int = 8, hidden: int = 16, depth: int = 3, num_classes: int = 5, style: str = "tuple"
) -> nn.Module:
    """A :class:`NestedModel`: ``depth + 2`` units in the tuple and dict styles, 3 in the relu style."""
    return NestedModel(in_features, hidden, depth, num_classes, style)
