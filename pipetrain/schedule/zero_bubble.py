"""Zero-bubble schedules (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024): ZB-H1 and ZB-V.

Both split each backward into ``I`` (the gradient of the stage's input, which the previous stage waits
for) and ``W`` (the parameter gradients, which nobody waits for), and move the ``W`` passes into what
would otherwise be bubbles. Under unit costs (``F = I = W``):

- ``zb_h1``, one stage per worker: 1F1B's warm-up, then ``F, I`` pairs with stage ``s`` holding back its
  first ``s`` weight gradients, which it runs in the cool-down while it would otherwise wait for the next
  input gradient. The bubble drops from 1F1B's ``(S-1)(F+I+W)`` to ``(S-1)(F+I-W)`` per worker, ``3`` of
  ``27`` units at 4 stages and 8 micro-batches (0.111, against 1F1B's 0.273). Every stage holds at most
  ``S`` micro-batches in flight (from ``F`` to ``W``): 1F1B's peak, which 1F1B reaches on its first stage
  only.
- ``zb_v``, two stages per worker in V placement (stages ``w`` and ``2W-1-w`` on worker ``w``; the first
  worker both starts and ends the pipeline). Two kinds of order are candidates:

  - the paper's ZB-V order (also PyTorch's ``ScheduleZBVZeroBubble``): worker ``w`` warms up with
    ``2(W-w)-1`` forwards of its first stage, ``w`` pairs of forwards of both stages, and ``W-w`` triples
    ``F I W`` on its second stage; in the steady state it runs ``F I W`` on its first stage, then on its
    second; in the cool-down it runs input gradients first and its held-back weight gradients last;
  - the order an ideal machine with unit costs would run, found by list scheduling: whenever a worker is
    free it runs the first ready action in a priority order of the kinds (``I W F``, ``I F W`` or
    ``F I W``), the later of its two stages first, an ``F`` only while the worker holds fewer than ``2W``
    micro-batches of its two stages in flight.

  The kept one finishes first when every value between two workers takes a quarter of an action to
  arrive (ties: unit costs, then the order above). List scheduling packs unit-cost actions tightly, so
  a transfer or one slower stage delays everything behind it; the paper's order leaves each worker's
  steady state its own ``F I W`` triples to run while an input travels. At 2 workers and 8 micro-batches
  both finish in 49 units with unit costs, but with a quarter-unit transfer the paper's order needs 49.75
  and the best list-scheduled one 51.5; with an I of 1.2 units and a W of 0.8, 49.2 against 51. The
  paper's order is kept for ``m > W``; list scheduling for fewer micro-batches, where it is shorter. With
  unit costs the bubble at 4 workers and 8 micro-batches is ``12`` of ``204`` worker-units (0.059), the
  least any order can reach (worker ``w`` cannot start before ``w`` units, and the last worker's ``48``
  units of work end no earlier than ``51``).
"""

from __future__ import annotations

from pipetrain.schedule.actions import Action, ActionKind
from pipetrain.schedule.layout import check_sizes, num_workers_for
from pipetrain.schedule.placement import one_placement, v_placement
from pipetrain.schedule.schedule import Schedule
from pipetrain.schedule.simulate import simulate

__all__ = ["check_zb_v_layout", "zb_h1", "zb_v"]

_F, _I, _W = ActionKind.FORWARD, ActionKind.INPUT_GRAD, ActionKind.WEIGHT_GRAD


def zb_h1(num_stages: int, num_microbatches: int, stages_per_worker: int = 1) -> Schedule:
    """ZB-H1 on one stage per worker (see the module doc)."""
    check_sizes(num_stages, num_microbatches, stages_per_worker)
    if stages_per_worker != 1:
        raise ValueError(
            f"pipeline.stages_per_worker={stages_per_worker}: schedule=zb_h1 runs one stage per worker; set "
            "pipeline.stages_per_worker=1, or use schedule=zb_v with pipeline.stages_per_worker=2"
        )
    m = num_microbatches
    rows = []
    for s in range(num_stages):
        warmup = min(num_stages - 1 - s, m)
        actions = [Action(s, _F, mb) for mb in range(warmup)]
        weights = 0
        for k in range(m - warmup):
            actions += [Action(s, _F, warmup + k), Action(s, _I, k)]
            if k >= s:  # stage s holds back its first s weight gradients
                actions.append(Action(s, _W, weights))
                weights += 1
        for mb in range(m - warmup, m):
            actions.append(Action(s, _I, mb))
            if weights < mb + 1:
                actions.append(Action(s, _W, weights))
                weights += 1
        actions += [Action(s, _W, mb) for mb in range(weights, m)]
        rows.append(tuple(actions))
    return Schedule(tuple(rows), one_placement(num_stages), m, "zb_h1")


def zb_v(num_stages: int, num_microbatches: int, stages_per_worker: int = 2) -> Schedule:
    """ZB-V on ``num_stages / 2`` workers, V placement (see the module doc)."""
    check_sizes(num_stages, num_microbatches, stages_per_worker)
    num_workers = check_zb_v_layout(num_stages, stages_per_worker)
    placement = v_placement(num_stages, num_workers)
    paper = tuple(_paper_v_row(w, num_workers, num_microbatches) for w in range(num_workers))
    listed = [
        _list_schedule(num_stages, num_microbatches, placement, 2 * num_workers, priority)
        for priority in ((_I, _W, _F), (_I, _F, _W), (_F, _I, _W))
    ]
    candidates = [Schedule(rows, placement, num_microbatches, "zb_v") for rows in (paper, *listed)]

    def finish(schedule: Schedule) -> tuple[float, float]:
        return simulate(schedule, transfer=_CHOICE_TRANSFER).makespan, simulate(schedule).makespan

    return min(candidates, key=finish)


_CHOICE_TRANSFER = 0.25
"""The transfer time between workers, in unit actions, under which ``zb_v`` picks its order."""


def _paper_v_row(worker: int, num_workers: int, num_microbatches: int) -> tuple[Action, ...]:
    """Worker ``worker``'s actions in the paper's ZB-V order (see the module doc).

    The phases are sized for at least ``2W - 1`` micro-batches; with fewer, the actions of micro-batches
    that do not exist are left out.
    """
    first, second = worker, 2 * num_workers - 1 - worker
    padded = max(num_microbatches, 2 * num_workers - 1)
    issued = {(s, kind): 0 for s in (first, second) for kind in (_F, _I, _W)}
    row: list[Action] = []

    def run(stage: int, *kinds: ActionKind) -> None:
        for kind in kinds:
            row.append(Action(stage, kind, issued[stage, kind]))
            issued[stage, kind] += 1

    for _ in range(2 * (num_workers - worker) - 1):
        run(first, _F)
    for _ in range(worker):
        run(second, _F)
        run(first, _F)
    for _ in range(num_workers - worker):
        run(second, _F, _I, _W)
    while issued[first, _F] < padded or issued[second, _F] < issued[first, _F]:
        if issued[first, _F] < padded:
            run(first, _F)
        run(first, _I, _W)
        run(second, _F, _I, _W)
    for _ in range(worker):  # input gradients first: the previous worker waits for them
        run(first, _I)
        run(second, _I)
    for _ in range(num_workers - worker):
        run(first, _I, _W)
    for stage in (second, first):
        while issued[stage, _W] < padded:
            run(stage, _W)
    return tuple(action for action in row if action.mb_idx < num_microbatches)


def check_zb_v_layout(num_stages: int, stages_per_worker: int) -> int:
    """The number of workers ``zb_v`` runs ``num_stages`` on; ``ValueError`` naming the key and the fix
    unless ``stages_per_worker`` is 2 and divides the stages."""
    check_sizes(num_stages, 1, stages_per_worker)
    if stages_per_worker != 2:
        raise ValueError(
            f"pipeline.stages_per_worker={stages_per_worker}: schedule=zb_v hosts exactly two stages on each "
            "worker (a V: stages w and 2W-1-w on worker w); set pipeline.stages_per_worker=2"
        )
    return num_workers_for(num_stages, stages_per_worker)


def _list_schedule(
    num_stages: int,
    num_microbatches: int,
    placement: tuple[int, ...],
    max_in_flight: int,
    priority: tuple[ActionKind, ...],
) -> tuple[tuple[Action, ...], ...]:
    """Each worker's actions in the order unit-cost list scheduling with ``priority`` over the action
    kinds runs them (see the module doc)."""
    m = num_microbatches
    num_workers = max(placement) + 1
    hosted = [
        sorted((s for s in range(num_stages) if placement[s] == w), reverse=True) for w in range(num_workers)
    ]
    next_mb = {kind: [0] * num_stages for kind in (_F, _I, _W)}
    finished: dict[Action, int] = {}
    rows: list[list[Action]] = [[] for _ in range(num_workers)]

    def done_by(action: Action, t: int) -> bool:
        return finished.get(action, t + 1) <= t

    def ready(kind: ActionKind, s: int, t: int) -> bool:
        mb = next_mb[kind][s]
        if kind is _F:
            in_flight = sum(next_mb[_F][x] - next_mb[_W][x] for x in hosted[placement[s]])
            return mb < m and in_flight < max_in_flight and (s == 0 or done_by(Action(s - 1, _F, mb), t))
        if kind is _I:
            return (
                mb < next_mb[_F][s]
                and done_by(Action(s, _F, mb), t)
                and (s == num_stages - 1 or done_by(Action(s + 1, _I, mb), t))
            )
        return mb < next_mb[_I][s] and done_by(Action(s, _I, mb), t)

    total = 3 * num_stages * m
    t = 0
    while len(finished) < total:
        if t > total:
            raise AssertionError("list scheduling made no progress")  # the rules above always progress
        for w in range(num_workers):
            if rows[w] and finished[rows[w][-1]] > t:
                continue
            choice = next(((k, s) for k in priority for s in hosted[w] if ready(k, s, t)), None)
            if choice is None:
                continue
            kind, s = choice
            action = Action(s, kind, next_mb[kind][s])
            next_mb[kind][s] += 1
            rows[w].append(action)
            finished[action] = t + 1
        t += 1
    return tuple(tuple(row) for row in rows)
