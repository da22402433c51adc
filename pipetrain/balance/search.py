"""Pick the stage split with the lowest simulated step time: pure Python over measured unit costs.

A *split* is a balance: how many consecutive units each stage takes. For each candidate the stage costs
are the sums of its units' costs, the configured schedule is simulated with them
(:func:`pipetrain.schedule.simulate`), and the predicted step time is the time the last worker finishes
its actions and its stages' optimizer steps. The search is exact: a depth-first walk over all splits,
cutting a branch once a lower bound of its step time (a worker's compute, plus the forwards that must
come before its first action) reaches the best split found so far, or once a worker's memory passes the
cap. Both bounds only grow as a stage takes more units, so the walk stops early without losing the best.

Memory of a worker = for each stage it hosts: its units' static bytes (parameters, gradients, optimizer
state, buffers) + their activation bytes per micro-batch x the stage's peak in-flight micro-batches in
the simulated schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from math import comb

from pipetrain.schedule import ActionKind, Schedule, StageCosts, Timeline, build_schedule, simulate

__all__ = ["UnitCost", "SplitPrediction", "SplitSearch", "uniform_balance", "predict_split", "search_split"]

_MIB = 2**20
_TIE = 1e-12


@dataclass(frozen=True)
class UnitCost:
    """What one unit costs for one micro-batch (times in seconds, memory in bytes)."""

    name: str
    forward_s: float
    backward_s: float
    optimizer_s: float = 0.0
    """One optimizer step over the unit's parameters."""
    activation_bytes: int = 0
    """Bytes kept for backward per micro-batch in flight (autograd's saved tensors, not the weights)."""
    static_bytes: int = 0
    """Bytes held whatever the micro-batches: parameters, their gradients, optimizer state, buffers."""


@dataclass(frozen=True)
class SplitPrediction:
    """What the simulator predicts for one split."""

    balance: tuple[int, ...]
    step_time_s: float
    """When the last worker has finished its actions and its stages' optimizer steps."""
    bubble_fraction: float
    """Idle share of the workers over the simulated timeline (optimizer steps not included)."""
    worker_memory_bytes: tuple[int, ...]
    """Peak memory estimate per worker."""

    @property
    def peak_memory_bytes(self) -> int:
        """The largest worker's memory estimate."""
        return max(self.worker_memory_bytes)


@dataclass(frozen=True)
class SplitSearch:
    """The splits a search compared, for one schedule and micro-batch count."""

    schedule: Schedule
    units: tuple[UnitCost, ...]
    best: SplitPrediction
    num_simulated: int
    """Splits simulated (the rest were cut by the bounds)."""
    num_splits: int
    """All splits of the units into the stages."""


def uniform_balance(num_units: int, num_stages: int) -> tuple[int, ...]:
    """Unit counts as equal as possible, the larger ones first (``7`` into ``2``: ``(4, 3)``)."""
    return tuple(num_units // num_stages + (idx < num_units % num_stages) for idx in range(num_stages))


class _Evaluator:
    """Simulates splits of ``units`` under one schedule (its peak in-flight counts computed once)."""

    def __init__(self, units: Sequence[UnitCost], schedule: Schedule) -> None:
        self.units = tuple(units)
        self.schedule = schedule
        # The schedule fixes each worker's order of actions, so in-flight counts do not depend on the costs.
        self.in_flight = simulate(schedule).peak_in_flight
        self.prefix = {
            name: (0, *accumulate(getattr(u, name) for u in units))
            for name in ("forward_s", "backward_s", "optimizer_s", "activation_bytes", "static_bytes")
        }
        self.count = 0

    def total(self, name: str, start: int, end: int) -> float:
        return self.prefix[name][end] - self.prefix[name][start]

    def memory(self, stage_idx: int, start: int, end: int) -> int:
        return int(
            self.total("static_bytes", start, end)
            + self.in_flight[stage_idx] * self.total("activation_bytes", start, end)
        )

    def predict(self, balance: Sequence[int]) -> SplitPrediction:
        self.count += 1
        bounds = [0, *accumulate(balance)]
        spans = list(zip(bounds, bounds[1:], strict=False))
        costs = StageCosts(
            tuple(self.total("forward_s", a, b) for a, b in spans),
            tuple(self.total("backward_s", a, b) for a, b in spans),
        )
        timeline = simulate(self.schedule, costs)
        memory = [0] * self.schedule.num_workers
        optimizer = [0.0] * self.schedule.num_workers
        for stage_idx, (a, b) in enumerate(spans):
            worker = self.schedule.placement[stage_idx]
            memory[worker] += self.memory(stage_idx, a, b)
            optimizer[worker] += self.total("optimizer_s", a, b)
        return SplitPrediction(
            balance=tuple(balance),
            step_time_s=_step_time(timeline, optimizer),
            bubble_fraction=timeline.bubble_fraction,
            worker_memory_bytes=tuple(memory),
        )


def _step_time(timeline: Timeline, optimizer_s: Sequence[float]) -> float:
    return max(
        (row[-1].end if row else 0.0) + optimizer_s[worker] for worker, row in timeline.entries.items()
    )


def search_split(
    units: Sequence[UnitCost],
    schedule_name: str,
    num_stages: int,
    num_microbatches: int,
    stages_per_worker: int = 1,
    max_memory_bytes: float | None = None,
) -> SplitSearch:
    """The split of ``units`` into ``num_stages`` stages with the lowest predicted step time.

    Ties go to the uniform split, then to the split found first (fewer units in the earlier stages).
    Raises ``ValueError`` naming ``pipeline.num_stages`` when there are more stages than units, and
    ``autobalance.max_memory_mib`` when no split fits in ``max_memory_bytes`` per worker.
    """
    num_units = len(units)
    if not 1 <= num_stages <= num_units:
        raise ValueError(
            f"pipeline.num_stages: {num_stages} stages for a model of {num_units} units; use 1..{num_units}"
        )
    schedule = build_schedule(schedule_name, num_stages, num_microbatches, stages_per_worker)
    evaluator = _Evaluator(units, schedule)
    cap = float("inf") if max_memory_bytes is None else float(max_memory_bytes)
    best: list[SplitPrediction] = []
    uniform = evaluator.predict(uniform_balance(num_units, num_stages))
    if uniform.peak_memory_bytes <= cap:
        best.append(uniform)  # a good first bound: many branches are cut against it at once
    one_per_worker = schedule.num_workers == num_stages
    # Without split backwards (I / W), a stage's last action is a B that every earlier stage then continues.
    whole_backward = all(
        a.kind is ActionKind.BACKWARD
        for row in schedule.actions
        for a in row
        if a.kind is not ActionKind.FORWARD
    )

    def passes(start: int, end: int) -> float:
        """A stage's forwards and backwards over the whole step."""
        return num_microbatches * (
            evaluator.total("forward_s", start, end) + evaluator.total("backward_s", start, end)
        )

    def walk(stage_idx: int, start: int, counts: list[int], busy: list[float], memory: list[float]) -> None:
        worker = schedule.placement[stage_idx]
        stages_left = num_stages - stage_idx - 1
        ends = range(start + 1, num_units - stages_left + 1) if stages_left else [num_units]
        for end in ends:
            worker_memory = memory[worker] + evaluator.memory(stage_idx, start, end)
            if worker_memory > cap:
                break
            own = passes(start, end)
            optimizer = evaluator.total("optimizer_s", start, end)
            bound = busy[worker] + own + optimizer
            if one_per_worker:
                # Alone on its worker, a stage starts after micro-batch 0's forwards before it, and its last
                # backward still runs through the stages before it.
                tail = evaluator.total("backward_s", 0, start) if whole_backward else 0.0
                bound = evaluator.total("forward_s", 0, start) + own + max(optimizer, tail)
            if best and bound >= best[0].step_time_s - _TIE:
                break  # the bound only grows with ``end``
            if one_per_worker and stages_left and best:
                # Some later stage gets at least the average of what is left, after the forwards before it.
                ahead = evaluator.total("forward_s", 0, end) + passes(end, num_units) / stages_left
                if ahead >= best[0].step_time_s - _TIE:
                    continue
            counts.append(end - start)
            if not stages_left:
                prediction = evaluator.predict(counts)
                if not best or prediction.step_time_s < best[0].step_time_s - _TIE:
                    best[:] = [prediction]
            else:
                saved = busy[worker], memory[worker]
                busy[worker], memory[worker] = busy[worker] + own + optimizer, worker_memory
                walk(stage_idx + 1, end, counts, busy, memory)
                busy[worker], memory[worker] = saved
            counts.pop()

    walk(0, 0, [], [0.0] * schedule.num_workers, [0.0] * schedule.num_workers)
    if not best:
        raise ValueError(_no_split_fits(evaluator, num_stages, cap))
    return SplitSearch(
        schedule=schedule,
        units=tuple(units),
        best=best[0],
        num_simulated=evaluator.count,
        num_splits=comb(num_units - 1, num_stages - 1),
    )


def _no_split_fits(evaluator: _Evaluator, num_stages: int, cap: float) -> str:
    smallest = _smallest_peak_memory(evaluator, num_stages)
    hint = ""
    if smallest is not None:
        hint = f"; the smallest peak of any split is {smallest / _MIB:.1f} MiB"
    return (
        f"autobalance.max_memory_mib: no split of the {len(evaluator.units)} units into {num_stages} stages "
        f"fits in {cap / _MIB:.3g} MiB per worker{hint}; raise autobalance.max_memory_mib "
        "(--max-memory-mib), use more stages (pipeline.num_stages) or fewer micro-batches in flight "
        "(schedule=1f1b)"
    )


def _smallest_peak_memory(evaluator: _Evaluator, num_stages: int) -> float | None:
    """Min over splits of the largest stage's memory (one stage per worker only), by dynamic programming."""
    if evaluator.schedule.num_workers != num_stages:
        return None
    n = len(evaluator.units)
    inf = float("inf")
    # peak[s][j]: the smallest largest-stage memory putting units [0, j) into stages 0..s
    peak = [[inf] * (n + 1) for _ in range(num_stages)]
    for j in range(1, n + 1):
        peak[0][j] = evaluator.memory(0, 0, j)
    for s in range(1, num_stages):
        for j in range(s + 1, n + 1):
            peak[s][j] = min(max(peak[s - 1][i], evaluator.memory(s, i, j)) for i in range(s, j))
    return peak[num_stages - 1][n]


def predict_split(units: Sequence[UnitCost], balance: Sequence[int], schedule: Schedule) -> SplitPrediction:
    """What the simulator predicts for ``balance`` (unit counts per stage) under ``schedule``."""
    if sum(balance) != len(units) or len(balance) != schedule.num_stages or min(balance) < 1:
        raise ValueError(
            f"pipeline.balance: {list(balance)} does not split {len(units)} units into "
            f"{schedule.num_stages} stages of >= 1 unit"
        )
    return _Evaluator(units, schedule).predict(balance)
