"""torch.distributed.pipelining reference run for ``scripts/bench.py``: pipetrain's stages on gloo.

Launched by ``scripts/bench.py`` once per configuration, one process per worker::

    python -m torch.distributed.run --nnodes=1 --nproc-per-node=2 --master-addr=127.0.0.1 \\
        --master-port=29517 scripts/pipelining_baseline.py --steps 12 --run-dir /tmp/pp -- \\
        model.hidden=1536 train.batch_size=384 device=cpu pipeline.stages=null \\
        pipeline.balance=[2,1,1,2] schedule=interleaved_1f1b pipeline.stages_per_worker=2 \\
        pipeline.num_microbatches=8

Everything after ``--`` is a pipetrain Hydra override list, composed exactly as ``python -m pipetrain.train``
composes it, so the model, its initialisation (seed), the data, the batch order, the loss, the optimizer,
the split, the schedule and the micro-batch count are pipetrain's. pipetrain's schedule of that name places
the stages on the ranks (:class:`pipetrain.topology.Topology`: rank ``r`` hosts what worker ``r`` would).
Each rank builds the full model with :func:`pipetrain.build.build_model`, keeps its stages of
:func:`pipetrain.partition.partition`, wraps each in ``torch.distributed.pipelining.PipelineStage`` and runs
``ScheduleGPipe``, ``Schedule1F1B`` or ``ScheduleInterleaved1F1B`` with the loss on the last stage
(``scale_grads=True``: gradients are the batch mean, as pipetrain's ``1/m`` loss scale gives). Every stage
then steps its own optimizer, as in pipetrain.

Per step and rank it measures, with ``time.perf_counter``:

* ``window``: ``schedule.step(...)`` (all forwards, backwards and point-to-point transfers), after a
  ``dist.barrier()`` that lines the ranks up;
* ``step``: the window plus every stage's ``optimizer.step()`` and ``zero_grad()``;
* per stage, every ``forward_one_chunk`` (the loss included, on the last stage) and ``backward_one_chunk``,
  as a COMPUTE span named by its action (``2F5``), as pipetrain's stages record them;
* per stage, the activation bytes autograd saves for backward during each forward (a saved-tensor hook,
  parameters not counted), summed over the micro-batches in flight: the peak, as pipetrain's stages count it.

Rank 0 gathers every rank's figures and logs each step with pipetrain's own metrics code
(:func:`pipetrain.metrics.step_metrics`, :class:`pipetrain.metrics.MetricsLogger`), with the slowest rank's
step time and window: ``<run-dir>/metrics.jsonl`` holds the same figures, under the same names, as a
pipetrain run's, and ``<run-dir>/traces/`` the last step's compute spans. The simulated figures use
pipetrain's schedule, whose per-rank order is PyTorch's for these three schedules
(``tests/test_schedule.py`` compares the interleaved one with ``ScheduleInterleaved1F1B``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

from pipetrain.build import build_dataset, build_model, build_plan, build_schedule_for
from pipetrain.compose import compose_config, to_train_config
from pipetrain.config import TrainConfig
from pipetrain.data import BatchOrder
from pipetrain.losses import get_loss
from pipetrain.metrics import MetricsLogger, step_metrics
from pipetrain.partition import partition
from pipetrain.schedule import Action, ActionKind, Schedule
from pipetrain.targets import call_target
from pipetrain.timings import Span, SpanCategory, StageReport
from pipetrain.topology import Topology

SINGLE_STAGE_SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
MULTI_STAGE_SCHEDULES = {
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    # ZB-H1 is PyTorch's interleaved zero-bubble schedule with one stage per rank; ZB-V needs the V placement
    # (stages r and 2W-1-r on rank r), which pipetrain's zb_v schedule declares and the topology follows.
    "zb_h1": ScheduleInterleavedZeroBubble,
    "zb_v": ScheduleZBVZeroBubble,
}


class StageProbe:
    """Records the forward / backward chunks of one ``PipelineStage`` as spans and counts its activations.

    The probe replaces the stage's ``forward_one_chunk`` and ``backward_one_chunk`` with recorded versions
    (the schedules call them through the instance); :meth:`wrap_loss` extends each forward span of the last
    stage to the end of the loss computed on its output.
    """

    def __init__(self, stage: PipelineStage, module: torch.nn.Module) -> None:
        self.stage_idx = stage.stage_index
        self._parameter_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self._forward = stage.forward_one_chunk
        self._backward = stage.backward_one_chunk
        self._backward_weight = stage.backward_weight_one_chunk
        stage.forward_one_chunk = self._recorded_forward
        stage.backward_one_chunk = self._recorded_backward
        stage.backward_weight_one_chunk = self._recorded_backward_weight
        self.reset()

    def reset(self) -> None:
        """Forget the figures of the previous step."""
        self.spans: list[Span] = []
        self._in_flight: dict[int, int] = {}
        self.peak_bytes = 0

    def report(self) -> StageReport:
        """This step's spans and peak activation bytes, as a pipetrain stage reports them."""
        return StageReport(self.stage_idx, tuple(self.spans), peak_activation_bytes=self.peak_bytes)

    def wrap_loss(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``loss_fn``, with the latest forward span extended to the end of the loss.

        The schedules compute the loss right after the last stage's forward of the same micro-batch, and
        once outside any forward, on their first step, to set up the backward (no span is extended then).
        """

        def recorded_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
            loss = loss_fn(*args, **kwargs)
            if self.spans and Action.parse(self.spans[-1].name).kind is ActionKind.FORWARD:
                self.spans.append(dataclasses.replace(self.spans.pop(), end=time.perf_counter()))
            return loss

        return recorded_loss

    def _record(self, kind: ActionKind, mb_idx: int, start: float) -> None:
        name = str(Action(self.stage_idx, kind, mb_idx))
        self.spans.append(Span(self.stage_idx, SpanCategory.COMPUTE, name, start, time.perf_counter()))

    def _recorded_forward(self, fwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        saved = [0]

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.untyped_storage().data_ptr() not in self._parameter_storages:
                saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = self._forward(fwd_chunk_id, *args, **kwargs)
        self._record(ActionKind.FORWARD, fwd_chunk_id, start)
        self._in_flight[fwd_chunk_id] = saved[0]
        self.peak_bytes = max(self.peak_bytes, sum(self._in_flight.values()))
        return output

    def _recorded_backward(self, bwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = self._backward(bwd_chunk_id, *args, **kwargs)
        full = kwargs.get("full_backward", True)
        self._record(ActionKind.BACKWARD if full else ActionKind.INPUT_GRAD, bwd_chunk_id, start)
        if full:  # a split backward holds its activations until its weight gradient
            self._in_flight.pop(bwd_chunk_id, None)
        return result

    def _recorded_backward_weight(self, bwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = self._backward_weight(bwd_chunk_id, *args, **kwargs)
        self._record(ActionKind.WEIGHT_GRAD, bwd_chunk_id, start)
        self._in_flight.pop(bwd_chunk_id, None)
        return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options; pipetrain overrides follow ``--``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps")
    parser.add_argument("--run-dir", type=Path, required=True, help="where rank 0 writes metrics.jsonl")
    parser.add_argument("overrides", nargs="*", help="pipetrain Hydra overrides (after --)")
    return parser.parse_args(argv)


def torch_schedule(schedule: Schedule, stages: list[PipelineStage], loss_fn: Callable[..., Any]) -> Any:
    """PyTorch's schedule of the same name as pipetrain's ``schedule``, over this rank's stages."""
    if schedule.name in MULTI_STAGE_SCHEDULES:
        return MULTI_STAGE_SCHEDULES[schedule.name](stages, schedule.num_microbatches, loss_fn=loss_fn)
    if schedule.name not in SINGLE_STAGE_SCHEDULES:
        known = ", ".join([*SINGLE_STAGE_SCHEDULES, *MULTI_STAGE_SCHEDULES])
        raise SystemExit(f"schedule={schedule.name}: the baseline runs {known}")
    return SINGLE_STAGE_SCHEDULES[schedule.name](stages[0], schedule.num_microbatches, loss_fn=loss_fn)


def run(cfg: TrainConfig, num_steps: int) -> tuple[Schedule, list[dict[str, Any]]]:
    """Train ``num_steps`` steps on this rank's stages: pipetrain's schedule, and per step the rank's times,
    loss and stage reports."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = build_model(cfg)
    plan = build_plan(cfg, model)
    schedule = build_schedule_for(cfg, plan.num_stages)
    topology = Topology.of(schedule)
    if topology.num_workers != world_size:
        raise SystemExit(f"the schedule runs on {topology.num_workers} workers but {world_size} were started")
    modules = partition(model, plan)
    del model
    own = topology.stages_of(rank)
    stages = [PipelineStage(modules[s], s, plan.num_stages, torch.device("cpu")) for s in own]
    probes = [StageProbe(stage, modules[s]) for stage, s in zip(stages, own, strict=True)]
    last_stage = plan.num_stages - 1
    loss_fn = get_loss(cfg.train.loss)
    if last_stage in own:
        loss_fn = probes[own.index(last_stage)].wrap_loss(loss_fn)
    pipeline = torch_schedule(schedule, stages, loss_fn)
    optimizers = [call_target(cfg.optim, "optim")(modules[s].parameters()) for s in own]
    batches = BatchOrder(build_dataset(cfg), cfg.train.batch_size, cfg.seed)

    records = []
    cpu_mark = time.process_time()
    for step in range(num_steps):
        inputs, targets = batches.batch(step)
        losses: list[torch.Tensor] = []
        for probe in probes:
            probe.reset()
        dist.barrier()
        start = time.perf_counter()
        step_args = (inputs,) if 0 in own else ()
        target = targets if last_stage in own else None
        pipeline.step(*step_args, target=target, losses=losses, return_outputs=False)
        window_end = time.perf_counter()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        cpu_now = time.process_time()
        cpu_s, cpu_mark = cpu_now - cpu_mark, cpu_now
        records.append(
            {
                "window_s": window_end - start,
                "step_s": end - start,
                "loss": float(sum(loss.item() for loss in losses) / len(losses)) if losses else None,
                "reports": [dataclasses.replace(probe.report(), process_cpu_s=cpu_s) for probe in probes],
            }
        )
    return schedule, records


def log_steps(
    schedule: Schedule, batch_size: int, per_rank: list[list[dict[str, Any]]], run_dir: Path
) -> None:
    """Log every step of the gathered records as a pipetrain run logs it (the slowest rank's times), and
    write the last step's trace."""
    with MetricsLogger(run_dir) as logger:
        for step, by_rank in enumerate(zip(*per_rank, strict=True), start=1):
            reports = sorted((r for record in by_rank for r in record["reports"]), key=lambda r: r.stage_idx)
            metrics = step_metrics(
                step,
                next(record["loss"] for record in by_rank if record["loss"] is not None),
                batch_size,
                max(record["step_s"] for record in by_rank),
                max(record["window_s"] for record in by_rank),
                reports,
                schedule,
                driver_cpu_s=0.0,  # no driver process
            )
            logger.log_step(metrics)
            if step == len(per_rank[0]):
                logger.write_trace(step, reports, schedule.placement)


def main(argv: list[str] | None = None) -> int:
    """Join the gloo group (torchrun's environment), run, log the steps on rank 0."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    try:
        cfg = to_train_config(compose_config(args.overrides))
        schedule, records = run(cfg, args.steps)
        gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(records, gathered, dst=0)
        if gathered is not None:
            log_steps(schedule, cfg.train.batch_size, gathered, args.run_dir)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
