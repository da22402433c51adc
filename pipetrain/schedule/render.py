"""Text pictures of schedules and timelines: one line per worker.

A line is labelled ``stage k:`` when every worker hosts exactly stage ``k`` (one stage per worker), and
``worker k:`` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction
from typing import TYPE_CHECKING

from pipetrain.schedule.actions import Action
from pipetrain.schedule.schedule import Schedule

if TYPE_CHECKING:  # the simulator imports the validator, which uses render_schedule
    from pipetrain.schedule.simulate import TimedAction, Timeline

__all__ = ["render_schedule", "render_timeline"]

_EPS = 1e-9
_MAX_DENOMINATOR = 1000
_MAX_COLUMNS_PER_ACTION = 4


def _labels(schedule: Schedule) -> list[str]:
    """``stage k:`` or ``worker k:`` for each worker, padded to one width."""
    word = "stage" if schedule.one_stage_per_worker else "worker"
    width = len(str(schedule.num_workers - 1))
    return [f"{word} {w:>{width}}: " for w in range(schedule.num_workers)]


def render_schedule(schedule: Schedule, marks: Mapping[int, Action] | None = None) -> str:
    """Each worker's actions in list order, with ``marks[worker_idx]`` bracketed and pointed at.

    For example, 1F1B on 2 stages with stage 0 stuck at ``0B0``::

        stage 0: 0F0 [0B0] 0F1 0B1  <-- here
        stage 1: 1F0 1B0 1F1 1B1
    """
    marks = marks or {}
    lines = []
    for (w, row), label in zip(schedule.items(), _labels(schedule), strict=True):
        cells = [f"[{a}]" if marks.get(w) == a else str(a) for a in row]
        lines.append(label + " ".join(cells) + ("  <-- here" if w in marks else ""))
    return "\n".join(line.rstrip() for line in lines)


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


def _column_width(timed: list[TimedAction]) -> tuple[float, bool]:
    """The time one grid column stands for, and whether every start and end falls on a column edge.

    One column is the longest time step all starts and ends are multiples of, as long as the shortest
    action spans at most ``_MAX_COLUMNS_PER_ACTION`` columns; otherwise one column is the shortest
    action's duration and times are rounded to the nearest column.
    """
    shortest = min(t.end - t.start for t in timed)
    quantum = _exact_quantum([x for t in timed for x in (t.start, t.end)])
    if quantum is not None and shortest / quantum <= _MAX_COLUMNS_PER_ACTION + _EPS:
        return quantum, True
    return shortest, False


def _column(time: float, quantum: float) -> int:
    """The grid column edge nearest to ``time`` (halves round up)."""
    return math.floor(time / quantum + 0.5)


def _grid_row(row: list[TimedAction], quantum: float, num_columns: int, width: int) -> str:
    """One worker's line of the grid: an action's label, followed by ``-`` over the further columns it
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


def render_timeline(timeline: Timeline) -> str:
    """Render ``timeline`` as a grid, one line per worker, one column per time step.

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
    zero duration lists each worker's actions as ``action@start-end`` instead.
    """
    labels = _labels(timeline.schedule)
    rows = [timeline.entries[w] for w in range(timeline.num_workers)]
    timed = [t for row in rows for t in row]
    if any(t.end - t.start <= _EPS for t in timed):
        lines = [
            label + " ".join(f"{t.action}@{t.start:.3g}-{t.end:.3g}" for t in row)
            for label, row in zip(labels, rows, strict=True)
        ]
        return "\n".join(line.rstrip() for line in lines)
    quantum, exact = _column_width(timed) if timed else (1.0, True)
    width = max((len(str(t.action)) for t in timed), default=1)
    num_columns = _column(timeline.makespan, quantum)
    lines = [
        label + _grid_row(row, quantum, num_columns, width) for label, row in zip(labels, rows, strict=True)
    ]
    if not (exact and quantum == 1 and all(abs(t.end - t.start - 1) < _EPS for t in timed)):
        lines.append(_scale_note(quantum, exact))
    return "\n".join(line.rstrip() for line in lines)
