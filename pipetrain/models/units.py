"""Splitting a model into its ordered *units*.

A unit is one ``(fqn, module)`` pair. The units of a model are its top-level children in registration
order, where a top-level child that is an :class:`torch.nn.ModuleList` is replaced by its own children
(named ``"<list>.<index>"``). Every built-in model guarantees that applying its units in order to an
input gives the same result as calling the model, which is what lets the partitioner cut a model into
pipeline stages at unit boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = ["model_units", "run_units"]


def model_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return the ordered units of ``model``.

    Top-level children are taken in registration order; a child that is an ``nn.ModuleList`` is
    expanded into its elements, named ``"<child>.<index>"`` (for example ``blocks.0``). The names are
    fully qualified names relative to ``model``, so ``model.get_submodule(name)`` returns the unit.

    Raises:
        ValueError: if ``model`` has no child modules.
    """
    units: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            for sub_name, sub in child.named_children():
                units.append((f"{name}.{sub_name}", sub))
        else:
            units.append((name, child))
    if not units:
        raise ValueError(f"{type(model).__name__} has no child modules to split into units")
    return units


def run_units(units: Sequence[tuple[str, nn.Module]], x: Any) -> Any:
    """Apply ``units`` (as returned by :func:`model_units`) to ``x`` in order and return the result."""
    for _, module in units:
        x = module(x)
    return x
