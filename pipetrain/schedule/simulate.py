"""Discrete-event simulation of a schedule: start/end times, bubble and memory estimates."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from pipetrain.schedule.actions import Action, ActionKind, Schedule
from pipetrain.schedule.order import dependencies, execution_order
from pipetrain.schedule.validate import validate_schedule

__all__ = ["StageCosts", "TimedAction", "Timeline", "render_timeline", "simulate"]

_EPS = 1e-9
_MAX_DENOMINATOR = 1000
_MAX_COLUMNS_PER_ACTION = 4


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


def _fraction(value: float) -> Fraction:
    """``value`` as a fraction with a small denominator (``0.1 + 0.2`` -> ``3/10``)."""
    return Fraction(value).limit_denominator(_MAX_DENOMINATOR)


def _exact_quantum(times: list[float]) -> float | None:
    """The longest time step that every one of ``times`` is a whole multiple of, or ``None``."""
    fractions = [_fraction(t) for t in times]
    if any(abs(float(f) - t) > _EPS for f, t in zip(fractions, times, strict=True)):
        return None
    positive = [f for f in fractions if f > 0]
    if not positive:
        return None
    denominator = math.lcm(*(f.denominator for f in positive))
    numerator = math.gcd(*(f.numerator * (denominator // f.denominator) for f in positive))
    return numerator / denominator


def _column_width(timeline: Timeline) -> tuple[float, bool]:
    """The time one grid column stands for, and whether every start and end falls on a column edge.

    One column is the longest time step all starts and ends are multiples of, as long as the shortest
    action spans at most ``_MAX_COLUMNS_PER_ACTION`` columns; otherwise one column is the shortest
    action's duration and times are rounded to the nearest column.
    """
    timed = [t for row in timeline.entries.values() for t in row]
    shortest = min(t.end - t.start for t in timed)
    quantum = _exact_quantum([x for t in timed for x in (t.start, t.end)])
    if quantum is not None and shortest / quantum <= _MAX_COLUMNS_PER_ACTION + _EPS:
        return quantum, True
    return shortest, False


def _column(time: float, quantum: float) -> int:
    """The grid column edge nearest to ``time`` (halves round up)."""
    return math.floor(time / quantum + 0.5)


def _grid_row(row: list[TimedAction], quantum: float, num_columns: int, width: int) -> str:
    """One stage's line of the grid: an action's label, followed by ``-`` over the further columns it
    spans; ``.`` marks an idle column."""
    cells = [".".ljust(width)] * num_columns
    for t in row:
        first, last = _column(t.start, quantum), _column(t.end, quantum)
        span = (last - first) * (width + 1) - 1
        label = str(t.action)
        cells[first] = label.ljust(span, "-") if last - first > 1 else label.ljust(width)
        for k in range(first + 1, last):
            cells[k] = ""
    return " ".join(c for c in cells if c)


def _scale_note(quantum: float, exact: bool) -> str:
    """The legend under a scaled grid: what one column stands for."""
    unit = "time unit" if quantum == 1 else "time units"
    note = f"(one column = {quantum:.3g} {unit}"
    return note + (")" if exact else "; starts and ends rounded to the nearest column)")


def _render_list(timeline: Timeline, label_width: int) -> list[str]:
    """Each stage's actions as ``action@start-end`` (for timelines with zero-duration actions)."""
    lines = []
    for s in range(timeline.num_stages):
        items = [f"{t.action}@{t.start:.3g}-{t.end:.3g}" for t in timeline.entries[s]]
        lines.append(f"stage {s:>{label_width}}: " + " ".join(items))
    return lines


def render_timeline(timeline: Timeline) -> str:
    """Render ``timeline`` as a grid, one line per stage, one column per time step.

    Under unit costs each action fills one column (``.`` marks idle columns)::

        stage 0: 0F0 0F1 .   0B0 0F2 0B1 0F3 0B2 .   0B3
        stage 1: .   1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3 .

    Under other costs an action spans as many columns as it lasts, its cell filled with ``-``, and a
    last line says what one column stands for (GPipe, 2 stages, 2 micro-batches, forward costs 1 and 2,
    backward costs 2 and 4)::

        stage 0: 0F0 0F1 .   .   .   .   .   .   .   0B0---- .   .   0B1----
        stage 1: .   1F0---- 1F1---- 1B0------------ 1B1------------ .   .
        (one column = 1 time unit)

    One column is the longest time step that all starts and ends are multiples of; when that would
    make the shortest action wider than 4 columns (e.g. costs 1 and 1.37), one column is the shortest
    action's duration and the grid is rounded to it, as the legend says. A timeline with an action of
    zero duration lists each stage's actions as ``action@start-end`` instead.
    """
    label_width = len(str(timeline.num_stages - 1))
    timed = [t for row in timeline.entries.values() for t in row]
    if any(t.end - t.start <= _EPS for t in timed):
        return "\n".join(line.rstrip() for line in _render_list(timeline, label_width))
    quantum, exact = _column_width(timeline) if timed else (1.0, True)
    width = max((len(str(t.action)) for t in timed), default=1)
    num_columns = _column(timeline.makespan, quantum)
    lines = [
        f"stage {s:>{label_width}}: " + _grid_row(timeline.entries[s], quantum, num_columns, width)
        for s in range(timeline.num_stages)
    ]
    if not (exact and quantum == 1 and all(abs(t.end - t.start - 1) < _EPS for t in timed)):
        lines.append(_scale_note(quantum, exact))
    return "\n".join(line.rstrip() for line in lines)
