"""torch.distributed.pipelining reference run for ``scripts/bench.py``: pipetrain's stages on gloo.

Launched by ``scripts/bench.py`` once per configuration, one process per stage::

    python -m torch.distributed.run --nnodes=1 --nproc-per-node=2 --master-addr=127.0.0.1 \\
        --master-port=29517 scripts/pipelining_baseline.py --schedule 1f1b --microbatches 4 \\
        --steps 12 --warmup 3 --out /tmp/pipelining.json -- \\
        model.hidden=1536 train.batch_size=384 pipeline.stages=null pipeline.balance=[3,3] device=cpu

Everything after ``--`` is a pipetrain Hydra override list, composed exactly as ``python -m pipetrain.train``
composes it, so the model, its initialisation (seed), the data, the batch order, the loss and the optimizer
are pipetrain's. Rank ``k`` builds the full model with :func:`pipetrain.build.build_model`, keeps stage ``k``
of :func:`pipetrain.partition.partition` (the same units per stage as pipetrain), wraps it in
``torch.distributed.pipelining.PipelineStage`` and runs ``ScheduleGPipe`` or ``Schedule1F1B`` with the loss
on the last stage (``scale_grads=True``: gradients are the batch mean, as pipetrain's ``1/m`` loss scale
gives). Every rank then steps its own optimizer.

Per step and rank it measures, with ``time.perf_counter``:

* ``window``: ``schedule.step(...)`` (all forwards, backwards and point-to-point transfers), after a
  ``dist.barrier()`` that lines the ranks up;
* ``step``: the window plus ``optimizer.step()`` and ``zero_grad()``;
* the duration of every ``forward_one_chunk`` (plus the loss on the last stage) and ``backward_one_chunk``
  of the stage: the stage's compute, as pipetrain's COMPUTE spans measure it;
* the activation bytes autograd saves for backward during each forward (a saved-tensor hook, parameters
  not counted), summed over the micro-batches in flight: the peak, as pipetrain's stages count it.

Rank 0 gathers every rank's figures and writes one JSON document to ``--out``::

    {"method": "pipelining", "schedule": ..., "num_stages": p, "num_microbatches": m, "warmup": W,
     "steps": [{"step": 1, "step_time_s": .., "window_s": .., "loss": .., "busy_s": [per stage],
                "forward_s": [mean per stage], "backward_s": [mean per stage],
                "peak_activation_mib": [per stage]}, ...]}

``step_time_s`` and ``window_s`` are the maxima over the ranks (the step is done when the slowest rank is).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from pipetrain.build import build_dataset, build_model, build_plan
from pipetrain.compose import compose_config, to_train_config
from pipetrain.data import BatchOrder
from pipetrain.losses import get_loss
from pipetrain.partition import partition
from pipetrain.targets import call_target

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class StageProbe:
    """Times the forward / backward chunks of one ``PipelineStage`` and counts its saved activations.

    The probe replaces the stage's ``forward_one_chunk`` and ``backward_one_chunk`` with timed versions
    (the schedules call them through the instance) and wraps the loss function given to the schedule, whose
    time is added to the forward of the micro-batch it belongs to.
    """

    def __init__(self, stage: PipelineStage, module: torch.nn.Module) -> None:
        self._parameter_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self._forward = stage.forward_one_chunk
        self._backward = stage.backward_one_chunk
        stage.forward_one_chunk = self._timed_forward
        stage.backward_one_chunk = self._timed_backward
        self.reset()

    def reset(self) -> None:
        """Forget the figures of the previous step."""
        self.forward_s: list[float] = []
        self.backward_s: list[float] = []
        self.loss_s = 0.0
        self._in_flight: dict[int, int] = {}
        self.peak_bytes = 0

    def wrap_loss(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``loss_fn`` with its duration added to this stage's forward time."""

        def timed_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
            start = time.perf_counter()
            loss = loss_fn(*args, **kwargs)
            self.loss_s += time.perf_counter() - start
            return loss

        return timed_loss

    def _timed_forward(self, fwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        saved = [0]

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.untyped_storage().data_ptr() not in self._parameter_storages:
                saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = self._forward(fwd_chunk_id, *args, **kwargs)
        self.forward_s.append(time.perf_counter() - start)
        self._in_flight[fwd_chunk_id] = saved[0]
        self.peak_bytes = max(self.peak_bytes, sum(self._in_flight.values()))
        return output

    def _timed_backward(self, bwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = self._backward(bwd_chunk_id, *args, **kwargs)
        self.backward_s.append(time.perf_counter() - start)
        self._in_flight.pop(bwd_chunk_id, None)
        return result

    def figures(self) -> dict[str, float]:
        """This step's busy time, mean forward (with loss) and backward time, and peak activation MiB."""
        num_forward = max(len(self.forward_s), 1)
        num_backward = max(len(self.backward_s), 1)
        return {
            "busy_s": sum(self.forward_s) + self.loss_s + sum(self.backward_s),
            "forward_s": (sum(self.forward_s) + self.loss_s) / num_forward,
            "backward_s": sum(self.backward_s) / num_backward,
            "peak_activation_mib": self.peak_bytes / 2**20,
        }


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options; pipetrain overrides follow ``--``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), required=True)
    parser.add_argument("--microbatches", type=int, required=True, help="micro-batches per step (m)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps, warm-up included")
    parser.add_argument("--warmup", type=int, default=3, help="leading steps the benchmark ignores")
    parser.add_argument("--out", type=Path, required=True, help="JSON file written by rank 0")
    parser.add_argument("overrides", nargs="*", help="pipetrain Hydra overrides (after --)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train ``args.steps`` steps on this rank's stage; rank 0 returns the gathered figures."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    cfg = to_train_config(compose_config([*args.overrides, f"pipeline.num_microbatches={args.microbatches}"]))
    model = build_model(cfg)
    plan = build_plan(cfg, model)
    if plan.num_stages != world_size:
        raise SystemExit(f"the split has {plan.num_stages} stages but {world_size} processes were started")
    module = partition(model, plan)[rank]
    del model
    stage = PipelineStage(module, rank, world_size, torch.device("cpu"))
    probe = StageProbe(stage, module)
    loss_fn = probe.wrap_loss(get_loss(cfg.train.loss))
    schedule = SCHEDULES[args.schedule](stage, args.microbatches, loss_fn=loss_fn)
    optimizer = call_target(cfg.optim, "optim")(module.parameters())
    batches = BatchOrder(build_dataset(cfg), cfg.train.batch_size, cfg.seed)
    is_first, is_last = rank == 0, rank == world_size - 1

    records = []
    for step in range(args.steps):
        inputs, targets = batches.batch(step)
        losses: list[torch.Tensor] = []
        probe.reset()
        dist.barrier()
        start = time.perf_counter()
        step_args = (inputs,) if is_first else ()
        schedule.step(*step_args, target=targets if is_last else None, losses=losses, return_outputs=False)
        window_end = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        loss = float(sum(loss.item() for loss in losses) / len(losses)) if losses else None
        times = {"window_s": window_end - start, "step_s": end - start}
        records.append({**times, "loss": loss, **probe.figures()})

    gathered: list[list[dict[str, Any]]] | None = [[] for _ in range(world_size)] if rank == 0 else None
    dist.gather_object(records, gathered, dst=0)
    if rank != 0:
        return None
    return summarize(args, gathered)


def summarize(args: argparse.Namespace, per_rank: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Combine the ranks' per-step records: maxima for the times, one entry per stage for the rest."""
    steps = []
    for step, by_rank in enumerate(zip(*per_rank, strict=True)):
        steps.append(
            {
                "step": step + 1,
                "step_time_s": max(record["step_s"] for record in by_rank),
                "window_s": max(record["window_s"] for record in by_rank),
                "loss": by_rank[-1]["loss"],
                "busy_s": [record["busy_s"] for record in by_rank],
                "forward_s": [record["forward_s"] for record in by_rank],
                "backward_s": [record["backward_s"] for record in by_rank],
                "peak_activation_mib": [record["peak_activation_mib"] for record in by_rank],
            }
        )
    return {
        "method": "pipelining",
        "schedule": args.schedule,
        "num_stages": len(per_rank),
        "num_microbatches": args.microbatches,
        "warmup": args.warmup,
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> int:
    """Join the gloo group (torchrun's environment), run, write the JSON on rank 0."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    try:
        result = run(args)
        if result is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
