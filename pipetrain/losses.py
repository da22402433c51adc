"""Losses the last stage can compute, by the name given in ``train.loss``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["LossFn", "LOSSES", "get_loss"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Sequence models give (B, T, C) logits and (B, T) targets: every position is one prediction.
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target)


LOSSES: dict[str, LossFn] = {"cross_entropy": _cross_entropy, "mse": _mse}
"""Loss name -> function of ``(output, target)`` giving the mean loss over the samples."""


def get_loss(name: str) -> LossFn:
    """The loss called ``name``; ``ValueError`` naming ``train.loss`` otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"train.loss: unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None
