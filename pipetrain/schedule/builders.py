"""Schedule builders: GPipe (fill-drain) and 1F1B (one-forward-one-backward)."""

from __future__ import annotations

from collections.abc import Callable

from pipetrain.schedule.actions import Action, ActionKind, Schedule

__all__ = ["SCHEDULE_BUILDERS", "build_schedule", "gpipe", "one_f_one_b"]

_F, _B = ActionKind.FORWARD, ActionKind.BACKWARD


def _check_sizes(num_stages: int, num_microbatches: int) -> None:
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"number of pipeline stages must be an int >= 1, got {num_stages!r}")
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"pipeline.num_microbatches must be an int >= 1, got {num_microbatches!r}")


def gpipe(num_stages: int, num_microbatches: int) -> Schedule:
    """Fill-drain schedule: every stage runs all forwards, then all backwards, in micro-batch order.

    Each stage keeps all ``num_microbatches`` activations alive at the peak.
    """
    _check_sizes(num_stages, num_microbatches)
    mbs = range(num_microbatches)
    return {
        s: [Action(s, _F, mb) for mb in mbs] + [Action(s, _B, mb) for mb in mbs] for s in range(num_stages)
    }


def one_f_one_b(num_stages: int, num_microbatches: int) -> Schedule:
    """1F1B schedule: warm-up forwards, then alternate one forward / one backward, then cool-down.

    Stage ``j`` runs ``min(S - j - 1, M)`` warm-up forwards, so it holds at most ``min(S - j, M)``
    micro-batches in flight (versus ``M`` for GPipe) for the same bubble.
    """
    _check_sizes(num_stages, num_microbatches)
    schedule: Schedule = {}
    for s in range(num_stages):
        warmup = min(num_stages - s - 1, num_microbatches)
        actions = [Action(s, _F, mb) for mb in range(warmup)]
        for i in range(num_microbatches - warmup):
            actions += [Action(s, _F, warmup + i), Action(s, _B, i)]
        actions += [Action(s, _B, mb) for mb in range(num_microbatches - warmup, num_microbatches)]
        schedule[s] = actions
    return schedule


SCHEDULE_BUILDERS: dict[str, Callable[[int, int], Schedule]] = {"gpipe": gpipe, "1f1b": one_f_one_b}
"""Registry of schedule builders by name, as chosen by the ``schedule`` config group."""


def build_schedule(name: str, num_stages: int, num_microbatches: int) -> Schedule:
    """Build the schedule registered as ``name`` for ``num_stages`` stages and ``num_microbatches``."""
    builder = SCHEDULE_BUILDERS.get(name)
    if builder is None:
        known = ", ".join(sorted(SCHEDULE_BUILDERS))
        raise ValueError(
            f"unknown schedule {name!r} (config key `schedule`); known schedules: {known}; "
            "pick one with schedule=<name>"
        )
    return builder(num_stages, num_microbatches)
