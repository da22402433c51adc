"""The critical path of a step, from its stages' compute spans."""

from __future__ import annotations

import itertools

import pytest

from pipetrain.critical_path import critical_path
from pipetrain.schedule import Action, build_schedule, dependencies, execution_order
from pipetrain.timings import Span, SpanCategory, StageReport


def reports_of(spans: dict[str, tuple[float, float]], num_stages: int) -> list[StageReport]:
    """One report per stage holding the compute spans of its actions (``"1F0": (start, end)``)."""
    return [
        StageReport(
            stage_idx=stage,
            spans=tuple(
                Span(stage, SpanCategory.COMPUTE, name, start, end)
                for name, (start, end) in spans.items()
                if Action.parse(name).stage_idx == stage
            ),
        )
        for stage in range(num_stages)
    ]


# 1F1B, 2 stages, 2 micro-batches; every action takes 1 s, an input from the other worker arrives 0.5 s
# after its producer ends, and an action on the same worker starts 0.1 s after the one it waits for:
#   worker 0: 0F0 [0, 1]       0F1 [1.1, 2.1]                   0B0 [4.1, 5.1]             0B1 [6.3, 7.3]
#   worker 1:   1F0 [1.5, 2.5]  1B0 [2.6, 3.6]  1F1 [3.7, 4.7]  1B1 [4.8, 5.8]
SPANS = {
    "0F0": (0.0, 1.0),
    "0F1": (1.1, 2.1),
    "1F0": (1.5, 2.5),
    "1B0": (2.6, 3.6),
    "1F1": (3.7, 4.7),
    "0B0": (4.1, 5.1),
    "1B1": (4.8, 5.8),
    "0B1": (6.3, 7.3),
}


def test_the_window_splits_into_compute_transfers_and_overhead_along_the_critical_path():
    schedule = build_schedule("1f1b", 2, 2)

    path = critical_path(schedule, reports_of(SPANS, 2), window_s=7.8)

    assert path is not None
    assert [str(action) for action in path.actions] == ["0F0", "1F0", "1B0", "1F1", "1B1", "0B1"]
    assert path.compute_s == pytest.approx(6.0)
    assert path.transfers == 2  # 0F0 -> 1F0 and 1B1 -> 0B1; 0F1 -> 1F1 was there before 1B0 ended
    assert path.transfer_s == pytest.approx(1.0)
    assert path.overhead_s == pytest.approx(0.3)
    assert path.start_s == pytest.approx(0.5)  # the window began 0.5 s before 0F0
    assert path.compute_s + path.transfer_s + path.overhead_s + path.start_s == pytest.approx(7.8)


def replay(schedule, transfer_s: float, local_gap_s: float) -> dict[str, tuple[float, float]]:
    """Spans of every action run for 1 s as soon as it may: an input from another worker arrives
    ``transfer_s`` after its producer ends; anything else is ``local_gap_s`` behind what it waits for."""
    spans: dict[str, tuple[float, float]] = {}
    free: dict[int, float] = {}
    for action in execution_order(schedule)[0]:
        worker = schedule.worker_of(action.stage_idx)
        ready = [free[worker] + local_gap_s] if worker in free else [0.0]
        for needed in dependencies(action, schedule):
            crosses = schedule.worker_of(needed.stage_idx) != worker
            ready.append(spans[str(needed)][1] + (transfer_s if crosses else local_gap_s))
        spans[str(action)] = (max(ready), max(ready) + 1.0)
        free[worker] = max(ready) + 1.0
    return spans


@pytest.mark.parametrize("name, num_stages", [("interleaved_1f1b", 4), ("zb_v", 4), ("gpipe", 3)])
def test_every_gap_on_the_path_is_named_for_what_the_action_waited_for(name, num_stages):
    """In a V, stages 1 and 2 share worker 1: 1F -> 2F is a local hand-over, not a transfer."""
    schedule = build_schedule(name, num_stages, 4, stages_per_worker=1 if name == "gpipe" else 2)
    spans = replay(schedule, transfer_s=0.5, local_gap_s=0.1)
    window_s = max(end for _, end in spans.values())

    path = critical_path(schedule, reports_of(spans, num_stages), window_s)

    assert path is not None
    crossings = sum(
        schedule.worker_of(a.stage_idx) != schedule.worker_of(b.stage_idx)
        for a, b in itertools.pairwise(path.actions)
    )
    assert path.transfers == crossings > 0
    assert path.compute_s == pytest.approx(len(path.actions))
    assert path.transfer_s == pytest.approx(0.5 * crossings)
    assert path.overhead_s == pytest.approx(0.1 * (len(path.actions) - 1 - crossings))
    assert path.start_s == pytest.approx(0.0)


def test_a_step_without_the_spans_of_every_action_has_no_critical_path():
    spans = {name: span for name, span in SPANS.items() if name != "1F1"}
    assert critical_path(build_schedule("1f1b", 2, 2), reports_of(spans, 2), window_s=7.8) is None
