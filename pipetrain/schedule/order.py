"""The dependency rules every part of pipetrain obeys: validator, simulator and runtime.

- Each worker runs its actions one at a time, in list order.
- ``F(s, mb)`` consumes the output of ``F(s-1, mb)`` (``s > 0``; stage 0's input comes from the driver).
- ``B(s, mb)`` and ``I(s, mb)`` need ``F(s, mb)`` done and consume the input gradient that stage ``s+1``
  produces for ``mb`` with its ``B`` or its ``I``, whichever the schedule gives it (``s < S-1``; the last
  stage starts its backward from its own loss).
- ``W(s, mb)`` needs ``I(s, mb)`` done and produces nothing another action consumes.
"""

from __future__ import annotations

import functools

from pipetrain.schedule.actions import Action, ActionKind
from pipetrain.schedule.schedule import Schedule

__all__ = ["dependencies", "execution_order", "input_dependency", "output_consumer"]

_F, _B, _I, _W = ActionKind.FORWARD, ActionKind.BACKWARD, ActionKind.INPUT_GRAD, ActionKind.WEIGHT_GRAD


@functools.lru_cache(maxsize=16)
def _actions_of(schedule: Schedule) -> frozenset[Action]:
    """Every action the schedule holds (the cache makes each lookup below a set probe)."""
    return frozenset(a for row in schedule.actions for a in row)


def _grad_producer(schedule: Schedule, stage_idx: int, mb_idx: int) -> Action:
    """The action of ``stage_idx`` that produces the gradient of its input for ``mb_idx``: its ``I`` when
    the schedule has one, else its ``B``."""
    split = Action(stage_idx, _I, mb_idx)
    return split if split in _actions_of(schedule) else Action(stage_idx, _B, mb_idx)


def input_dependency(action: Action, schedule: Schedule) -> Action | None:
    """The action whose output ``action`` consumes.

    ``None`` when nothing in the schedule produces it: stage 0's forward (input from the driver), the last
    stage's backward (its own loss) and ``W`` (it reads what its stage kept from ``I``).
    """
    s, mb = action.stage_idx, action.mb_idx
    if action.kind is _F:
        return Action(s - 1, _F, mb) if s > 0 else None
    if action.kind is _W:
        return None
    return _grad_producer(schedule, s + 1, mb) if s < schedule.num_stages - 1 else None


def output_consumer(action: Action, schedule: Schedule) -> Action | None:
    """The action that consumes ``action``'s output.

    ``None`` for the last stage's forward (its loss stays on its stage), stage 0's input gradient and ``W``.
    """
    s, mb = action.stage_idx, action.mb_idx
    if action.kind is _F:
        return Action(s + 1, _F, mb) if s < schedule.num_stages - 1 else None
    if action.kind is _W:
        return None
    if s == 0:
        return None
    split = Action(s - 1, _I, mb)
    return split if split in _actions_of(schedule) else Action(s - 1, _B, mb)


def dependencies(action: Action, schedule: Schedule) -> list[Action]:
    """Every action that must finish before ``action`` starts (besides its worker's previous action)."""
    s, mb = action.stage_idx, action.mb_idx
    if action.kind is _W:
        return [Action(s, _I, mb)]
    deps = [] if action.kind is _F else [Action(s, _F, mb)]
    consumed = input_dependency(action, schedule)
    return deps + ([consumed] if consumed is not None else [])


def execution_order(schedule: Schedule) -> tuple[list[Action], dict[int, Action]]:
    """Run every worker as far as the dependencies allow.

    Returns the actions in one feasible execution order and, for each worker that could not finish, the
    next action it is stuck on (empty when the schedule completes). Cached per schedule: the runtime and
    the bubble predictions ask for the same schedule's order every step.
    """
    order, stuck = _execution_order(schedule)
    return list(order), dict(stuck)


@functools.lru_cache(maxsize=16)
def _execution_order(schedule: Schedule) -> tuple[tuple[Action, ...], tuple[tuple[int, Action], ...]]:
    rows = schedule.actions
    pos = [0] * len(rows)
    done: set[Action] = set()
    order: list[Action] = []
    progress = True
    while progress:
        progress = False
        for w, row in enumerate(rows):
            while pos[w] < len(row) and done.issuperset(dependencies(row[pos[w]], schedule)):
                done.add(row[pos[w]])
                order.append(row[pos[w]])
                pos[w] += 1
                progress = True
    stuck = tuple((w, row[pos[w]]) for w, row in enumerate(rows) if pos[w] < len(row))
    return tuple(order), stuck
