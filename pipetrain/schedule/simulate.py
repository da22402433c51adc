"""Discrete-event simulation of a schedule: start/end times, bubble and memory estimates.

The resource is the worker: it runs one action at a time, in its list order, each as soon as the
previous one and the action's dependencies (:mod:`pipetrain.schedule.order`) are done. Costs are per
stage: a worker hosting two stages spends each stage's own cost on that stage's actions.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from pipetrain.schedule.actions import Action, ActionKind
from pipetrain.schedule.order import dependencies, execution_order
from pipetrain.schedule.schedule import Schedule
from pipetrain.schedule.validate import validate_schedule

__all__ = ["StageCosts", "TimedAction", "Timeline", "simulate", "splits_backward"]

_F, _B, _I, _W = ActionKind.FORWARD, ActionKind.BACKWARD, ActionKind.INPUT_GRAD, ActionKind.WEIGHT_GRAD


def _costs(name: str, values: tuple[float, ...] | None) -> tuple[float, ...] | None:
    if values is None:
        return None
    values = tuple(map(float, values))
    for s, value in enumerate(values):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"StageCosts: {name} cost of stage {s} must be finite and >= 0, got {value}")
    return values


@dataclass(frozen=True)
class StageCosts:
    """Duration of each pass of one micro-batch, per stage.

    ``input_grad`` / ``weight_grad`` are the two halves of a split backward (``I`` and ``W`` actions);
    when not given, each is half of the stage's ``backward``.
    """

    forward: tuple[float, ...]
    backward: tuple[float, ...]
    input_grad: tuple[float, ...] | None = None
    weight_grad: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("forward", "backward", "input_grad", "weight_grad"):
            object.__setattr__(self, name, _costs(name, getattr(self, name)))
        if len(self.forward) != len(self.backward):
            raise ValueError(
                f"StageCosts: {len(self.forward)} forward costs but {len(self.backward)} backward costs; "
                "give one of each per stage"
            )
        for name in ("input_grad", "weight_grad"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.forward):
                raise ValueError(
                    f"StageCosts: {len(values)} {name} costs but {len(self.forward)} stages; "
                    "give one per stage"
                )

    @classmethod
    def unit(cls, num_stages: int, split_backward: bool = False) -> StageCosts:
        """Costs of 1.0 for every forward and backward pass on ``num_stages`` stages.

        With ``split_backward``, the zero-bubble convention instead: ``F = I = W = 1`` and ``B = I + W = 2``.
        """
        if split_backward:
            ones = (1.0,) * num_stages
            return cls(ones, (2.0,) * num_stages, ones, ones)
        return cls((1.0,) * num_stages, (1.0,) * num_stages)

    @property
    def num_stages(self) -> int:
        """Number of stages these costs describe."""
        return len(self.forward)

    def cost(self, action: Action) -> float:
        """Duration of ``action`` on its stage."""
        s = action.stage_idx
        if action.kind is _F:
            return self.forward[s]
        if action.kind is _B:
            return self.backward[s]
        given = self.input_grad if action.kind is _I else self.weight_grad
        return given[s] if given is not None else self.backward[s] / 2


@dataclass(frozen=True)
class TimedAction:
    """An action with its simulated start and end times."""

    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class Timeline:
    """Simulated execution of a schedule: per worker, its timed actions in execution order."""

    schedule: Schedule
    entries: dict[int, list[TimedAction]]
    """``entries[worker_idx]``: that worker's timed actions."""

    @property
    def num_stages(self) -> int:
        """Number of stages of the schedule."""
        return self.schedule.num_stages

    @property
    def num_workers(self) -> int:
        """Number of workers of the schedule."""
        return self.schedule.num_workers

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per step."""
        return self.schedule.num_microbatches

    @property
    def makespan(self) -> float:
        """Time at which the last action finishes."""
        return max((t.end for row in self.entries.values() for t in row), default=0.0)

    def busy(self, worker_idx: int) -> float:
        """Total time worker ``worker_idx`` spends running actions."""
        return sum(t.end - t.start for t in self.entries[worker_idx])

    def idle(self, worker_idx: int) -> float:
        """Time worker ``worker_idx`` spends waiting within the makespan."""
        return self.makespan - self.busy(worker_idx)

    @property
    def bubble_fraction(self) -> float:
        """Fraction of all worker-time spent idle: ``idle / (idle + busy)`` summed over the workers within
        the makespan (0.0 for an empty timeline)."""
        makespan = self.makespan
        if makespan == 0:
            return 0.0
        return sum(self.idle(w) for w in self.entries) / (len(self.entries) * makespan)

    @property
    def peak_in_flight(self) -> dict[int, int]:
        """Per stage, the most micro-batches forwarded but not yet fully backwarded at any point.

        A micro-batch is in flight on a stage from its ``F`` until its ``B``, or its ``W`` when the
        backward is split (the weight gradient still needs the saved activations).
        """
        live = dict.fromkeys(range(self.num_stages), 0)
        peaks = dict(live)
        for row in self.entries.values():
            for t in row:
                s = t.action.stage_idx
                if t.action.kind is _F:
                    live[s] += 1
                    peaks[s] = max(peaks[s], live[s])
                elif t.action.kind in (_B, _W):
                    live[s] -= 1
        return peaks


def splits_backward(schedule: Schedule) -> bool:
    """Whether ``schedule`` runs any backward as separate ``I`` and ``W`` actions."""
    return any(a.kind is _I for row in schedule.actions for a in row)


_validate_once = functools.lru_cache(maxsize=16)(validate_schedule)
"""``validate_schedule``, once per schedule: the driver simulates the same schedule every logged step (a
schedule that fails raises every time; only passing ones are remembered)."""


def simulate(schedule: Schedule, costs: StageCosts | None = None, transfer: float = 0.0) -> Timeline:
    """Simulate ``schedule`` (validated first) under ``costs`` (unit costs when ``None``: every ``F`` and
    ``B`` lasts 1, or, for a schedule that splits backward, every ``F``, ``I`` and ``W`` lasts 1).

    Each action starts once the previous action on its worker and all its dependencies have finished,
    and lasts its stage's cost for its kind. An input made on another worker arrives ``transfer`` after
    the action that made it ends (outputs handed between two stages of one worker arrive at once).
    """
    _validate_once(schedule)
    if not (transfer >= 0 and math.isfinite(transfer)):
        raise ValueError(f"simulate: transfer must be finite and >= 0, got {transfer}")
    costs = StageCosts.unit(schedule.num_stages, splits_backward(schedule)) if costs is None else costs
    if costs.num_stages != schedule.num_stages:
        raise ValueError(
            f"StageCosts describe {costs.num_stages} stages but the schedule has {schedule.num_stages}"
        )
    order, _ = execution_order(schedule)
    end: dict[Action, float] = {}
    entries: dict[int, list[TimedAction]] = {w: [] for w in range(schedule.num_workers)}
    for a in order:
        worker = schedule.worker_of(a.stage_idx)
        row = entries[worker]
        arrivals = [
            end[d] + (transfer if schedule.worker_of(d.stage_idx) != worker else 0.0)
            for d in dependencies(a, schedule)
        ]
        start = max([row[-1].end if row else 0.0, *arrivals])
        end[a] = start + costs.cost(a)
        row.append(TimedAction(a, start, end[a]))
    return Timeline(schedule, entries)
