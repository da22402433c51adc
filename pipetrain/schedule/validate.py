"""Static checks of a schedule: completeness, ordering and freedom from deadlock.

Dependency rules (the runtime obeys the same): each stage runs its actions one at a time in
list order; ``F(s, mb)`` needs ``F(s-1, mb)`` done (``s > 0``); ``B(s, mb)`` needs ``F(s, mb)``
done and, if ``s < S-1``, ``B(s+1, mb)`` done.
"""

from __future__ import annotations

from collections import Counter

from pipetrain.schedule.actions import Action, ActionKind, Schedule

__all__ = ["validate_schedule"]


def _dependencies(action: Action, num_stages: int) -> list[Action]:
    """Actions on other stages (or the same one) that must finish before ``action`` starts."""
    s, mb = action.stage_idx, action.mb_idx
    if action.kind is ActionKind.FORWARD:
        return [Action(s - 1, ActionKind.FORWARD, mb)] if s > 0 else []
    deps = [Action(s, ActionKind.FORWARD, mb)]
    if s < num_stages - 1:
        deps.append(Action(s + 1, ActionKind.BACKWARD, mb))
    return deps


def _execution_order(schedule: Schedule, num_stages: int) -> tuple[list[Action], dict[int, Action]]:
    """Run every stage as far as its dependencies allow.

    Returns the actions in one feasible execution order and, for each stage that could not
    finish, the next action it is stuck on (empty when the schedule completes).
    """
    pos = dict.fromkeys(schedule, 0)
    done: set[Action] = set()
    order: list[Action] = []
    progress = True
    while progress:
        progress = False
        for s, actions in schedule.items():
            while pos[s] < len(actions) and done.issuperset(_dependencies(actions[pos[s]], num_stages)):
                done.add(actions[pos[s]])
                order.append(actions[pos[s]])
                pos[s] += 1
                progress = True
    stuck = {s: actions[pos[s]] for s, actions in schedule.items() if pos[s] < len(actions)}
    return order, stuck


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

    order, stuck = _execution_order(schedule, num_stages)
    if stuck:
        done = set(order)
        waits = []
        for s, a in sorted(stuck.items()):
            unmet = " and ".join(str(d) for d in _dependencies(a, num_stages) if d not in done)
            waits.append(f"stage {s} stuck at {a} (waiting for {unmet})")
        raise ValueError("schedule deadlocks, no stage can make progress: " + "; ".join(waits))
