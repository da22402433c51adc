"""Static checks of a schedule: placement, completeness, ordering and freedom from deadlock.

The dependency rules live in :mod:`pipetrain.schedule.order`.
"""

from __future__ import annotations

from collections import Counter

from pipetrain.schedule.actions import Action, ActionKind
from pipetrain.schedule.order import dependencies, execution_order
from pipetrain.schedule.render import render_schedule
from pipetrain.schedule.schedule import Schedule

__all__ = ["validate_schedule"]

_F, _B, _I, _W = ActionKind.FORWARD, ActionKind.BACKWARD, ActionKind.INPUT_GRAD, ActionKind.WEIGHT_GRAD


def _check_placement(schedule: Schedule) -> None:
    if schedule.num_workers < 1:
        raise ValueError("schedule has no workers (Schedule.actions is empty)")
    if schedule.num_stages < 1:
        raise ValueError("schedule has no stages (Schedule.placement is empty)")
    for s, w in enumerate(schedule.placement):
        if w >= schedule.num_workers:
            raise ValueError(
                f"placement puts stage {s} on worker {w}, but the schedule has {schedule.num_workers} "
                f"workers (0..{schedule.num_workers - 1})"
            )
    for w in range(schedule.num_workers):
        if not schedule.stages_of(w):
            raise ValueError(
                f"worker {w} hosts no stage (placement {schedule.placement}); drop it or place a stage on it"
            )


def _check_row(schedule: Schedule, w: int) -> None:
    """Every action of worker ``w`` is an Action of a stage it hosts, with a micro-batch in range."""
    for a in schedule[w]:
        if not isinstance(a, Action):
            raise ValueError(f"worker {w}: {a!r} is not an Action")
        if a.stage_idx >= schedule.num_stages:
            raise ValueError(
                f"worker {w}: action {a} is of stage {a.stage_idx}, but the schedule has "
                f"{schedule.num_stages} stages"
            )
        if schedule.worker_of(a.stage_idx) != w:
            raise ValueError(
                f"worker {w}: action {a} belongs to stage {a.stage_idx}, which the placement puts on worker "
                f"{schedule.worker_of(a.stage_idx)}"
            )
        if a.mb_idx >= schedule.num_microbatches:
            raise ValueError(
                f"worker {w}: action {a} has micro-batch {a.mb_idx} >= num_microbatches "
                f"({schedule.num_microbatches})"
            )


def _check_microbatch(s: int, mb: int, counts: Counter[Action], position: dict[Action, int], w: int) -> None:
    """Stage ``s`` runs ``F`` and either ``B`` or ``I`` then ``W`` of ``mb`` exactly once, in that order."""
    f, b, i, wg = (Action(s, kind, mb) for kind in (_F, _B, _I, _W))
    for a in (f, b, i, wg):
        if counts[a] > 1:
            raise ValueError(f"stage {s}: action {a} is duplicated ({counts[a]} times)")
    if not counts[f]:
        raise ValueError(f"stage {s}: action {f} is missing")
    if counts[b] and (counts[i] or counts[wg]):
        raise ValueError(
            f"stage {s}: micro-batch {mb} has both {b} and {i if counts[i] else wg}; run either the full "
            f"backward {b} or its halves {i} and {wg}"
        )
    if not (counts[b] or counts[i] or counts[wg]):
        raise ValueError(f"stage {s}: action {b} is missing (a full backward, or {i} and {wg})")
    if counts[i] != counts[wg]:
        missing, other = (wg, i) if counts[i] else (i, wg)
        raise ValueError(f"stage {s}: action {missing} is missing ({other} needs its other half)")
    grad = b if counts[b] else i
    if position[grad] < position[f]:
        raise ValueError(f"worker {w}: backward {grad} comes before its forward {f}")
    if counts[wg] and position[wg] < position[i]:
        raise ValueError(f"worker {w}: weight gradient {wg} comes before its input gradient {i}")


def _check_deadlock(schedule: Schedule) -> None:
    order, stuck = execution_order(schedule)
    if not stuck:
        return
    done = set(order)
    waits = []
    for w, a in sorted(stuck.items()):
        unmet = " and ".join(str(d) for d in dependencies(a, schedule) if d not in done)
        waits.append(f"worker {w} stuck at {a} (waiting for {unmet})")
    raise ValueError(
        "schedule deadlocks, no worker can make progress: "
        + "; ".join(waits)
        + "\n"
        + render_schedule(schedule, stuck)
    )


def validate_schedule(schedule: Schedule) -> None:
    """Raise ``ValueError`` naming the offending worker, stage or action if ``schedule`` cannot run.

    Checks that the placement puts every stage on one of the schedule's workers and every worker hosts a
    stage; that each worker's actions are of the stages it hosts; that every stage runs, for every
    micro-batch, one forward and either one full backward or one input-gradient and one weight-gradient
    pass, each after what it needs on the same worker; and that the cross-worker dependencies can all be
    met (no deadlock).
    """
    if not isinstance(schedule, Schedule):
        raise ValueError(f"expected a Schedule, got {type(schedule).__name__}")
    _check_placement(schedule)
    for w in range(schedule.num_workers):
        _check_row(schedule, w)
    for w, row in schedule.items():
        counts = Counter(row)
        position = {a: k for k, a in enumerate(row)}
        for s in schedule.stages_of(w):
            for mb in range(schedule.num_microbatches):
                _check_microbatch(s, mb, counts, position, w)
    _check_deadlock(schedule)
