"""Who runs what: the one mapping from ranks to workers, the stages each worker hosts, and their devices.

Rank 0 is the driver; rank ``w + 1`` is worker ``w``. A worker is a process; it hosts the stages the
schedule places on it (one for gpipe and 1f1b; ``pipeline.stages_per_worker`` for interleaved 1F1B, in a
loop: stage ``s`` on worker ``s mod W``). Every other module asks this object instead of doing rank
arithmetic of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipetrain.partition import StagePlan
from pipetrain.schedule import Schedule

__all__ = ["DRIVER_RANK", "Topology", "describe_plan"]

DRIVER_RANK = 0


@dataclass(frozen=True)
class Topology:
    """The placement of stages on workers, and of workers on ranks."""

    placement: tuple[int, ...]
    """``placement[stage_idx]``: the worker hosting that stage."""

    @classmethod
    def of(cls, schedule: Schedule) -> Topology:
        """The topology a schedule declares."""
        return cls(tuple(schedule.placement))

    @property
    def num_stages(self) -> int:
        """Number of stages."""
        return len(self.placement)

    @property
    def num_workers(self) -> int:
        """Number of worker processes."""
        return max(self.placement) + 1

    @property
    def world_size(self) -> int:
        """Processes of a run: the driver and one per worker."""
        return self.num_workers + 1

    def rank_of(self, worker_idx: int) -> int:
        """The rank of worker ``worker_idx``."""
        self._check_worker(worker_idx)
        return worker_idx + 1

    def worker_at(self, rank: int) -> int:
        """The worker that rank ``rank`` runs (``rank > 0``)."""
        if not 0 < rank < self.world_size:
            raise ValueError(f"rank {rank} runs no worker (workers are ranks 1..{self.world_size - 1})")
        return rank - 1

    def worker_of(self, stage_idx: int) -> int:
        """The worker hosting stage ``stage_idx``."""
        return self.placement[stage_idx]

    def stages_of(self, worker_idx: int) -> tuple[int, ...]:
        """The stages worker ``worker_idx`` hosts, in stage order."""
        self._check_worker(worker_idx)
        return tuple(stage for stage, worker in enumerate(self.placement) if worker == worker_idx)

    def label(self, worker_idx: int) -> str:
        """How errors name a worker: ``"worker 1 (rank 2)"``."""
        return f"worker {worker_idx} (rank {self.rank_of(worker_idx)})"

    def device(self, device: str, worker_idx: int, local_rank: int | None = None) -> torch.device:
        """Where worker ``worker_idx`` keeps its stages for the config's ``device`` setting.

        Its own GPU when CUDA is used (``local_rank - 1`` on its node, wrapping around the node's GPUs),
        else the CPU.
        """
        if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        gpu_idx = worker_idx if local_rank is None else local_rank - 1
        return torch.device("cuda", gpu_idx % torch.cuda.device_count())

    def _check_worker(self, worker_idx: int) -> None:
        if not 0 <= worker_idx < self.num_workers:
            raise ValueError(f"worker {worker_idx} does not exist (this run has {self.num_workers})")


def describe_plan(plan: StagePlan, topology: Topology) -> str:
    """One line: the stages with their units, and on which workers they run."""
    stages = [list(names) for names in plan.stages]
    if topology.num_workers == topology.num_stages:
        return f"{plan.num_stages} stages {stages}"
    placement = ", ".join(
        f"worker {worker}: stages {list(topology.stages_of(worker))}"
        for worker in range(topology.num_workers)
    )
    return f"{plan.num_stages} stages {stages} on {topology.num_workers} workers ({placement})"
