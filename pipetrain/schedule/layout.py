"""Size checks shared by the schedule builders: stage, micro-batch and worker counts.

Errors name the config key to change: the number of stages comes from ``pipeline.balance`` /
``pipeline.stages``, the stages per worker from ``pipeline.stages_per_worker``.
"""

from __future__ import annotations

__all__ = ["check_several_per_worker", "check_sizes", "num_workers_for"]


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_sizes(num_stages: int, num_microbatches: int, stages_per_worker: int = 1) -> None:
    """``ValueError`` unless all three counts are ints >= 1."""
    if not _is_count(num_stages):
        raise ValueError(
            f"number of pipeline stages must be an int >= 1, got {num_stages!r} "
            "(set by pipeline.balance / pipeline.stages)"
        )
    if not _is_count(num_microbatches):
        raise ValueError(f"pipeline.num_microbatches must be an int >= 1, got {num_microbatches!r}")
    if not _is_count(stages_per_worker):
        raise ValueError(f"pipeline.stages_per_worker must be an int >= 1, got {stages_per_worker!r}")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def num_workers_for(num_stages: int, stages_per_worker: int) -> int:
    """``num_stages / stages_per_worker``; ``ValueError`` naming both keys when it is not whole."""
    check_sizes(num_stages, 1, stages_per_worker)
    if num_stages % stages_per_worker:
        raise ValueError(
            f"pipeline.stages_per_worker={stages_per_worker} does not divide the {num_stages} stages "
            f"(pipeline.balance / pipeline.stages); set pipeline.stages_per_worker to one of "
            f"{_divisors(num_stages)}, or split the model into a multiple of {stages_per_worker} stages"
        )
    return num_stages // stages_per_worker


def check_several_per_worker(name: str, stages_per_worker: int) -> None:
    """``ValueError`` unless ``stages_per_worker >= 2``, for schedule ``name`` that interleaves stages."""
    if stages_per_worker < 2:
        raise ValueError(
            f"schedule={name} needs pipeline.stages_per_worker >= 2 (it hosts several stages on each "
            f"worker); set pipeline.stages_per_worker=2, or use schedule=1f1b for one stage per worker"
        )
