"""In-process workers: the whole pipeline in the driver's process, each worker on a thread of its own.

The same :class:`~pipetrain.runner.WorkerRunner` as over RPC runs the actions; workers fetch each other's
outputs by a direct call instead of a message. Used by the tests and for debugging a split without
processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from pipetrain.failures import StageError
from pipetrain.gradient_sync import GradientSync, InProcessGradientSync
from pipetrain.runner import PLAIN_STEP, OptimizerStepRequest, Work, WorkerRunner, completed
from pipetrain.schedule import Schedule
from pipetrain.stage import Stage
from pipetrain.transport.handle import ProgressTracker

__all__ = ["LocalWorkerHandle", "local_workers", "local_replicas"]


class LocalWorkerHandle:
    """A :class:`~pipetrain.transport.handle.WorkerHandle` on a runner in this process."""

    def __init__(self, runner: WorkerRunner, replica_idx: int = 0) -> None:
        self.runner = runner
        self.worker_idx = runner.worker_idx
        self.replica_idx = replica_idx
        self._steps_sent = 0

    @property
    def label(self) -> str:
        """``"worker <k> (in-process)"``, or ``"replica <r> worker <k> (in-process)"``."""
        replica = f"replica {self.replica_idx} " if self.runner.gradient_sync is not None else ""
        return f"{replica}worker {self.worker_idx} (in-process)"

    def submit(self, work: Work, profile: bool = False, evaluate: bool = False) -> list[torch.futures.Future]:
        """Start the actions on the worker's compute thread (under ``torch.profiler`` with ``profile``).

        torch.profiler profiles one worker per process at a time: a step profiled on several in-process
        workers fails on all but one of them.
        """
        self._steps_sent += 1
        done = [torch.futures.Future() for _ in work]
        tracker = ProgressTracker(self._steps_sent, done)
        try:
            finished = self.runner.run_actions(self._steps_sent, work, tracker.advance, profile, evaluate)
        except Exception as error:
            finished = completed(StageError.wrap(error, min(self.runner.stages), "step request"))
        finished.add_done_callback(tracker.finish)
        return done

    def optimizer_step(self, request: OptimizerStepRequest = PLAIN_STEP) -> torch.futures.Future:
        """Step the stages once their actions are done."""
        return self.runner.optimizer_step(self._steps_sent, request)

    def evaluation_reports(self) -> torch.futures.Future:
        """The stages' results of the evaluation pass once it is done."""
        return self.runner.evaluation_reports(self._steps_sent)

    def gradient_norms(self) -> torch.futures.Future:
        """The stages' gradient norms once their actions are done."""
        return self.runner.gradient_norms(self._steps_sent)

    def call_each_stage(self, fn: Callable[..., Any], *args: Any) -> torch.futures.Future:
        """Run ``fn(stage, *args)`` for each stage now."""
        try:
            return completed(self.runner.each_stage(fn, *args))
        except Exception as error:
            name = getattr(fn, "__name__", "request")
            return completed(StageError.wrap(error, min(self.runner.stages), name))

    def collect_profile(self) -> torch.futures.Future:
        """The worker's profile of its last profiled step."""
        try:
            return completed(self.runner.collect_profile())
        except Exception as error:
            return completed(StageError.wrap(error, min(self.runner.stages), "profile collection"))


def local_workers(
    stages: Sequence[Stage],
    schedule: Schedule,
    replica_idx: int = 0,
    gradient_sync: GradientSync | None = None,
) -> list[LocalWorkerHandle]:
    """Handles on in-process workers holding ``stages`` (stage ``k`` at index ``k``) as ``schedule`` says.

    ``replica_idx`` and ``gradient_sync`` make them one replica of several (see :func:`local_replicas`).
    """
    runners = [
        WorkerRunner(
            worker, {idx: stages[idx] for idx in schedule.stages_of(worker)}, schedule, gradient_sync
        )
        for worker in range(schedule.num_workers)
    ]
    for runner in runners:
        runner.connect(lambda worker, step_id, action: runners[worker].fetch(step_id, action))
    return [LocalWorkerHandle(runner, replica_idx) for runner in runners]


def local_replicas(replica_stages: Sequence[Sequence[Stage]], schedule: Schedule) -> list[LocalWorkerHandle]:
    """Handles on the in-process workers of several replicas (``replica_stages[r]``: replica ``r``'s
    stages), whose copies of each stage average their gradients before stepping."""
    sync = InProcessGradientSync(len(replica_stages))
    return [
        handle
        for replica_idx, stages in enumerate(replica_stages)
        for handle in local_workers(stages, schedule, replica_idx, sync)
    ]
