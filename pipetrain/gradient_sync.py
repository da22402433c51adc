"""Data-parallel replicas of a stage average their gradients before stepping.

With ``pipeline.replicas=R`` every stage exists R times, one copy per replica, each fed ``1/R`` of the
batch. Once a copy's last backward of the step is done, its runner starts a :class:`GradientSync`: the
gradients (and floating-point buffers, e.g. BatchNorm running statistics, so the copies stay identical)
are averaged with the other copies' in place, while the rest of the pipeline drains. The copy steps its
optimizer once the average is there, so every replica takes the same step, the one the unsplit model
takes on the whole batch.

Two implementations: :class:`~pipetrain.transport.collectives.ProcessGroupGradientSync` (one c10d process
group per worker position, across processes) and :class:`InProcessGradientSync` (replicas as threads of
one process: tests and debugging). Both flatten the tensors into one buffer per dtype
(:class:`FlatTensors`), so a step costs one collective per stage, not one per parameter.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

import torch

from pipetrain.stage import Stage

__all__ = ["GradientSync", "FlatTensors", "synced_tensors", "InProcessGradientSync"]


class GradientSync(Protocol):
    """Averages a stage's gradients with the same stage of every other replica."""

    num_replicas: int

    def start(self, stage: Stage) -> torch.futures.Future:
        """Begin averaging ``stage``'s gradients; the future completes once they are averaged in place
        (its value ``None``; an error when a replica could not take part)."""
        ...


def synced_tensors(stage: Stage) -> list[torch.Tensor]:
    """What the replicas of ``stage`` average: every parameter gradient, then every floating-point buffer.

    In module order, which is the same in every replica. Parameters without a gradient (unused in this
    step) are left out; they are unused in every replica alike.
    """
    grads = [p.grad for p in stage.module.parameters() if p.grad is not None]
    buffers = [b for b in stage.module.buffers() if b.is_floating_point()]
    return grads + buffers


class FlatTensors:
    """Tensors packed into one contiguous buffer per dtype, and the way back."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.tensors = list(tensors)
        self._groups: dict[torch.dtype, list[int]] = {}
        for index, tensor in enumerate(self.tensors):
            self._groups.setdefault(tensor.dtype, []).append(index)
        self.buffers = [
            torch.cat([self.tensors[i].detach().reshape(-1) for i in indices])
            for indices in self._groups.values()
        ]

    def assign_mean(self, num_replicas: int) -> None:
        """Divide the (summed) buffers by ``num_replicas`` and copy them back into the tensors."""
        for buffer, indices in zip(self.buffers, self._groups.values(), strict=True):
            buffer.div_(num_replicas)
            offset = 0
            for i in indices:
                tensor = self.tensors[i]
                tensor.detach().copy_(buffer[offset : offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()


class InProcessGradientSync:
    """Averages stages of replicas that run in this process (one object shared by all of them).

    Each step, the copy of a stage that arrives last sums the copies' tensors in replica order and hands
    every copy the mean; the others wait for it.
    """

    def __init__(self, num_replicas: int) -> None:
        self.num_replicas = num_replicas
        self._lock = threading.Lock()
        self._waiting: dict[int, list[tuple[Stage, torch.futures.Future]]] = {}

    def start(self, stage: Stage) -> torch.futures.Future:
        """Join this step's average of ``stage``'s copies."""
        future: torch.futures.Future = torch.futures.Future()
        with self._lock:
            arrived = self._waiting.setdefault(stage.stage_idx, [])
            arrived.append((stage, future))
            if len(arrived) < self.num_replicas:
                return future
            del self._waiting[stage.stage_idx]
        try:
            copies = [FlatTensors(synced_tensors(copy)) for copy, _ in arrived]
            for flat in copies[1:]:
                for total, buffer in zip(copies[0].buffers, flat.buffers, strict=True):
                    total.add_(buffer)
            for flat in copies[1:]:
                for own, total in zip(flat.buffers, copies[0].buffers, strict=True):
                    own.copy_(total)
            for flat in copies:
                flat.assign_mean(self.num_replicas)
        except Exception as error:
            for _, waiting in arrived:
                waiting.set_exception(error)
            return future
        for _, waiting in arrived:
            waiting.set_result(None)
        return future
