"""Losses the last stage can compute, by the name given in ``train.loss``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["LossFn", "LOSSES", "get_loss"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


_IGNORE_INDEX = -100
"""The label ``F.cross_entropy`` skips (its default ``ignore_index``), e.g. for padding."""


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Sequence models give (B, T, C) logits and (B, T) targets: every position is one prediction.
    if not target.is_floating_point() and target.device.type != "meta" and target.numel():
        _check_labels(target, logits.shape[-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _check_labels(target: torch.Tensor, num_classes: int) -> None:
    """Refuse class labels outside ``[0, num_classes)`` (``-100`` is skipped) with a ``ValueError``.

    Costs one min / max of the targets; labels out of range would otherwise fail inside torch with an
    ``IndexError`` that names neither the config nor the fix.
    """
    low, high = torch.stack(torch.aminmax(target)).tolist()  # one device sync
    negative = (target < 0) & (target != _IGNORE_INDEX) if low < 0 else None
    if high >= num_classes:
        bad = high
        fix = (
            "match the data's classes and the model's num_classes, e.g. "
            f"model.num_classes={high + 1} (or more) for this data"
        )
    elif negative is not None and bool(negative.any()):
        bad = int(target[negative][0])
        fix = "labels are class indices >= 0 (-100 marks a position to skip): fix the data's labels"
    else:
        return
    raise ValueError(
        f"train.loss=cross_entropy: label {bad} is out of range for the model's output of {num_classes} "
        f"classes (labels 0..{num_classes - 1}); {fix}"
    )


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
