"""The :class:`WorkerHandle` protocol: what the executor and driver need from a worker, wherever it runs.

Two phases per step: :meth:`WorkerHandle.submit` hands the worker its actions (it runs them as their
inputs arrive), :meth:`WorkerHandle.optimizer_step` asks it to step its stages' optimizers once their
actions are done. Between the two goes any reduction across stages: global gradient-norm clipping asks
every worker for :meth:`WorkerHandle.gradient_norms` and sends the scale they imply with the step.

Profiling (:mod:`pipetrain.profiling`) adds one flag and one request: ``submit(work, profile=True)`` runs
the step under ``torch.profiler`` on the worker, and :meth:`WorkerHandle.collect_profile`, sent after that
step's optimizer step has answered, returns the worker's profile as plain data.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from pipetrain.runner import PLAIN_STEP, OptimizerStepRequest, Work, result_or_error

__all__ = ["WorkerHandle", "ProgressTracker"]


class WorkerHandle(Protocol):
    """The driver's view of one worker and the stages it hosts."""

    worker_idx: int
    replica_idx: int
    """The copy of the pipeline the worker belongs to (0 without replicas)."""

    @property
    def label(self) -> str:
        """How errors name this worker, e.g. ``"worker 1 (rank 2)"``."""
        ...

    def submit(self, work: Work, profile: bool = False, evaluate: bool = False) -> list[torch.futures.Future]:
        """Hand the worker its actions of the next step; one future per action, done when it has run.

        With ``profile``, the worker runs the step (its optimizer steps included) under ``torch.profiler``.
        With ``evaluate``, the actions are an evaluation pass (forward only, no autograd); collect its
        results with :meth:`evaluation_reports` instead of an optimizer step.
        """
        ...

    def optimizer_step(self, request: OptimizerStepRequest = PLAIN_STEP) -> torch.futures.Future:
        """Step the worker's stages once their submitted actions are done, as ``request`` says.

        The future carries the stages' :class:`~pipetrain.timings.StageReport` list, or the error.
        """
        ...

    def evaluation_reports(self) -> torch.futures.Future:
        """The stages' :class:`~pipetrain.timings.StageReport` list of the submitted evaluation pass once it
        is done (losses and prediction counts), or the error."""
        ...

    def gradient_norms(self) -> torch.futures.Future:
        """Stage index -> the 2-norms of that stage's parameter gradients, once the worker's submitted
        actions are done; or the error. Ask before :meth:`optimizer_step`."""
        ...

    def call_each_stage(self, fn: Callable[..., Any], *args: Any) -> torch.futures.Future:
        """Run ``fn(stage, *args)`` for each stage of the worker, where it lives (``fn``: importable)."""
        ...

    def collect_profile(self) -> torch.futures.Future:
        """The worker's :class:`~pipetrain.profiling.WorkerProfile` of its last profiled step, or the error.

        Sent once the profiled step's optimizer step has answered; each profile is handed out once.
        """
        ...


class ProgressTracker:
    """The driver's side of one worker's step: completes the ``done`` futures of its actions in order.

    When :meth:`advance` returns, every future it counts is complete, on whichever thread completed it: a
    dead worker's replies read its last count on several threads at once, and the driver names the first
    action whose future is not complete once one of them passes its error on.
    """

    def __init__(self, step_id: int, done: Sequence[torch.futures.Future]) -> None:
        self.step_id = step_id
        self._done = list(done)
        self._completed = 0
        # Held while the futures are completed (their callbacks only record the outcome).
        self._lock = threading.RLock()

    def advance(self, count: int, error: BaseException | None = None) -> None:
        """The first ``count`` actions are done; with ``error``, the rest failed with it."""
        with self._lock:
            newly_done = self._done[self._completed : count]
            self._completed = max(self._completed, count)
            failed_now = self._done[self._completed :] if error is not None else []
            if error is not None:
                self._completed = len(self._done)
            for future in newly_done:
                future.set_result(None)
            for future in failed_now:
                future.set_exception(error)

    def finish(self, reply: torch.futures.Future) -> None:
        """The worker answered: every action is done, or whatever is not failed with the reply's error."""
        error = result_or_error(reply)
        if isinstance(error, BaseException):
            self.advance(0, error)
        else:
            self.advance(len(self._done))
