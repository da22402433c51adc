"""A pipeline schedule as data: per worker, the actions it runs in order, and where each stage lives.

::

    >>> from pipetrain.schedule import Action, Schedule
    >>> s = Schedule.from_rows([[Action.parse(t) for t in "0F0 1F0 1B0 0B0".split()]])
    >>> s.placement, s.num_workers, s.num_stages, s.num_microbatches
    ((0, 0), 1, 2, 1)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pipetrain.schedule.actions import Action, ActionKind

__all__ = ["Schedule"]


@dataclass(frozen=True)
class Schedule:
    """Per worker, the ordered actions it runs; per stage, the worker that hosts it.

    Frozen and hashable (lists given to the constructor become tuples), so the dependency walk of
    :func:`pipetrain.schedule.execution_order` is computed once per schedule. Construction checks only
    the shape; :func:`pipetrain.schedule.validate_schedule` checks that the schedule can run.
    """

    actions: tuple[tuple[Action, ...], ...]
    """``actions[worker_idx]``: what that worker runs, in order."""
    placement: tuple[int, ...]
    """``placement[stage_idx]``: the worker hosting that stage."""
    num_microbatches: int
    """Micro-batches per step."""
    name: str = "custom"
    """The builder that made it (``"1f1b"``, ...) or ``"custom"``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "actions", tuple(tuple(row) for row in self.actions))
        object.__setattr__(self, "placement", tuple(self.placement))
        for stage_idx, worker_idx in enumerate(self.placement):
            if not isinstance(worker_idx, int) or isinstance(worker_idx, bool) or worker_idx < 0:
                raise ValueError(
                    f"Schedule.placement[{stage_idx}] must be a worker index >= 0, got {worker_idx!r}"
                )
        m = self.num_microbatches
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"pipeline.num_microbatches must be an int >= 1, got {m!r}")
        object.__setattr__(self, "_hash", hash((self.actions, self.placement, m, self.name)))

    def __hash__(self) -> int:
        return self._hash  # computed once: schedules key caches that are asked many times a step

    def __reduce__(self) -> tuple:
        # Rebuilt through the constructor, so the cached hash is this process's (string hashes differ).
        return (type(self), (self.actions, self.placement, self.num_microbatches, self.name))

    @classmethod
    def from_rows(
        cls, rows: Sequence[Sequence[Action]], num_microbatches: int | None = None, name: str = "custom"
    ) -> Schedule:
        """A schedule whose placement is read off ``rows`` (``rows[w]``: worker ``w``'s actions).

        Each stage is placed on the worker whose row holds its actions; ``num_microbatches`` defaults to
        one more than the largest micro-batch index. ``ValueError`` when a stage's actions are on two rows
        or a stage below the largest index has none.
        """
        home: dict[int, int] = {}
        for worker_idx, row in enumerate(rows):
            for action in row:
                if not isinstance(action, Action):
                    raise ValueError(f"worker {worker_idx}: {action!r} is not an Action")
                other = home.setdefault(action.stage_idx, worker_idx)
                if other != worker_idx:
                    raise ValueError(
                        f"stage {action.stage_idx} has actions on worker {other} and on worker {worker_idx} "
                        f"(e.g. {action}); each stage runs on exactly one worker"
                    )
        num_stages = max(home, default=-1) + 1
        missing = [s for s in range(num_stages) if s not in home]
        if missing:
            raise ValueError(
                f"stage {missing[0]} has no actions on any worker "
                f"(the schedule's stages are 0..{num_stages - 1})"
            )
        if num_microbatches is None:
            num_microbatches = 1 + max((a.mb_idx for row in rows for a in row), default=0)
        return cls(tuple(rows), tuple(home[s] for s in range(num_stages)), num_microbatches, name)

    @property
    def num_stages(self) -> int:
        """Number of pipeline stages."""
        return len(self.placement)

    @property
    def num_workers(self) -> int:
        """Number of workers (processes), one action list each."""
        return len(self.actions)

    def worker_of(self, stage_idx: int) -> int:
        """The worker hosting stage ``stage_idx``."""
        return self.placement[stage_idx]

    def stages_of(self, worker_idx: int) -> tuple[int, ...]:
        """The stages worker ``worker_idx`` hosts, in stage order."""
        return tuple(s for s, w in enumerate(self.placement) if w == worker_idx)

    @property
    def one_stage_per_worker(self) -> bool:
        """Whether worker ``k`` hosts exactly stage ``k``, for every ``k``."""
        return self.placement == tuple(range(self.num_workers))

    def forward_only(self) -> Schedule:
        """The forward actions only, in the same order on the same workers: an evaluation pass.

        Dropping actions from a schedule that runs leaves one that runs (each worker's order is kept).
        """
        rows = tuple(tuple(a for a in row if a.kind is ActionKind.FORWARD) for row in self.actions)
        return Schedule(rows, self.placement, self.num_microbatches, f"{self.name} (forward only)")

    def __getitem__(self, worker_idx: int) -> tuple[Action, ...]:
        return self.actions[worker_idx]

    def items(self) -> Iterator[tuple[int, tuple[Action, ...]]]:
        """``(worker_idx, actions)`` pairs in worker order, like a dict's."""
        return iter(enumerate(self.actions))
