"""Discrete-event simulation of a schedule: start/end times, bubble and memory estimates."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipetrain.schedule.actions import Action, ActionKind, Schedule
from pipetrain.schedule.order import dependencies, execution_order
from pipetrain.schedule.validate import validate_schedule

__all__ = ["StageCosts", "TimedAction", "Timeline", "render_timeline", "simulate"]

_EPS = 1e-9


@dataclass(frozen=True)
class StageCosts:
    """Duration of one forward and one backward pass of a micro-batch, per stage."""

    forward: tuple[float, ...]
    backward: tuple[float, ...]

    def __post_init__(self) -> None:
        forward, backward = tuple(map(float, self.forward)), tuple(map(float, self.backward))
        if len(forward) != len(backward):
            raise ValueError(
                f"StageCosts: {len(forward)} forward costs but {len(backward)} backward costs; "
                "give one of each per stage"
            )
        for name, values in (("forward", forward), ("backward", backward)):
            for s, value in enumerate(values):
                if not (value >= 0 and math.isfinite(value)):
                    raise ValueError(
                        f"StageCosts: {name} cost of stage {s} must be finite and >= 0, got {value}"
                    )
        object.__setattr__(self, "forward", forward)
        object.__setattr__(self, "backward", backward)

    @classmethod
    def unit(cls, num_stages: int) -> StageCosts:
        """Costs of 1.0 for every forward and backward pass on ``num_stages`` stages."""
        return cls((1.0,) * num_stages, (1.0,) * num_stages)

    @property
    def num_stages(self) -> int:
        """Number of stages these costs describe."""
        return len(self.forward)

    def cost(self, action: Action) -> float:
        """Duration of ``action`` on its stage."""
        costs = self.forward if action.kind is ActionKind.FORWARD else self.backward
        return costs[action.stage_idx]


@dataclass(frozen=True)
class TimedAction:
    """An action with its simulated start and end times."""

    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class Timeline:
    """Simulated execution of a schedule: per stage, its timed actions in execution order."""

    num_stages: int
    num_microbatches: int
    entries: dict[int, list[TimedAction]]

    @property
    def makespan(self) -> float:
        """Time at which the last action finishes."""
        return max((t.end for row in self.entries.values() for t in row), default=0.0)

    def busy(self, stage_idx: int) -> float:
        """Total time stage ``stage_idx`` spends running actions."""
        return sum(t.end - t.start for t in self.entries[stage_idx])

    def idle(self, stage_idx: int) -> float:
        """Time stage ``stage_idx`` spends waiting within the makespan."""
        return self.makespan - self.busy(stage_idx)

    @property
    def bubble_fraction(self) -> float:
        """Fraction of all stage-time spent idle (0.0 for an empty timeline)."""
        makespan = self.makespan
        if makespan == 0:
            return 0.0
        return sum(self.idle(s) for s in range(self.num_stages)) / (self.num_stages * makespan)

    @property
    def peak_in_flight(self) -> dict[int, int]:
        """Per stage, the most micro-batches forwarded but not yet backwarded at any point."""
        peaks = {}
        for s, row in self.entries.items():
            live = peak = 0
            for t in row:
                live += 1 if t.action.kind is ActionKind.FORWARD else -1
                peak = max(peak, live)
            peaks[s] = peak
        return peaks


def simulate(schedule: Schedule, costs: StageCosts | None = None) -> Timeline:
    """Simulate ``schedule`` (validated first) under ``costs`` (unit costs when ``None``).

    Each action starts once the previous action on its stage and all its dependencies have
    finished, and lasts its stage's forward or backward cost.
    """
    num_stages = len(schedule)
    num_microbatches = 1 + max((a.mb_idx for row in schedule.values() for a in row), default=-1)
    validate_schedule(schedule, num_stages, num_microbatches)
    costs = StageCosts.unit(num_stages) if costs is None else costs
    if costs.num_stages != num_stages:
        raise ValueError(f"StageCosts describe {costs.num_stages} stages but the schedule has {num_stages}")

    order, _ = execution_order(schedule, num_stages)
    end: dict[Action, float] = {}
    entries: dict[int, list[TimedAction]] = {s: [] for s in range(num_stages)}
    for a in order:
        row = entries[a.stage_idx]
        start = max([row[-1].end if row else 0.0] + [end[d] for d in dependencies(a, num_stages)])
        end[a] = start + costs.cost(a)
        row.append(TimedAction(a, start, end[a]))
    return Timeline(num_stages, num_microbatches, entries)


def _is_unit_grid(timeline: Timeline) -> bool:
    timed = [t for row in timeline.entries.values() for t in row]
    return all(abs(t.start - round(t.start)) < _EPS and abs(t.end - t.start - 1.0) < _EPS for t in timed)


def render_timeline(timeline: Timeline) -> str:
    """Render ``timeline`` as text, one line per stage.

    Under unit costs this is a grid with one column per time unit (``.`` marks idle slots)::

        stage 0: 0F0 0F1 .   0B0 0F2 0B1 0F3 0B2 .   0B3
        stage 1: .   1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3 .

    Otherwise each stage lists its actions as ``action@start-end``.
    """
    label_width = len(str(timeline.num_stages - 1))
    lines = []
    if _is_unit_grid(timeline):
        width = max((len(str(t.action)) for row in timeline.entries.values() for t in row), default=1)
        num_slots = round(timeline.makespan)
        for s in range(timeline.num_stages):
            cells = ["."] * num_slots
            for t in timeline.entries[s]:
                cells[round(t.start)] = str(t.action)
            lines.append(f"stage {s:>{label_width}}: " + " ".join(c.ljust(width) for c in cells))
    else:
        for s in range(timeline.num_stages):
            items = [f"{t.action}@{t.start:.3g}-{t.end:.3g}" for t in timeline.entries[s]]
            lines.append(f"stage {s:>{label_width}}: " + " ".join(items))
    return "\n".join(line.rstrip() for line in lines)
