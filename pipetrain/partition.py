"""Cut a model into stages: stage specs -> checked per-stage ``nn.Module``s.

A model's *units* (:func:`pipetrain.models.model_units`) are the pieces a stage can own. The user names
them per stage (``pipeline.stages``) or gives a count per stage (``pipeline.balance``); :func:`plan_stages`
checks the spec against the unit list and :func:`partition` builds one :class:`StageModule` per stage,
refusing parameters shared across stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pipetrain.models import model_units

__all__ = ["StagePlan", "StageModule", "plan_stages", "partition"]


@dataclass(frozen=True)
class StagePlan:
    """The unit names each stage owns, in forward order."""

    stages: tuple[tuple[str, ...], ...]

    @property
    def num_stages(self) -> int:
        """Number of stages."""
        return len(self.stages)


class StageModule(nn.Module):
    """The units of one stage, applied in order.

    Parameters live under ``units.<i>.<name>``; :meth:`to_full_name` and :meth:`full_state_dict` give
    their names in the unsplit model, so checkpoints are keyed like the whole model.
    """

    def __init__(self, unit_names: Sequence[str], units: Sequence[nn.Module]) -> None:
        super().__init__()
        self.unit_names = tuple(unit_names)
        self.units = nn.ModuleList(units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the stage's units in order."""
        for unit in self.units:
            x = unit(x)
        return x

    def to_full_name(self, local_name: str) -> str:
        """Map ``units.<i>.<rest>`` to ``<unit name>.<rest>``."""
        prefix, idx, rest = local_name.split(".", 2)
        assert prefix == "units", local_name
        return f"{self.unit_names[int(idx)]}.{rest}"

    def from_full_name(self, full_name: str) -> str | None:
        """Map a full-model name to this stage's local name (``None`` when another stage owns it)."""
        for idx, unit_name in enumerate(self.unit_names):
            if full_name.startswith(unit_name + "."):
                return f"units.{idx}.{full_name[len(unit_name) + 1 :]}"
        return None

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers keyed by their full-model names."""
        return {self.to_full_name(name): value for name, value in self.state_dict().items()}

    def load_full_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load the entries of a full-model state dict that belong to this stage."""
        local = {}
        for full_name, value in state.items():
            local_name = self.from_full_name(full_name)
            if local_name is not None:
                local[local_name] = value
        self.load_state_dict(local, strict=strict)


def plan_stages(
    unit_names: Sequence[str],
    stages: Sequence[Sequence[str]] | None = None,
    balance: Sequence[int] | None = None,
) -> StagePlan:
    """Check a stage spec against the model's units and return the plan.

    Exactly one of ``stages`` (unit names per stage) and ``balance`` (unit count per stage) is given.
    Raises ``ValueError`` naming the config key and the fix.
    """
    if (stages is None) == (balance is None):
        raise ValueError(
            "pipeline: give exactly one of pipeline.stages (unit names per stage) and pipeline.balance "
            f"(unit count per stage); set the other to null. Units of this model: {list(unit_names)}"
        )
    if balance == "auto":
        raise ValueError(
            "pipeline.balance: auto is chosen by python -m pipetrain.train before launch (or run python -m "
            "pipetrain.balance and use the pipeline it writes); here give the unit counts, e.g. "
            f"{_even_balance(len(unit_names), 2)}"
        )
    if balance is not None:
        return _plan_from_balance(unit_names, balance)
    return _plan_from_names(unit_names, stages)


def _check_stage_count(key: str, num_stages: int, unit_names: Sequence[str], per_stage: str) -> None:
    if num_stages == 0:
        raise ValueError(f"{key}: empty; give {per_stage} per stage")
    if num_stages > len(unit_names):
        fits = f", e.g. {_even_balance(len(unit_names), num_stages)}" if key == "pipeline.balance" else ""
        raise ValueError(
            f"{key}: {num_stages} stages but the model has only {len(unit_names)} units "
            f"({list(unit_names)}); use at most {len(unit_names)} stages{fits}"
        )


def _even_balance(num_units: int, num_stages: int) -> str:
    """An override splitting ``num_units`` as evenly as possible into at most ``num_stages`` stages."""
    num_stages = max(1, min(num_stages, num_units))
    counts = [num_units // num_stages + (idx < num_units % num_stages) for idx in range(num_stages)]
    return f"pipeline.balance=[{','.join(map(str, counts))}]"


def _plan_from_balance(unit_names: Sequence[str], balance: Sequence[int]) -> StagePlan:
    _check_stage_count("pipeline.balance", len(balance), unit_names, "one unit count (e.g. [3, 3])")
    for idx, count in enumerate(balance):
        if count < 1:
            raise ValueError(f"pipeline.balance: stage {idx} has {count} units; every stage needs >= 1")
    if sum(balance) != len(unit_names):
        raise ValueError(
            f"pipeline.balance: {list(balance)} sums to {sum(balance)} but the model has "
            f"{len(unit_names)} units ({list(unit_names)}); make the counts sum to {len(unit_names)}, "
            f"e.g. {_even_balance(len(unit_names), len(balance))}"
        )
    stages, start = [], 0
    for count in balance:
        stages.append(tuple(unit_names[start : start + count]))
        start += count
    return StagePlan(tuple(stages))


def _plan_from_names(unit_names: Sequence[str], stages: Sequence[Sequence[str]]) -> StagePlan:
    _check_stage_count("pipeline.stages", len(stages), unit_names, "one list of unit names")
    position = {name: idx for idx, name in enumerate(unit_names)}
    owner: dict[str, int] = {}
    for stage_idx, names in enumerate(stages):
        if len(names) == 0:
            raise ValueError(f"pipeline.stages: stage {stage_idx} is empty; give every stage >= 1 unit")
        for name in names:
            if name not in position:
                raise ValueError(
                    f"pipeline.stages: stage {stage_idx} names unknown unit {name!r}; "
                    f"units of this model: {list(unit_names)}"
                )
            if name in owner:
                raise ValueError(
                    f"pipeline.stages: unit {name!r} is in stage {owner[name]} and stage {stage_idx}; "
                    "each unit belongs to exactly one stage"
                )
            owner[name] = stage_idx
    missing = [name for name in unit_names if name not in owner]
    if missing:
        raise ValueError(f"pipeline.stages: units {missing} are in no stage; add each to exactly one stage")
    flat = [name for names in stages for name in names]
    for before, after in zip(flat, flat[1:], strict=False):
        if position[after] < position[before]:
            raise ValueError(
                f"pipeline.stages: unit {after!r} comes after {before!r} but runs before it in the "
                f"model; list units in forward order: {list(unit_names)}"
            )
    return StagePlan(tuple(tuple(names) for names in stages))


def partition(model: nn.Module, plan: StagePlan) -> list[StageModule]:
    """Build one :class:`StageModule` per stage of ``plan`` from ``model``'s units.

    The stage modules share the model's unit objects (no copy). Raises ``ValueError`` when a parameter
    (tied weights) would be owned by two stages.
    """
    units = dict(model_units(model))
    modules = [StageModule(names, [units[name] for name in names]) for names in plan.stages]
    owner: dict[int, tuple[int, str]] = {}
    for stage_idx, module in enumerate(modules):
        for local_name, param in module.named_parameters(remove_duplicate=False):
            full_name = module.to_full_name(local_name)
            first = owner.setdefault(id(param), (stage_idx, full_name))
            if first[0] != stage_idx:
                raise ValueError(
                    f"pipeline: parameter {full_name!r} (stage {stage_idx}) is the same tensor as "
                    f"{first[1]!r} (stage {first[0]}); tied weights cannot span stages: put both units in "
                    "one stage or untie them in the model"
                )
    return modules
