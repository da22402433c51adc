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
        ValueError: if ``model`` has no child modules, or if one module is registered as two units.
    """
    units: list[tuple[str, nn.Module]] = []
    for name, child in _children(model):
        if isinstance(child, nn.ModuleList):
            units.extend((f"{name}.{sub_name}", sub) for sub_name, sub in _children(child))
        else:
            units.append((name, child))
    if not units:
        raise ValueError(f"{type(model).__name__} has no child modules to split into units")
    _check_distinct(units)
    return units


def _children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The direct children of ``module`` in registration order, a module registered twice listed twice.

    ``named_children`` lists such a module once, under its first name, which would silently drop a unit.
    """
    return [(name, child) for name, child in module._modules.items() if child is not None]


def _check_distinct(units: Sequence[tuple[str, nn.Module]]) -> None:
    """Refuse one module object registered as two units (tied weights inside one unit are fine)."""
    first_name: dict[int, str] = {}
    for name, module in units:
        seen = first_name.setdefault(id(module), name)
        if seen != name:
            raise ValueError(
                f"model: units {seen!r} and {name!r} are the same module (one module registered under two "
                "names); units must be distinct modules, each a step of the pipeline: give each use its own "
                "module, or wrap the repeated use in one unit module (tied weights inside one unit are fine)"
            )


def run_units(units: Sequence[tuple[str, nn.Module]], x: Any) -> Any:
    """Apply ``units`` (as returned by :func:`model_units`) to ``x`` in order and return the result."""
    for _, module in units:
        x = module(x)
    return x
