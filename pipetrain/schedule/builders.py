"""Schedule builders and their registry: GPipe, 1F1B, interleaved 1F1B, ZB-H1 and ZB-V.

Every builder is a pure function ``(num_stages, num_microbatches, stages_per_worker) -> Schedule``.
:data:`SCHEDULE_BUILDERS` also says which placement each schedule uses, so the runtime can ask how many
workers a configuration needs (:func:`workers_needed`) without building the schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipetrain.schedule.actions import Action, ActionKind
from pipetrain.schedule.interleaved import interleaved_1f1b
from pipetrain.schedule.layout import check_several_per_worker, check_sizes, num_workers_for
from pipetrain.schedule.placement import one_placement
from pipetrain.schedule.schedule import Schedule
from pipetrain.schedule.zero_bubble import check_zb_v_layout, zb_h1, zb_v

__all__ = [
    "SCHEDULE_BUILDERS",
    "ScheduleBuilder",
    "build_schedule",
    "gpipe",
    "interleaved_1f1b",
    "one_f_one_b",
    "workers_needed",
    "zb_h1",
    "zb_v",
]

_F, _B = ActionKind.FORWARD, ActionKind.BACKWARD


def _one_stage_per_worker(name: str, num_stages: int, num_microbatches: int, stages_per_worker: int) -> None:
    """Size checks of a schedule that puts one stage on each worker."""
    check_sizes(num_stages, num_microbatches, stages_per_worker)
    if stages_per_worker != 1:
        several = ", ".join(n for n, b in SCHEDULE_BUILDERS.items() if b.placement != "one")
        raise ValueError(
            f"pipeline.stages_per_worker={stages_per_worker}: schedule={name} runs one stage per worker; "
            f"set pipeline.stages_per_worker=1, or pick a schedule that hosts several stages per worker "
            f"({several})"
        )


def gpipe(num_stages: int, num_microbatches: int, stages_per_worker: int = 1) -> Schedule:
    """Fill-drain schedule: every stage runs all forwards, then all backwards, in micro-batch order.

    Each stage keeps all ``num_microbatches`` activations alive at the peak.
    """
    _one_stage_per_worker("gpipe", num_stages, num_microbatches, stages_per_worker)
    mbs = range(num_microbatches)
    rows = tuple(
        tuple(Action(s, _F, mb) for mb in mbs) + tuple(Action(s, _B, mb) for mb in mbs)
        for s in range(num_stages)
    )
    return Schedule(rows, one_placement(num_stages), num_microbatches, "gpipe")


def one_f_one_b(num_stages: int, num_microbatches: int, stages_per_worker: int = 1) -> Schedule:
    """1F1B schedule: warm-up forwards, then alternate one forward / one backward, then cool-down.

    Stage ``j`` runs ``min(S - j - 1, M)`` warm-up forwards, so it holds at most ``min(S - j, M)``
    micro-batches in flight (versus ``M`` for GPipe) for the same bubble.
    """
    _one_stage_per_worker("1f1b", num_stages, num_microbatches, stages_per_worker)
    rows = []
    for s in range(num_stages):
        warmup = min(num_stages - s - 1, num_microbatches)
        actions = [Action(s, _F, mb) for mb in range(warmup)]
        for i in range(num_microbatches - warmup):
            actions += [Action(s, _F, warmup + i), Action(s, _B, i)]
        actions += [Action(s, _B, mb) for mb in range(num_microbatches - warmup, num_microbatches)]
        rows.append(tuple(actions))
    return Schedule(tuple(rows), one_placement(num_stages), num_microbatches, "1f1b")


@dataclass(frozen=True)
class ScheduleBuilder:
    """A registered schedule: how to build it and where it places stages."""

    build: Callable[[int, int, int], Schedule]
    """``(num_stages, num_microbatches, stages_per_worker) -> Schedule``."""
    placement: str
    """A key of :data:`pipetrain.schedule.PLACEMENTS`: ``one`` (one stage per worker), ``loop`` or ``v``."""
    summary: str
    """One line for listings."""


SCHEDULE_BUILDERS: dict[str, ScheduleBuilder] = {
    "gpipe": ScheduleBuilder(gpipe, "one", "fill-drain: all forwards, then all backwards"),
    "1f1b": ScheduleBuilder(one_f_one_b, "one", "one forward, one backward (PipeDream-Flush)"),
    "interleaved_1f1b": ScheduleBuilder(
        interleaved_1f1b, "loop", "1F1B over several stages per worker (Megatron-LM interleaved)"
    ),
    "zb_h1": ScheduleBuilder(zb_h1, "one", "1F1B with backward split into I and W, W filling the bubbles"),
    "zb_v": ScheduleBuilder(zb_v, "v", "zero bubble on two stages per worker in a V (ZB-V)"),
}
"""Registry of schedules by name, as chosen by the ``schedule`` config group."""


def _builder(name: str) -> ScheduleBuilder:
    builder = SCHEDULE_BUILDERS.get(name)
    if builder is None:
        known = ", ".join(sorted(SCHEDULE_BUILDERS))
        raise ValueError(
            f"unknown schedule {name!r} (config key `schedule`); known schedules: {known}; "
            "pick one with schedule=<name>"
        )
    return builder


def workers_needed(name: str, num_stages: int, stages_per_worker: int = 1) -> int:
    """How many workers schedule ``name`` runs ``num_stages`` stages on, without building it.

    ``ValueError`` naming the config key and the fix when ``stages_per_worker`` does not suit the schedule
    or does not divide ``num_stages``. (Micro-batch counts are checked by :func:`build_schedule`.)
    """
    builder = _builder(name)
    check_sizes(num_stages, 1, stages_per_worker)
    if builder.placement == "one":
        _one_stage_per_worker(name, num_stages, 1, stages_per_worker)
    elif name == "zb_v":
        check_zb_v_layout(num_stages, stages_per_worker)
    else:
        check_several_per_worker(name, stages_per_worker)
    return num_workers_for(num_stages, stages_per_worker)


def build_schedule(name: str, num_stages: int, num_microbatches: int, stages_per_worker: int = 1) -> Schedule:
    """Build the schedule registered as ``name`` for ``num_stages`` stages, ``num_microbatches`` micro-batches
    and ``stages_per_worker`` stages on each worker."""
    return _builder(name).build(num_stages, num_microbatches, stages_per_worker)
