"""The driver: data -> micro-batches -> executor -> optimizer steps -> metrics.

It works on :class:`~pipetrain.transport.handle.WorkerHandle`s, so the same loop drives workers in this
process (tests, debugging) and worker processes over RPC.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipetrain import boundary
from pipetrain.build import build_schedule_for, resume_step
from pipetrain.checkpoint import (
    commit_checkpoint,
    find_checkpoint,
    optimizer_manifest,
    partial_dir,
    prune_checkpoints,
    remove_stale_partials,
    resume_notice,
    save_stage,
    written_bytes,
)
from pipetrain.config import TrainConfig
from pipetrain.data import BatchOrder, EvalBatches
from pipetrain.executor import LaunchedStep, StageLabels, execute, launch, wait_all
from pipetrain.failures import RunStopped, StageFailure, interrupt_requested, stop_requested
from pipetrain.grad_clip import GlobalNorm
from pipetrain.loader import DataError, step_batches
from pipetrain.metrics import Evaluation, MetricsLogger, StepMetrics, format_progress, step_metrics
from pipetrain.partition import StagePlan
from pipetrain.profiling import merge_trace, request_profile, summarize, write_profile
from pipetrain.schedule import Schedule
from pipetrain.timings import SpanCategory, StageReport
from pipetrain.transport.handle import WorkerHandle

__all__ = ["StepResult", "StepInFlight", "split_microbatches", "launch_step", "run_step", "Driver"]


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step produced."""

    loss: float
    """Mean loss over the batch (sum of the micro-batch contributions)."""
    reports: tuple[StageReport, ...]
    window_s: float
    """Wall time of the schedule's execution: from when the first worker began the step (its request
    there and its previous step done, and not before the previous step's last action ended) to the end of
    its last action (see :meth:`StepInFlight.finish`)."""
    step_time_s: float
    """Wall time of the whole step, optimizer steps included (in training: since the previous step ended,
    so loading the batch, logging and checkpoints count too)."""
    data_time_s: float = 0.0
    """Time the driver spent taking batches within ``step_time_s`` (with ``train.submit_ahead``, the next
    step's batch is taken while this step runs)."""
    started_at: float = 0.0
    """The driver's wall clock when it began the step's execution (``ts`` 0 of the step's profile)."""
    clipped: GlobalNorm | None = None
    """The global gradient norm and the scale applied to it (with ``train.clip_grad_norm``)."""
    replica_reports: tuple[tuple[StageReport, ...], ...] = ()
    """With replicas, every replica's reports (``reports`` are replica 0's)."""
    driver_cpu_s: float | None = None
    """CPU seconds of the driver's process since the previous step, when it has one of its own."""
    actions_ended_at: float = 0.0
    """When the step's last action ended (``time.time()`` on its worker)."""


def split_microbatches(
    inputs: torch.Tensor, targets: torch.Tensor, num_microbatches: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Split a batch into ``num_microbatches`` equal micro-batches along dimension 0.

    ``inputs`` and ``targets`` are tensors or nested tuples, lists and dicts of them (constants are
    repeated in every micro-batch); each micro-batch has the same structure.
    """
    batch_size = boundary.batch_size(inputs)
    if batch_size % num_microbatches:
        raise ValueError(
            f"train.batch_size: {batch_size} is not divisible by pipeline.num_microbatches="
            f"{num_microbatches}; choose a batch size that is a multiple of it"
        )
    return boundary.split(inputs, num_microbatches), boundary.split(targets, num_microbatches)


class StepInFlight:
    """A step handed to the workers (:func:`launch_step`); :meth:`finish` waits for its result."""

    def __init__(self, launched: LaunchedStep, submitted_at: float, num_replicas: int) -> None:
        self.launched = launched
        self.submitted_at = submitted_at
        """The driver's wall clock when it handed out the step."""
        self.num_replicas = num_replicas

    def finish(self, not_before: float = 0.0) -> StepResult:
        """Wait for the step; its loss, reports and timings.

        The step's window runs from when its first worker began it (its request there and its previous
        step done) to the end of its last action, on the workers' clocks, and begins no earlier than
        ``not_before``: the end of the previous step's last action (:attr:`StepResult.actions_ended_at`),
        so that the windows of a step handed out ahead and of the one before do not overlap.
        """
        executed = self.launched.finish()
        loss = sum(sum(reports[-1].losses) for reports in executed.replica_reports) / self.num_replicas
        reports = [report for replica in executed.replica_reports for report in replica]
        starts = [report.started_at for report in reports if report.started_at is not None]
        ends = [
            span.end for report in reports for span in report.spans if span.category is SpanCategory.COMPUTE
        ]
        began = max(min(starts) if starts else self.submitted_at, not_before)
        ended = max(ends) if ends else executed.actions_done_at
        return StepResult(
            loss,
            executed.reports,
            max(ended - began, 0.0),
            time.time() - self.submitted_at,
            started_at=self.submitted_at,
            clipped=executed.clipped,
            replica_reports=executed.replica_reports,
            actions_ended_at=ended,
        )


def launch_step(
    handles: Sequence[WorkerHandle],
    schedule: Schedule,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_microbatches: int,
    timeout_s: float | None = None,
    profile: bool = False,
    clip_grad_norm: float | None = None,
) -> StepInFlight:
    """Hand one optimizer step to the workers (see :func:`run_step`) and return without waiting.

    Without ``clip_grad_norm``, the next step may be started before this one is finished: each worker
    runs its steps in the order they were started (:func:`pipetrain.executor.launch`).
    """
    start = time.time()
    num_replicas = len({handle.replica_idx for handle in handles})
    micro_inputs, micro_targets = split_microbatches(inputs, targets, num_replicas * num_microbatches)
    launched = launch(
        schedule,
        handles,
        micro_inputs,
        micro_targets,
        timeout_s=timeout_s,
        profile=profile,
        clip_grad_norm=clip_grad_norm,
    )
    return StepInFlight(launched, start, num_replicas)


def run_step(
    handles: Sequence[WorkerHandle],
    schedule: Schedule,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_microbatches: int,
    timeout_s: float | None = None,
    profile: bool = False,
    clip_grad_norm: float | None = None,
) -> StepResult:
    """One optimizer step: every action of ``schedule``, and each stage's optimizer step after its own.

    With handles of several replicas, each takes an equal share of the batch (replica ``r`` the ``r``-th)
    in ``num_microbatches`` micro-batches; the loss is the mean over the whole batch.
    With ``profile``, the workers of replica 0 run it under ``torch.profiler`` (:mod:`pipetrain.profiling`);
    with ``clip_grad_norm``, the gradients are clipped to that global norm first (:mod:`pipetrain.grad_clip`).
    """
    return launch_step(
        handles, schedule, inputs, targets, num_microbatches, timeout_s, profile, clip_grad_norm
    ).finish()


class Driver:
    """Trains ``cfg.train.steps`` steps over ``handles``, logging into ``run_dir`` when given."""

    def __init__(
        self,
        cfg: TrainConfig,
        handles: Sequence[WorkerHandle],
        plan: StagePlan,
        batches: BatchOrder,
        run_dir: Path | None = None,
        print_fn: Callable[[str], Any] = print,
        eval_batches: EvalBatches | None = None,
        own_process: bool = False,
    ) -> None:
        self.cfg = cfg
        self.handles = list(handles)
        self.first_replica = [handle for handle in self.handles if handle.replica_idx == 0]
        """Replica 0's workers: they evaluate, save checkpoints and profile for all replicas (which hold
        the same weights)."""
        self.plan = plan
        self.schedule = build_schedule_for(cfg, plan.num_stages)
        self._eval_schedule = self.schedule.forward_only()
        self.batches = batches
        self.eval_batches = eval_batches
        self.run_dir = run_dir
        self.print_fn = print_fn
        self.logger = MetricsLogger(run_dir, continue_after=resume_step(cfg)) if run_dir is not None else None
        self.interrupted_after: int | None = None
        """The step after which an interrupt (Ctrl-C) stopped training, if one did."""
        self.own_process = own_process
        """The driver has its process to itself (the workers run elsewhere): its CPU time is logged, and its
        loader processes leave its process group (:mod:`pipetrain.process_ties`)."""

    def train(self, start_step: int = 0) -> list[float]:
        """Run the remaining steps; return the loss of every step run.

        A failing step raises :class:`StageFailure` or :class:`~pipetrain.loader.DataError` with
        ``step`` set to the (1-based) step it stopped in.
        """
        cfg = self.cfg
        losses: list[float] = []
        last_metrics: StepMetrics | None = None
        pin_memory = cfg.device != "cpu" and torch.cuda.is_available()
        detach = self.own_process
        batches = step_batches(self.batches, start_step, cfg.train.steps, cfg.loader, pin_memory, detach)
        try:
            self._before_first_step()
            previous_end, cpu_mark = time.time(), time.process_time()
            in_flight: tuple[int, StepInFlight] | None = None
            loading_s = 0.0  # spent taking batches since previous_end, whichever step they are for
            actions_ended_at = 0.0
            next_step = start_step
            while in_flight is not None or next_step < cfg.train.steps:
                if in_flight is None:
                    if stop_requested():
                        raise RunStopped("stop requested")
                    if interrupt_requested():
                        self._stop_interrupted(next_step)
                        break
                    in_flight, data_time_s = self._start(next_step, batches)
                    loading_s += data_time_s
                    next_step += 1
                step, running = in_flight
                ahead, deferred = None, None
                if next_step < cfg.train.steps and self._may_start_ahead(step + 1):
                    try:
                        ahead, data_time_s = self._start(next_step, batches)
                        loading_s += data_time_s
                        next_step += 1
                    except DataError as error:  # said once the step in flight is recorded
                        deferred = error
                with _naming_step(step + 1):
                    result = running.finish(not_before=actions_ended_at)
                actions_ended_at = result.actions_ended_at
                if result.clipped is not None and not result.clipped.finite:
                    self.print_fn(
                        f"pipetrain: step {step + 1} skipped on every stage: the gradient norm is "
                        f"{result.clipped.total_norm}"
                    )
                losses.append(result.loss)
                step_end = time.time()
                step_time_s, previous_end = step_end - previous_end, step_end
                cpu_now = time.process_time()
                cpu_s, cpu_mark = cpu_now - cpu_mark, cpu_now
                result = dataclasses.replace(
                    result,
                    step_time_s=step_time_s,
                    data_time_s=loading_s,
                    driver_cpu_s=cpu_s if self.own_process else None,
                )
                loading_s = 0.0
                evaluation = self.evaluate(step + 1) if self._evaluation_due(step + 1) else None
                last_metrics = self._record(step + 1, result, evaluation) or last_metrics
                if evaluation is not None:  # not part of the next step's time
                    previous_end = time.time()
                if deferred is not None:
                    raise deferred
                in_flight = ahead
            if self.logger is not None and last_metrics is not None:
                status = "ok" if self.interrupted_after is None else "interrupted"
                self.logger.log_hparams(_hparams(cfg), status)
        finally:
            del batches  # stops the loader's processes
            if self.logger is not None:
                self.logger.close()
        return losses

    def _start(self, step: int, batches: Iterator[Any]) -> tuple[tuple[int, StepInFlight], float]:
        """Take step ``step``'s batch (0-based) and hand the step to the workers; with the time it took to
        get the batch."""
        cfg = self.cfg
        with _naming_step(step + 1):
            waited_from = time.time()
            inputs, targets = next(batches)
            data_time_s = time.time() - waited_from
            running = launch_step(
                self.handles,
                self.schedule,
                inputs,
                targets,
                cfg.pipeline.num_microbatches,
                timeout_s=cfg.rpc.timeout_s,
                profile=step + 1 in cfg.log.profile_steps,
                clip_grad_norm=cfg.train.clip_grad_norm,
            )
        return (step, running), data_time_s

    def _may_start_ahead(self, steps_done: int) -> bool:
        """Whether the step after ``steps_done`` may go to the workers before that step is back: not when
        something must happen between the two (``train.submit_ahead``)."""
        cfg = self.cfg
        return (
            cfg.train.submit_ahead
            and cfg.train.clip_grad_norm is None
            and not (stop_requested() or interrupt_requested())
            and not self._evaluation_due(steps_done)
            and not self._checkpoint_due(steps_done)
            and steps_done not in cfg.log.profile_steps
            and steps_done + 1 not in cfg.log.profile_steps
        )

    def _checkpoint_due(self, steps_done: int) -> bool:
        cfg = self.cfg
        every_due = bool(cfg.checkpoint.every) and steps_done % cfg.checkpoint.every == 0
        at_end = steps_done == cfg.train.steps and cfg.checkpoint.at_end
        return self.run_dir is not None and (every_due or at_end)

    def _before_first_step(self) -> None:
        """Remove checkpoints that killed runs left unfinished; say what a resume changes."""
        if self.run_dir is not None:
            for stale in remove_stale_partials(self.run_dir / "checkpoints"):
                self.print_fn(f"pipetrain: removed {stale}, left unfinished by an earlier run")
        resume = self.cfg.checkpoint.resume
        if resume:
            try:
                self.print_fn(resume_notice(find_checkpoint(resume), self.cfg.optim, self.cfg.lr_scheduler))
            except Exception as error:  # noqa: BLE001 - the notice only informs; the run goes on
                self.print_fn(f"pipetrain: resuming from {resume} (cannot compare it with optim: {error})")

    def _stop_interrupted(self, steps_done: int) -> None:
        """Stop after ``steps_done`` steps, saving a checkpoint unless told not to (or one is there)."""
        self.interrupted_after = steps_done
        saved = self.run_dir is not None and (self.run_dir / "checkpoints" / f"step_{steps_done}").is_dir()
        if self.run_dir is None or not self.cfg.checkpoint.on_interrupt or saved or steps_done == 0:
            return
        path = self.save_checkpoint(steps_done)
        self.print_fn(f"pipetrain: saved {path}; continue with checkpoint.resume={path}")

    def _evaluation_due(self, steps_done: int) -> bool:
        every = self.cfg.eval.every
        due = every and (steps_done % every == 0 or steps_done == self.cfg.train.steps)
        return bool(due) and self.eval_batches is not None

    def evaluate(self, step: int) -> Evaluation:
        """One evaluation pass over :attr:`eval_batches`: forward only through the workers, no autograd."""
        assert self.eval_batches is not None
        losses, correct, predictions = [], 0, 0
        with _naming_step(step):
            for index in range(len(self.eval_batches)):
                inputs, targets = self.eval_batches.batch(index)
                micro_inputs, micro_targets = split_microbatches(
                    inputs, targets, self.cfg.pipeline.num_microbatches
                )
                executed = execute(
                    self._eval_schedule,
                    self.first_replica,
                    micro_inputs,
                    micro_targets,
                    self.cfg.rpc.timeout_s,
                    evaluate=True,
                )
                last = executed.reports[-1]
                losses.append(sum(last.losses))
                correct, predictions = correct + last.correct, predictions + last.predictions
        return Evaluation(
            loss=sum(losses) / len(losses),
            accuracy=correct / predictions if predictions else None,
            samples=len(self.eval_batches) * self.eval_batches.batch_size,
        )

    def _record(
        self, steps_done: int, result: StepResult, evaluation: Evaluation | None
    ) -> StepMetrics | None:
        """Log, trace and checkpoint as configured after ``steps_done`` steps; the metrics if logged."""
        cfg = self.cfg
        is_last = steps_done == cfg.train.steps
        metrics = None
        if steps_done % cfg.train.log_every == 0 or is_last or evaluation is not None:
            metrics = step_metrics(
                steps_done,
                result.loss,
                cfg.train.batch_size,
                result.step_time_s,
                result.window_s,
                result.reports,
                self.schedule,
                data_time_s=result.data_time_s,
                grad_norm=None if result.clipped is None else result.clipped.total_norm,
                evaluation=evaluation,
                replica_reports=result.replica_reports,
                driver_cpu_s=result.driver_cpu_s,
            )
            self.print_fn(format_progress(metrics, cfg.train.steps))
            if self.logger is not None:
                self.logger.log_step(metrics)
        trace_due = cfg.log.trace_every and steps_done % cfg.log.trace_every == 0
        if self.logger is not None and (trace_due or is_last):
            self.logger.write_trace(steps_done, result.reports, self.schedule.placement)
        if steps_done in cfg.log.profile_steps:
            self._write_profile(steps_done, result)
        if self._checkpoint_due(steps_done):
            self.save_checkpoint(steps_done)
        return metrics

    def _write_profile(self, step: int, result: StepResult) -> None:
        """Collect the workers' profiles of ``step``, merge them with its spans; print and write them."""
        with _naming_step(step):
            replies = [(h.label, "profile collection", request_profile(h)) for h in self.first_replica]
            profiles = wait_all(replies, self.cfg.rpc.timeout_s, self._stage_labels())
        document = merge_trace(result.reports, self.schedule.placement, profiles, result.started_at, step)
        summary = summarize(document)
        self.print_fn(summary)
        if self.run_dir is not None:
            path = write_profile(self.run_dir / "traces", step, document, summary)
            self.print_fn(f"pipetrain: profile of step {step}: {path} (open it in https://ui.perfetto.dev)")

    def _stage_labels(self) -> StageLabels:
        """How failures of replica 0's requests name a stage's worker (see :func:`wait_all`)."""
        worker_labels = {h.worker_idx: h.label for h in self.first_replica}
        return lambda _, stage_idx: worker_labels[self.schedule.worker_of(stage_idx)]

    def save_checkpoint(self, step: int) -> Path:
        """Every stage writes its file in parallel (replica 0's copy: the replicas' are the same); the
        checkpoint is committed once all are written.

        A save fails only when its files grow by no byte for ``rpc.timeout_s``, however long it takes.
        Then checkpoints beyond the newest ``checkpoint.keep_last`` are deleted.
        """
        assert self.run_dir is not None
        directory = partial_dir(self.run_dir / "checkpoints", step)
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        saves = [
            (h.label, "checkpoint save", h.call_each_stage(save_stage, str(directory), step))
            for h in self.first_replica
        ]
        wait_all(
            saves, self.cfg.rpc.timeout_s, self._stage_labels(), progress=lambda: written_bytes(directory)
        )
        manifest = {
            "step": step,
            "num_stages": self.plan.num_stages,
            "stages": [list(names) for names in self.plan.stages],
            "schedule": self.cfg.schedule.name,
            "num_microbatches": self.cfg.pipeline.num_microbatches,
            "replicas": self.cfg.pipeline.replicas,
            "seed": self.cfg.seed,
            **optimizer_manifest(self.cfg.optim),
            "lr_scheduler": dict(self.cfg.lr_scheduler),
        }
        committed = commit_checkpoint(directory, manifest)
        prune_checkpoints(committed.parent, self.cfg.checkpoint.keep_last)
        return committed


@contextmanager
def _naming_step(step: int) -> Iterator[None]:
    """Tag a failure raised inside with the step it stopped."""
    try:
        yield
    except (StageFailure, DataError) as failure:
        failure.step = step
        raise


def _hparams(cfg: TrainConfig) -> dict[str, Any]:
    """The run's HPARAMS columns: ``log.hparams`` (a sweep's varying overrides), else the key settings;
    with ``pipeline.balance=auto``, the split it chose and its predicted step time."""
    split = (
        cfg.pipeline.balance if cfg.pipeline.balance is not None else [len(s) for s in cfg.pipeline.stages]
    )
    split_text = "[" + ",".join(str(count) for count in split) + "]"
    columns = dict(cfg.log.hparams) or {
        "schedule": cfg.schedule.name,
        "balance": split_text,
        "num_microbatches": cfg.pipeline.num_microbatches,
    }
    auto = cfg.autobalance.result
    if auto:
        columns["balance"] = f"auto {split_text}"
        columns["balance_predicted_step_time_s"] = auto["predicted_step_time_s"]
    return columns
