"""Run a schedule over worker handles: the only place where a step's actions are handed out and awaited.

The dependency rules are :mod:`pipetrain.schedule.order`'s, shared with the simulator, the validator
and the workers' runner. Each worker gets its actions of the step in schedule order, with stage 0's
micro-batches and the last stage's targets; the workers pull every other input from each other. Then each
worker is asked for its optimizer step, which it takes stage by stage as soon as a stage's own actions
are done, so a stage that finishes early steps while the others drain.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipetrain.failures import RunStopped, StageError, StageFailure, stop_requested
from pipetrain.grad_clip import GlobalNorm, clip_by_global_norm
from pipetrain.runner import OptimizerStepRequest
from pipetrain.schedule import Action, ActionKind, Schedule, dependencies, execution_order
from pipetrain.timings import StageReport
from pipetrain.transport.handle import WorkerHandle

# StageFailure is re-exported.
__all__ = ["ExecutedStep", "LaunchedStep", "StageFailure", "StageLabels", "execute", "launch", "wait_all"]

_NAME_THE_CAUSE_S = 3.0
_POLL_STOP_S = 0.1


@dataclass(frozen=True)
class ExecutedStep:
    """What :func:`execute` observed."""

    reports: tuple[StageReport, ...]
    """Each stage's report, in stage order (of replica 0, with replicas)."""
    actions_done_at: float
    """``time.time()`` when the schedule's last action was done (before the last optimizer step)."""
    clipped: GlobalNorm | None = None
    """The global gradient norm and the scale applied, with ``clip_grad_norm``."""
    replica_reports: tuple[tuple[StageReport, ...], ...] = ()
    """Every replica's reports (``replica_reports[r]``, in stage order); ``(reports,)`` with one replica."""


def execute(
    schedule: Schedule,
    handles: Sequence[WorkerHandle],
    inputs: Sequence[Any],
    targets: Sequence[Any],
    timeout_s: float | None = None,
    profile: bool = False,
    clip_grad_norm: float | None = None,
    evaluate: bool = False,
) -> ExecutedStep:
    """Run every action of ``schedule``, then every stage's optimizer step; wait until all are done.

    ``inputs[mb]`` goes to stage 0's forward of micro-batch ``mb``, ``targets[mb]`` to the last stage's.
    With handles of several replicas (``handle.replica_idx``), replica ``r`` runs the whole schedule on
    ``inputs[r * m + mb]`` (``m`` micro-batches each), and the copies of each stage average their
    gradients before stepping (:mod:`pipetrain.gradient_sync`).
    With ``profile``, every worker (of replica 0) runs the step under ``torch.profiler``
    (:mod:`pipetrain.profiling`). With ``clip_grad_norm``, the gradients of all stages are scaled to that
    global 2-norm at most before the optimizer steps (:mod:`pipetrain.grad_clip`), or dropped with no
    step where it is not finite.
    With ``evaluate``, ``schedule`` is a forward-only one (:meth:`Schedule.forward_only`) and the workers
    run an evaluation pass: no autograd, no optimizer step; the reports carry its losses and predictions.
    Raises :class:`StageFailure` for the first action or step to fail, or when nothing completes for
    ``timeout_s`` seconds.
    """
    return launch(schedule, handles, inputs, targets, timeout_s, profile, clip_grad_norm, evaluate).finish()


def launch(
    schedule: Schedule,
    handles: Sequence[WorkerHandle],
    inputs: Sequence[Any],
    targets: Sequence[Any],
    timeout_s: float | None = None,
    profile: bool = False,
    clip_grad_norm: float | None = None,
    evaluate: bool = False,
) -> LaunchedStep:
    """Hand every worker its actions of the step and, without clipping, its optimizer-step request; wait
    for nothing. :meth:`LaunchedStep.finish` waits for the step (arguments as for :func:`execute`).

    A worker runs its steps one after the other, in the order they were launched, so the next step can be
    launched before this one is finished, once every request of this one is out: that is at once
    without ``clip_grad_norm`` (with it, the optimizer steps are requested in :meth:`LaunchedStep.finish`,
    after the gradient norms are in). The worker then starts the next step as soon as it is done with
    this one, without waiting for the driver.
    """
    order, stuck = execution_order(schedule)
    if stuck:
        raise RuntimeError(
            f"schedule cannot make progress; stuck at actions {sorted(map(str, stuck.values()))}"
        )
    last_stage = schedule.num_stages - 1
    m = schedule.num_microbatches
    done: dict[tuple[int, Action], torch.futures.Future] = {}
    for handle in handles:
        offset = handle.replica_idx * m
        work = [
            (
                action,
                inputs[offset + action.mb_idx] if _is_forward_of(action, 0) else None,
                targets[offset + action.mb_idx] if _is_forward_of(action, last_stage) else None,
            )
            for action in schedule[handle.worker_idx]
        ]
        futures = handle.submit(work, profile and handle.replica_idx == 0, evaluate)
        done.update(
            ((handle.replica_idx, action), future)
            for action, future in zip((a for a, _, _ in work), futures, strict=True)
        )
    replicas = sorted({handle.replica_idx for handle in handles})
    # Interleaved across replicas, so "the earliest unfinished action" means the same in each.
    issued = [((replica, action), done[(replica, action)]) for action in order for replica in replicas]
    # With clipping, the stages step only once every worker's gradient norms are in; otherwise each
    # worker is asked for its step right away and steps each stage as soon as that stage is done.
    if evaluate:
        after_actions = [(handle, "evaluation", handle.evaluation_reports()) for handle in handles]
    elif clip_grad_norm is None:
        after_actions = [(handle, "optimizer step", handle.optimizer_step()) for handle in handles]
    else:
        after_actions = [(handle, "gradient norms", handle.gradient_norms()) for handle in handles]
    return LaunchedStep(schedule, list(handles), issued, after_actions, timeout_s, clip_grad_norm, evaluate)


class LaunchedStep:
    """A step handed to the workers (:func:`launch`); :meth:`finish` waits for it."""

    def __init__(
        self,
        schedule: Schedule,
        handles: list[WorkerHandle],
        issued: list[tuple[tuple[int, Action], torch.futures.Future]],
        after_actions: list[tuple[WorkerHandle, str, torch.futures.Future]],
        timeout_s: float | None,
        clip_grad_norm: float | None,
        evaluate: bool,
    ) -> None:
        self.schedule = schedule
        self.handles = handles
        self.issued = issued
        """Every action of every replica in execution order, with the future of its completion."""
        self.after_actions = after_actions
        """Each worker's request after its actions: optimizer step, gradient norms or evaluation."""
        self.timeout_s = timeout_s
        self.clip_grad_norm = clip_grad_norm
        self.evaluate = evaluate
        self.actions_done_at = torch.futures.collect_all([future for _, future in issued]).then(
            lambda _: time.time()
        )
        """``time.time()`` once the driver knows the last action is done."""

    def finish(self) -> ExecutedStep:
        """Wait for every action and optimizer step (with clipping: the norms, then the steps)."""
        schedule, handles, issued = self.schedule, self.handles, self.issued
        after_actions = self.after_actions
        replicas = sorted({handle.replica_idx for handle in handles})
        worker_labels = {(handle.replica_idx, handle.worker_idx): handle.label for handle in handles}
        # Entry i of the wait: action i of the execution order, then each worker's request after its actions.
        entry_workers = [(replica, schedule.worker_of(action.stage_idx)) for (replica, action), _ in issued]
        entry_workers += [(handle.replica_idx, handle.worker_idx) for handle, _, _ in after_actions]

        def _label(entry: int, stage_idx: int) -> str:
            """The worker hosting ``stage_idx`` in the replica of wait entry ``entry``."""
            return worker_labels[(entry_workers[entry][0], schedule.worker_of(stage_idx))]

        def _blame(ok: list[bool], failed_index: int | None) -> int:
            """The entry to name: what the failed worker was running, or what is stuck."""
            if failed_index is not None:  # a worker's process is gone: name what it was running
                worker = entry_workers[failed_index]
                return next(i for i, entry in enumerate(entry_workers) if entry == worker and not ok[i])
            # Stuck: a worker's first unfinished action whose inputs are there (the earliest such), else a
            # step.
            finished = {key for (key, _), is_ok in zip(issued, ok[: len(issued)], strict=True) if is_ok}
            seen_workers: set[tuple[int, int]] = set()
            for index, ((replica, action), _) in enumerate(issued):
                worker = entry_workers[index]
                if ok[index] or worker in seen_workers:
                    continue
                seen_workers.add(worker)
                if finished.issuperset((replica, dep) for dep in dependencies(action, schedule)):
                    return index
            return ok.index(False)

        pending = [
            (worker_labels[entry_workers[i]], f"action {action} (stage {action.stage_idx})", future)
            for i, ((_, action), future) in enumerate(issued)
        ]
        pending += [(handle.label, what, reply) for handle, what, reply in after_actions]
        values = wait_all(pending, self.timeout_s, _label, _blame)[len(issued) :]
        clipped = None
        if self.clip_grad_norm is not None and not self.evaluate:
            # Replicas hold the same (averaged) gradients: replica 0's norms are everyone's.
            by_stage = {
                stage_idx: norms
                for (handle, _, _), worker_norms in zip(after_actions, values, strict=True)
                if handle.replica_idx == replicas[0]
                for stage_idx, norms in worker_norms.items()
            }
            # In stage order, so the norms are in the unsplit model's parameter order.
            clipped = clip_by_global_norm(
                [n for idx in sorted(by_stage) for n in by_stage[idx]], self.clip_grad_norm
            )
            request = OptimizerStepRequest(grad_scale=clipped.grad_scale, skip=not clipped.finite)
            steps = [(handle.label, "optimizer step", handle.optimizer_step(request)) for handle in handles]
            step_replicas = [handle.replica_idx for handle in handles]
            values = wait_all(
                steps,
                self.timeout_s,
                lambda entry, stage_idx: worker_labels[(step_replicas[entry], schedule.worker_of(stage_idx))],
            )
        by_replica: dict[int, list[StageReport]] = {replica: [] for replica in replicas}
        for handle, worker_reports in zip(handles, values, strict=True):
            by_replica[handle.replica_idx].extend(worker_reports)
        replica_reports = tuple(
            tuple(sorted(by_replica[replica], key=lambda report: report.stage_idx)) for replica in replicas
        )
        return ExecutedStep(
            reports=replica_reports[0],
            actions_done_at=self.actions_done_at.wait(),
            clipped=clipped,
            replica_reports=replica_reports,
        )


def _is_forward_of(action: Action, stage_idx: int) -> bool:
    return action.kind is ActionKind.FORWARD and action.stage_idx == stage_idx


StageLabels = Callable[[int, int], str]
"""``labels(entry, stage_idx)``: how to name the worker of the stage a :class:`StageError` comes from, as
seen from the wait entry that failed (the stage's worker in that entry's replica)."""


def wait_all(
    pending: Sequence[tuple[str, str, torch.futures.Future]],
    timeout_s: float | None = None,
    labels: StageLabels | None = None,
    blame: Callable[[list[bool], int | None], int] | None = None,
    progress: Callable[[], Any] | None = None,
) -> list[Any]:
    """Wait for every ``(label, what, future)``; return their values in order.

    Raises :class:`StageFailure` for the first future to fail, or when none completes for ``timeout_s``
    seconds (a stuck stage: the run makes no progress). ``progress``, when given, is a probe polled while
    waiting whose value changes as the work advances (e.g. the bytes a checkpoint save has written): a
    change counts as progress too, so long work is bounded by its own progress, not by its duration.
    A :class:`StageError` names its origin (work that depends on a failed action fails with the original
    error); ``labels`` turn it into the report. A *secondary* one (a collective whose peer is gone) is
    named only if no other error arrives within a few seconds. For other errors (a process gone)
    and when stuck, ``blame(ok, failed)`` picks the entry to name from the flags of entries done without
    error and the failed entry's index (``None`` when stuck); by default the failed entry, or the first
    unfinished one.
    """
    changed = threading.Event()
    lock = threading.Lock()
    state: dict[str, Any] = {
        "left": len(pending),
        "first_error": None,
        "secondary": None,
        "progress_at": time.monotonic(),
    }
    last_probe = progress() if progress is not None else None
    ok = [False] * len(pending)

    def _on_done(index: int, future: torch.futures.Future) -> None:
        error = _error_of(future)
        with lock:
            state["left"] -= 1
            state["progress_at"] = time.monotonic()
            ok[index] = error is None
            if isinstance(error, StageError) and error.secondary:
                if state["secondary"] is None:
                    state["secondary"] = (index, error, time.monotonic())
                error = None  # wait a moment for the failure it is a consequence of
            if error is not None and state["first_error"] is None:
                state["first_error"] = (index, error)
            # Wake the waiter only when it has something to do: the watchdog reads progress_at when its
            # wait times out, so every other completion costs no thread switch.
            wake = state["left"] == 0 or error is not None
        if wake:
            changed.set()

    for index, (_, _, future) in enumerate(pending):
        future.add_done_callback(lambda fut, index=index: _on_done(index, fut))
    try:
        while True:
            with lock:
                if state["first_error"] is not None or state["left"] == 0:
                    break
                secondary = state["secondary"]
                if secondary is not None and time.monotonic() - secondary[2] >= _NAME_THE_CAUSE_S:
                    break
                idle_for = time.monotonic() - state["progress_at"]
            if stop_requested():
                raise RunStopped("stop requested")
            if progress is not None and (probed := progress()) != last_probe:
                last_probe, idle_for = probed, 0.0
                with lock:
                    state["progress_at"] = time.monotonic()
            if timeout_s is not None and idle_for >= timeout_s:
                with lock:
                    index = blame(list(ok), None) if blame is not None else ok.index(False)
                label, what, _ = pending[index]
                reason = f"no progress for {timeout_s:g} s (rpc.timeout_s): the stage is stuck"
                raise StageFailure(label, what, reason)
            wait_s = _POLL_STOP_S if timeout_s is None else min(_POLL_STOP_S, max(timeout_s - idle_for, 0.01))
            changed.wait(wait_s)
            changed.clear()
    except RunStopped:
        # torchrun stops the run as soon as a process dies; the error naming it is usually a moment away.
        deadline = time.monotonic() + _NAME_THE_CAUSE_S
        while state["first_error"] is None and time.monotonic() < deadline:
            changed.wait(0.05)
            changed.clear()
        if state["first_error"] is None and state["secondary"] is None:
            raise
    if state["first_error"] is None and state["secondary"] is not None:
        state["first_error"] = state["secondary"][:2]
    if state["first_error"] is not None:
        index, error = state["first_error"]
        label, what, _ = pending[index]
        if isinstance(error, StageError) and labels is not None:
            label, what = labels(index, error.stage_idx), error.action
        elif blame is not None:
            with lock:
                label, what, _ = pending[blame(list(ok), index)]
        raise StageFailure(label, what, error) from error
    return [future.wait() for _, _, future in pending]


def _error_of(future: torch.futures.Future) -> BaseException | None:
    """The error a done future carries, if any."""
    try:
        value = future.wait()
    except BaseException as error:  # noqa: BLE001 - reported to the waiting driver
        return error
    # A future failed with set_exception crosses RPC as a value holding the exception.
    return value if isinstance(value, BaseException) else None
