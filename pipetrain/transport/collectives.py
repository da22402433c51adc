"""c10d collectives between the replicas of a stage; the only module that creates process groups.

With ``pipeline.replicas`` > 1 every process of the run (the driver too: it is part of the world) joins
the default process group (gloo), and the copies of each worker (same position, one per replica) form a
group of their own: gloo on the CPU, NCCL on CUDA. Each group has a bounded timeout (``rpc.timeout_s``), so
a replica that is gone fails the collective instead of hanging it; the driver names the failed worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from pipetrain.gradient_sync import FlatTensors, synced_tensors
from pipetrain.rendezvous import INIT_METHOD
from pipetrain.stage import Stage

__all__ = ["join_default_group", "leave_default_group", "ProcessGroupGradientSync"]


def join_default_group(rank: int, world_size: int, timeout_s: float) -> None:
    """Join the run's default process group (rendezvous through torchrun's ``MASTER_ADDR/PORT``, apart from
    the run's earlier attempts: :mod:`pipetrain.rendezvous`)."""
    dist.init_process_group(
        backend="gloo",
        init_method=INIT_METHOD,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def leave_default_group() -> None:
    """Leave the default process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


class ProcessGroupGradientSync:
    """Averages a worker's stages with their copies on ``ranks`` (one rank per replica, this one included)."""

    def __init__(self, ranks: Sequence[int], timeout_s: float, device: torch.device) -> None:
        self.num_replicas = len(ranks)
        # Only the members create (and synchronise on) the group: the driver and the other positions'
        # workers need not take part.
        self._group = dist.new_group(
            ranks=list(ranks),
            timeout=timedelta(seconds=timeout_s),
            backend="nccl" if device.type == "cuda" else "gloo",
            use_local_synchronization=True,
        )

    def start(self, stage: Stage) -> torch.futures.Future:
        """Start the all-reduce of ``stage``'s flattened gradients; the future completes with the mean."""
        flat = FlatTensors(synced_tensors(stage))
        works = [dist.all_reduce(buffer, group=self._group, async_op=True) for buffer in flat.buffers]
        summed = torch.futures.collect_all([work.get_future() for work in works])

        def _assign(done: torch.futures.Future) -> None:
            for part in done.value():
                part.wait()  # raises the collective's error, if any
            flat.assign_mean(self.num_replicas)

        return summed.then(_assign)
