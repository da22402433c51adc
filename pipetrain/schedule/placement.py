"""Stage -> worker placements: which worker hosts each stage.

A placement is a tuple, ``placement[stage_idx] = worker_idx``. Schedules declare theirs; the runtime asks
the schedule, never re-derives the mapping. With ``W`` workers and ``S`` stages::

    one   S == W; stage s on worker s                  (0, 1, 2, 3)        gpipe, 1f1b
    loop  stage s on worker s mod W                    (0, 1, 0, 1)        interleaved_1f1b
    v     stages s and 2W-1-s on worker s (a zigzag    (0, 1, 1, 0)        zero-bubble V schedules
          over more chunks: down, up, down, ...)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["PLACEMENTS", "loop_placement", "make_placement", "one_placement", "placement_kind", "v_placement"]


def _check(num_stages: int, num_workers: int) -> int:
    """Stages per worker; ``ValueError`` when the workers cannot share the stages evenly."""
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"number of pipeline stages must be an int >= 1, got {num_stages!r}")
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"number of workers must be an int >= 1, got {num_workers!r}")
    if num_stages % num_workers:
        raise ValueError(
            f"{num_stages} stages cannot be shared evenly by {num_workers} workers "
            "(pipeline.stages_per_worker must divide the number of stages)"
        )
    return num_stages // num_workers


def one_placement(num_stages: int, num_workers: int | None = None) -> tuple[int, ...]:
    """Stage ``s`` on worker ``s``: one stage per worker."""
    num_workers = num_stages if num_workers is None else num_workers
    if _check(num_stages, num_workers) != 1:
        raise ValueError(
            f"placement 'one' puts one stage on each worker: {num_stages} stages need as many workers"
        )
    return tuple(range(num_stages))


def loop_placement(num_stages: int, num_workers: int) -> tuple[int, ...]:
    """Stage ``s`` on worker ``s mod W``: each worker hosts every ``W``-th stage (interleaved)."""
    _check(num_stages, num_workers)
    return tuple(s % num_workers for s in range(num_stages))


def v_placement(num_stages: int, num_workers: int) -> tuple[int, ...]:
    """Stages ``s`` and ``2W-1-s`` on worker ``s``: the model goes down the workers, then back up.

    With more than two stages per worker the zigzag continues (down, up, down, ...).
    """
    _check(num_stages, num_workers)
    placement = []
    for s in range(num_stages):
        chunk, offset = divmod(s, num_workers)
        placement.append(offset if chunk % 2 == 0 else num_workers - 1 - offset)
    return tuple(placement)


PLACEMENTS: dict[str, Callable[[int, int], tuple[int, ...]]] = {
    "one": one_placement,
    "loop": loop_placement,
    "v": v_placement,
}
"""Named placements, each ``(num_stages, num_workers) -> placement``."""


def make_placement(kind: str, num_stages: int, num_workers: int) -> tuple[int, ...]:
    """The placement named ``kind`` (a key of :data:`PLACEMENTS`)."""
    if kind not in PLACEMENTS:
        raise ValueError(f"unknown placement {kind!r}; known placements: {', '.join(PLACEMENTS)}")
    return PLACEMENTS[kind](num_stages, num_workers)


def placement_kind(placement: Sequence[int]) -> str | None:
    """The name of the named placement equal to ``placement`` (``'one'`` first), or ``None``."""
    placement = tuple(placement)
    if not placement:
        return None
    num_workers = max(placement) + 1
    for kind, make in PLACEMENTS.items():
        try:
            if make(len(placement), num_workers) == placement:
                return kind
        except ValueError:
            continue
    return None
