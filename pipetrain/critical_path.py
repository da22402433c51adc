"""What a step's window is made of, along its critical path.

The simulator predicts a step from its actions' measured compute times alone; the runtime adds time
between actions that it does not model. To say how much and where, walk back from the step's last action:
each action started once the latest of these had ended: its worker's previous action, and the actions it
depends on (:func:`~pipetrain.schedule.dependencies`). Following that one each time gives the critical
path, and the step's window splits exactly into

- **compute**: the spans of the actions on the path (what the simulator sees);
- **transfer**: the gaps where the action was waiting for an input from another worker, from the end of
  the producing action to the start of the consumer: the producer handing the value over, the message,
  the consumer waking up;
- **overhead**: the gaps after the worker's own previous action or an input from a stage of the same
  worker: the runtime's own work on the compute thread between two actions (handing outputs over,
  waiting for the input, dispatching);
- **start**: from the window's start to the path's first action (the step's request reaching the worker,
  the tail of the step before).

An action waiting for both kinds at once counts as whichever ended last, so a transfer that ends within
the previous action's span is not counted. The times are the workers' wall clocks: across machines, a
clock offset lands in the transfer gaps.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipetrain.schedule import Action, Schedule, dependencies
from pipetrain.timings import SpanCategory, StageReport

__all__ = ["CriticalPath", "critical_path"]


@dataclass(frozen=True)
class CriticalPath:
    """A step's window split along its critical path (see the module's docstring), in seconds."""

    compute_s: float
    transfer_s: float
    overhead_s: float
    start_s: float
    transfers: int
    """Inputs from other workers waited for on the path."""
    actions: tuple[Action, ...]
    """The path, first action first."""


def critical_path(schedule: Schedule, reports: Sequence[StageReport], window_s: float) -> CriticalPath | None:
    """The critical path of one step of ``schedule`` from its stages' compute spans; ``None`` when an
    action of the schedule has no span (a report without spans)."""
    spans = _compute_spans(reports)
    waits_for = _waits_for(schedule)
    if not spans.keys() >= waits_for.keys():
        return None
    name = max(waits_for, key=lambda action: spans[action][1])
    compute = transfer = overhead = 0.0
    transfers = 0
    path = []
    while True:
        path.append(name)
        start, end = spans[name]
        compute += end - start
        held_by = waits_for[name][1]
        if not held_by:
            break
        binding, crosses = max(held_by, key=lambda candidate: spans[candidate[0]][1])
        gap = max(start - spans[binding][1], 0.0)
        if crosses:
            transfer += gap
            transfers += 1
        else:
            overhead += gap
        name = binding
    return CriticalPath(
        compute_s=compute,
        transfer_s=transfer,
        overhead_s=overhead,
        start_s=max(window_s - compute - transfer - overhead, 0.0),
        transfers=transfers,
        actions=tuple(waits_for[name][0] for name in reversed(path)),
    )


@functools.lru_cache(maxsize=16)
def _waits_for(schedule: Schedule) -> dict[str, tuple[Action, tuple[tuple[str, bool], ...]]]:
    """Action text -> the action, and what it waits for: the actions it depends on and its worker's
    previous action (by text), each with whether it runs on another worker. Computed once per schedule."""
    waits_for = {}
    for row in schedule.actions:
        for i, action in enumerate(row):
            held_by = [*dependencies(action, schedule), *row[i - 1 : i]]
            worker = schedule.worker_of(action.stage_idx)
            waits_for[str(action)] = (
                action,
                tuple((str(other), schedule.worker_of(other.stage_idx) != worker) for other in held_by),
            )
    return waits_for


def _compute_spans(reports: Sequence[StageReport]) -> Mapping[str, tuple[float, float]]:
    """Action text -> ``(start, end)`` of its compute span."""
    return {
        span.name: (span.start, span.end)
        for report in reports
        for span in report.spans
        if span.category == SpanCategory.COMPUTE
    }
