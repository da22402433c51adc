"""Measure what each unit of a model costs for one micro-batch: forward, backward, optimizer step, memory.

Each unit runs alone on the device a stage would use, on the activations the units before it produce
from the first micro-batch of the data: forward and backward repeat after a warm-up and the median time
counts. The last unit's forward includes the loss, as on the last stage. Activation memory is what
autograd saves for backward (as :class:`~pipetrain.stage.Stage` counts it); static memory is the unit's
parameters and buffers, their gradients and the state of the configured optimizer after real steps.
On the CPU the profile uses the threads a worker gets (``OMP_NUM_THREADS``, 1 when unset, as the
launcher sets it).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from pipetrain import boundary
from pipetrain.balance.search import UnitCost
from pipetrain.build import build_dataset, build_model, build_schedule_for
from pipetrain.config import TrainConfig
from pipetrain.data import BatchOrder
from pipetrain.losses import get_loss
from pipetrain.models import model_units
from pipetrain.targets import call_target
from pipetrain.topology import Topology

__all__ = ["profile_device", "profile_units"]


def profile_device(cfg: TrainConfig, num_stages: int) -> torch.device:
    """The device worker 0 would keep its stages on (all workers of one machine use the same kind)."""
    return Topology.of(build_schedule_for(cfg, num_stages)).device(cfg.device, 0)


def profile_units(
    cfg: TrainConfig, device: torch.device, warmup: int = 2, repeats: int = 10
) -> list[UnitCost]:
    """Per unit of ``cfg``'s model, its costs for one micro-batch of ``train.batch_size / num_microbatches``.

    The passes go round the units (``warmup + repeats`` rounds of every unit once) rather than unit after
    unit, so a burst of other work on a shared machine slows every unit a little instead of a few units a
    lot. On a GPU a unit is there only for its own passes, so models larger than one device profile too.
    Raises ``ValueError`` naming ``model`` when a unit fails to run on its own.
    """
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _worker_threads(device):
        model = build_model(cfg)
        inputs, targets = _first_microbatch(cfg)
        loss_fn = get_loss(cfg.train.loss)
        target = boundary.to_device(targets, device)

        def last_loss(output: Any) -> torch.Tensor:
            return loss_fn(output, target) / cfg.pipeline.num_microbatches

        units = model_units(model)
        timings = [_UnitTimes() for _ in units]
        for round_idx in range(warmup + repeats):
            x = inputs
            for idx, (name, unit) in enumerate(units):
                last = idx == len(units) - 1
                with _naming_unit(name, idx, len(units)):
                    unit.to(device)
                    x = _time_passes(unit, x, last_loss if last else None, idx > 0, device, timings[idx])
                    if device.type == "cuda":
                        unit.to("cpu")
                if round_idx < warmup:
                    timings[idx].clear()
        costs = []
        for idx, (name, unit) in enumerate(units):
            with _naming_unit(name, idx, len(units)):
                unit.to(device)
                optimizer_s, state_bytes = _profile_optimizer(cfg, unit, device, warmup, repeats)
            costs.append(timings[idx].cost(name, unit, optimizer_s, state_bytes))
            unit.to("cpu")
        return costs


class _UnitTimes:
    """The timed passes of one unit."""

    def __init__(self) -> None:
        self.forward_s: list[float] = []
        self.backward_s: list[float] = []
        self.saved_bytes = 0

    def clear(self) -> None:
        self.forward_s.clear()
        self.backward_s.clear()

    def cost(self, name: str, unit: nn.Module, optimizer_s: float, state_bytes: int) -> UnitCost:
        tensor_bytes = sum(t.numel() * t.element_size() for t in [*unit.parameters(), *unit.buffers()])
        return UnitCost(
            name=name,
            forward_s=statistics.median(self.forward_s),
            backward_s=statistics.median(self.backward_s),
            optimizer_s=optimizer_s,
            activation_bytes=self.saved_bytes,
            static_bytes=tensor_bytes + state_bytes,
        )


@contextmanager
def _naming_unit(name: str, idx: int, num_units: int) -> Iterator[None]:
    """A unit's failure as the one configuration error that names it."""
    try:
        yield
    except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as error:
        raise ValueError(
            f"model: unit {name!r} (unit {idx} of {num_units}) fails when run on its own on a micro-batch "
            f"({type(error).__name__}: {str(error).splitlines()[0]}); profiling for pipeline.balance=auto "
            "runs each unit alone, as a stage would: fix the unit, or give pipeline.balance (or "
            "pipeline.stages) yourself"
        ) from None


def _first_microbatch(cfg: TrainConfig) -> tuple[Any, Any]:
    inputs, targets = BatchOrder(build_dataset(cfg), cfg.train.batch_size, cfg.seed).batch(0)
    m = cfg.pipeline.num_microbatches
    return boundary.split(inputs, m)[0], boundary.split(targets, m)[0]


def _time_passes(
    unit: nn.Module,
    x: Any,
    loss: Callable[[Any], torch.Tensor] | None,
    needs_input_grad: bool,
    device: torch.device,
    times: _UnitTimes,
) -> Any:
    """One timed forward and backward of ``unit`` on ``x``; return its (detached) output."""
    x = boundary.to_device(x, device)
    leaf = boundary.detach_for_grad(x) if needs_input_grad else x
    saved = [0]
    skip = {p.untyped_storage().data_ptr() for p in unit.parameters()}
    start = _clock(device)
    with torch.autograd.graph.saved_tensors_hooks(_counting_pack(saved, skip), lambda t: t):
        output = unit(leaf)
        result = loss(output) if loss is not None else output
    middle = _clock(device)
    tensors, grads = _backward_pairs(result)
    if tensors:
        torch.autograd.backward(tensors, grads)
    end = _clock(device)
    times.forward_s.append(middle - start)
    times.backward_s.append(end - middle)
    times.saved_bytes = saved[0]
    return boundary.detach(output)


def _backward_pairs(result: Any) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """What to run backward from: the loss, or the output with gradients of ones (values do not matter)."""
    if isinstance(result, torch.Tensor) and result.dim() == 0:
        return ([result], [None]) if result.requires_grad else ([], [])
    grads = boundary.map_tensors(lambda t: torch.ones_like(t) if t.requires_grad else None, result)
    return boundary.backward_pairs(result, grads)


def _profile_optimizer(
    cfg: TrainConfig, unit: nn.Module, device: torch.device, warmup: int, repeats: int
) -> tuple[float, int]:
    """Median time of the configured optimizer's step on the unit's parameters, and gradient + state bytes."""
    parameters = [p for p in unit.parameters() if p.requires_grad]
    if not parameters:
        return 0.0, 0
    optimizer = call_target(cfg.optim, "optim")(parameters)
    times = []
    for repeat in range(warmup + repeats):
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        start = _clock(device)
        optimizer.step()
        if repeat >= warmup:
            times.append(_clock(device) - start)
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    grads = [p.grad for p in parameters]
    return statistics.median(times), sum(t.numel() * t.element_size() for t in [*state, *grads])


def _counting_pack(total: list[int], skip_storages: set[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in skip_storages:
            total[0] += tensor.numel() * tensor.element_size()
        return tensor

    return pack


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@contextmanager
def _worker_threads(device: torch.device) -> Iterator[None]:
    """On the CPU, compute with as many threads as a worker process of the run gets."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
