"""Static checks of a schedule: completeness, ordering and freedom from deadlock.

The dependency rules live in :mod:`pipetrain.schedule.order`.
"""

from __future__ import annotations

from collections import Counter

from pipetrain.schedule.actions import Action, ActionKind, Schedule
from pipetrain.schedule.order import dependencies, execution_order

__all__ = ["validate_schedule"]


def _check_stage(s: int, actions: list[Action], num_microbatches: int) -> None:
    for a in actions:
        if not isinstance(a, Action):
            raise ValueError(f"stage {s}: {a!r} is not an Action")
        if a.stage_idx != s:
            raise ValueError(f"stage {s}: action {a} belongs to stage {a.stage_idx}, not stage {s}")
        if a.mb_idx >= num_microbatches:
            raise ValueError(
                f"stage {s}: action {a} has micro-batch {a.mb_idx} >= num_microbatches ({num_microbatches})"
            )
    counts = Counter(actions)
    position = {a: i for i, a in enumerate(actions)}
    for mb in range(num_microbatches):
        fwd, bwd = Action(s, ActionKind.FORWARD, mb), Action(s, ActionKind.BACKWARD, mb)
        for a in (fwd, bwd):
            if counts[a] == 0:
                raise ValueError(f"stage {s}: action {a} is missing")
            if counts[a] > 1:
                raise ValueError(f"stage {s}: action {a} is duplicated ({counts[a]} times)")
        if position[bwd] < position[fwd]:
            raise ValueError(f"stage {s}: backward {bwd} comes before its forward {fwd}")


def validate_schedule(schedule: Schedule, num_stages: int, num_microbatches: int) -> None:
    """Raise ``ValueError`` naming the offending stage/action if ``schedule`` cannot run correctly.

    Checks that every stage ``0..num_stages-1`` has an action list holding exactly one forward
    and one backward per micro-batch (backward after forward), with no foreign actions, and
    that the cross-stage dependencies can all be satisfied (no deadlock).
    """
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if num_microbatches < 1:
        raise ValueError(f"pipeline.num_microbatches must be >= 1, got {num_microbatches}")
    for s in range(num_stages):
        if s not in schedule:
            raise ValueError(f"schedule is missing stage {s} (expected stages 0..{num_stages - 1})")
    extra = sorted(set(schedule) - set(range(num_stages)))
    if extra:
        raise ValueError(f"schedule has unexpected stage {extra[0]} (expected stages 0..{num_stages - 1})")
    for s in range(num_stages):
        _check_stage(s, schedule[s], num_microbatches)

    order, stuck = execution_order(schedule, num_stages)
    if stuck:
        done = set(order)
        waits = []
        for s, a in sorted(stuck.items()):
            unmet = " and ".join(str(d) for d in dependencies(a, num_stages) if d not in done)
            waits.append(f"stage {s} stuck at {a} (waiting for {unmet})")
        raise ValueError("schedule deadlocks, no stage can make progress: " + "; ".join(waits))
