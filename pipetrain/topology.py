"""Who runs what: the one mapping from ranks to replicas, workers, the stages each worker hosts, and devices.

Rank 0 is the driver. A worker is a process; it hosts the stages the schedule places on it (one for gpipe
and 1f1b; ``pipeline.stages_per_worker`` for interleaved 1F1B, in a loop: stage ``s`` on worker
``s mod W``). With ``pipeline.replicas=R`` there are R copies of the pipeline (data parallel): worker ``w``
of replica ``r`` is rank ``1 + r * W + w``, so with one replica worker ``w`` is rank ``w + 1``. Every other
module asks this object instead of doing rank arithmetic of its own.
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
    """``placement[stage_idx]``: the worker hosting that stage (the same in every replica)."""
    num_replicas: int = 1
    """Copies of the pipeline (``pipeline.replicas``)."""

    @classmethod
    def of(cls, schedule: Schedule, num_replicas: int = 1) -> Topology:
        """The topology a schedule declares, repeated ``num_replicas`` times."""
        return cls(tuple(schedule.placement), num_replicas)

    @property
    def num_stages(self) -> int:
        """Number of stages."""
        return len(self.placement)

    @property
    def num_workers(self) -> int:
        """Number of worker processes of one replica."""
        return max(self.placement) + 1

    @property
    def world_size(self) -> int:
        """Processes of a run: the driver and one per worker of every replica."""
        return self.num_replicas * self.num_workers + 1

    def rank_of(self, worker_idx: int, replica_idx: int = 0) -> int:
        """The rank of worker ``worker_idx`` of replica ``replica_idx``."""
        self._check_worker(worker_idx)
        if not 0 <= replica_idx < self.num_replicas:
            raise ValueError(f"replica {replica_idx} does not exist (this run has {self.num_replicas})")
        return 1 + replica_idx * self.num_workers + worker_idx

    def worker_at(self, rank: int) -> int:
        """The worker (within its replica) that rank ``rank`` runs (``rank > 0``)."""
        return (self._check_rank(rank) - 1) % self.num_workers

    def replica_at(self, rank: int) -> int:
        """The replica that rank ``rank`` belongs to (``rank > 0``)."""
        return (self._check_rank(rank) - 1) // self.num_workers

    def replica_ranks(self, worker_idx: int) -> tuple[int, ...]:
        """The ranks running worker ``worker_idx`` in each replica: they hold the same stages and
        average their gradients."""
        return tuple(self.rank_of(worker_idx, replica) for replica in range(self.num_replicas))

    def worker_of(self, stage_idx: int) -> int:
        """The worker hosting stage ``stage_idx``."""
        return self.placement[stage_idx]

    def stages_of(self, worker_idx: int) -> tuple[int, ...]:
        """The stages worker ``worker_idx`` hosts, in stage order."""
        self._check_worker(worker_idx)
        return tuple(stage for stage, worker in enumerate(self.placement) if worker == worker_idx)

    def label(self, worker_idx: int, replica_idx: int = 0) -> str:
        """How errors name a worker: ``"worker 1 (rank 2)"``, with replicas
        ``"replica 1 worker 0 (rank 3)"``."""
        rank = self.rank_of(worker_idx, replica_idx)
        if self.num_replicas == 1:
            return f"worker {worker_idx} (rank {rank})"
        return f"replica {replica_idx} worker {worker_idx} (rank {rank})"

    def device(
        self, device: str, worker_idx: int, local_rank: int | None = None, rank: int | None = None
    ) -> torch.device:
        """Where worker ``worker_idx`` keeps its stages for the config's ``device`` setting.

        Its own GPU when CUDA is used, else the CPU. Under torchrun the GPU is the process's place among
        the node's workers: ``local_rank - 1`` on the driver's node (the driver takes no GPU), ``local_rank``
        on the others, wrapping around the node's GPUs.
        """
        if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if local_rank is None:
            gpu_idx = worker_idx
        else:
            drivers_node = rank is None or rank - local_rank == DRIVER_RANK
            gpu_idx = local_rank - 1 if drivers_node else local_rank
        return torch.device("cuda", gpu_idx % torch.cuda.device_count())

    def _check_worker(self, worker_idx: int) -> None:
        if not 0 <= worker_idx < self.num_workers:
            raise ValueError(f"worker {worker_idx} does not exist (this run has {self.num_workers})")

    def _check_rank(self, rank: int) -> int:
        if not 0 < rank < self.world_size:
            raise ValueError(f"rank {rank} runs no worker (workers are ranks 1..{self.world_size - 1})")
        return rank


def describe_plan(plan: StagePlan, topology: Topology) -> str:
    """One line: the stages with their units, and on which workers they run."""
    stages = [list(names) for names in plan.stages]
    replicas = f" x {topology.num_replicas} replicas" if topology.num_replicas > 1 else ""
    if topology.num_workers == topology.num_stages:
        return f"{plan.num_stages} stages {stages}{replicas}"
    placement = ", ".join(
        f"worker {worker}: stages {list(topology.stages_of(worker))}"
        for worker in range(topology.num_workers)
    )
    return f"{plan.num_stages} stages {stages} on {topology.num_workers} workers ({placement}){replicas}"
