"""One worker's share of every step: its stages' actions in schedule order, on one compute thread.

:class:`WorkerRunner` is the only code that runs actions, whatever carries them: the in-process transport
and the RPC transport both drive it. Per step it receives its worker's actions (with stage 0's
micro-batches and the last stage's targets), requests every input that another worker produces at once,
then runs the actions one at a time, each as soon as its input is there, with one dispatch over the action
kinds (``F``, ``B``, and the split backward's ``I`` and ``W``). The driver may hand out the next step
before this one is done (``train.submit_ahead``): steps start in the order of their ids, whatever order
their requests arrive in, and outputs are kept by step and action. An output whose consumer is a stage of the
same worker is handed over in-process (no copy, no transport); one whose consumer lives elsewhere waits
in the outbox until that worker fetches it, or, given a :class:`BoundaryChannel` (the c10d data plane), is
sent to it.

The optimizer step is a phase of its own: the driver asks for it (:meth:`WorkerRunner.optimizer_step`)
after sending the actions, and each stage steps as soon as its own actions are done and the request is
there, so a stage that finishes early steps while the others drain. With global gradient clipping the
driver first asks for the stages' gradient norms (:meth:`WorkerRunner.gradient_norms`, answered once the
worker's actions are done), then for the optimizer step with the scale they imply. With replicas
(:mod:`pipetrain.gradient_sync`), each stage starts averaging its gradients with its copies as soon as its
own actions are done, and steps once the average is there.

A step can run under ``torch.profiler`` (:mod:`pipetrain.profiling`): the profiler starts on the compute
thread before the step's first action and stops after its last optimizer step, and actions, waits for
inputs and optimizer steps run under ``record_function`` scopes named for them. Other steps make no
profiler call at all.

Errors travel as values (:class:`~pipetrain.failures.StageError`): every future a runner hands out
carries either its result or the error that stopped it, so nothing waits forever on a failed worker.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from pipetrain import boundary
from pipetrain.failures import StageError
from pipetrain.gradient_sync import GradientSync
from pipetrain.profiling import StepProfiler, WorkerProfile
from pipetrain.progress import ActionWatch
from pipetrain.schedule import Action, ActionKind, Schedule, input_dependency, output_consumer
from pipetrain.stage import Stage
from pipetrain.timings import SpanCategory, StageReport

__all__ = [
    "Work",
    "RemoteFetch",
    "BoundaryChannel",
    "OptimizerStepRequest",
    "PLAIN_STEP",
    "WorkerRunner",
    "completed",
    "result_or_error",
]

Work = Sequence[tuple[Action, Any, Any]]
"""A worker's actions of one step, in schedule order, each with its driver-given input and target."""

RemoteFetch = Callable[[int, int, Action], torch.futures.Future]
"""``fetch(worker_idx, step_id, action)``: a future of ``(output, produced_at)`` of ``action`` of step
``step_id`` on another worker."""


class Awaitable(Protocol):
    """Something the compute thread waits for: a future, or a value on its way over a channel."""

    def wait(self) -> Any:
        """Block until it is in; its value (errors included, as values or raised)."""
        ...


class BoundaryChannel(Protocol):
    """Carries boundary values between workers by sending them (instead of the consumer fetching them from
    the outbox): :class:`pipetrain.transport.p2p.P2PChannel`, :class:`pipetrain.transport.shm.ShmChannel`."""

    def send(self, step_id: int, worker: int, action: Action, payload: Any) -> None:
        """Send ``action``'s output, ``(value, produced_at)`` or the error that stopped it, to ``worker``;
        the value's tensors lie on the producing stage's device (the channel copies them out)."""
        ...

    def receive(self, step_id: int, worker: int, action: Action) -> Awaitable:
        """``action``'s output from ``worker``: waiting gives ``(value, produced_at)``, or the error as a
        value. The wait runs on the thread that needs the value (no hand-off through another thread)."""
        ...


_SYNC = "gradient all-reduce across replicas"
_LOCAL = object()
_NOT_PROFILED = nullcontext()
"""The scope of an action, a wait or an optimizer step when the step is not profiled."""


def completed(value: Any) -> torch.futures.Future:
    """A future that already holds ``value``."""
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(value)
    return future


def result_or_error(future: torch.futures.Future) -> Any:
    """The future's value, or its error *as a value* (raising inside a callback would lose its type)."""
    try:
        return _result(future)
    except Exception as error:
        return error


def _result(future: Awaitable) -> Any:
    """The future's value; raises its error, including one that arrived as a value."""
    value = future.wait()
    if isinstance(value, BaseException):
        raise value
    return value


@dataclass(frozen=True)
class OptimizerStepRequest:
    """How the stages of a worker take a step's optimizer step."""

    grad_scale: float = 1.0
    """Factor on every gradient before stepping (global gradient-norm clipping)."""
    skip: bool = False
    """Drop the gradients without stepping (they are not finite somewhere in the pipeline)."""


PLAIN_STEP = OptimizerStepRequest()
"""Step on the gradients as they are (no clipping)."""


@dataclass
class _StepState:
    """The two halves of one step on a worker: its actions, and its optimizer step."""

    actions_done: torch.futures.Future = field(default_factory=torch.futures.Future)
    gradients_ready: torch.futures.Future = field(default_factory=torch.futures.Future)
    """Done once the actions are done and, with replicas, the gradients averaged (``None``, or the error)."""
    step_requested: torch.futures.Future = field(default_factory=torch.futures.Future)
    reports: torch.futures.Future = field(default_factory=torch.futures.Future)


@dataclass(frozen=True)
class _Sync:
    """One stage's gradient average across replicas, in flight."""

    started_at: float
    outcome: torch.futures.Future
    """When the average was done (``time.time()``), or the :class:`StageError` that stopped it."""


class WorkerRunner:
    """Runs worker ``worker_idx``'s actions of ``schedule`` on ``stages`` (stage index -> stage)."""

    def __init__(
        self,
        worker_idx: int,
        stages: Mapping[int, Stage],
        schedule: Schedule,
        gradient_sync: GradientSync | None = None,
    ) -> None:
        self.worker_idx = worker_idx
        self.gradient_sync = gradient_sync
        """With replicas: averages each stage's gradients with its copies once its actions are done."""
        self.stages = dict(stages)
        self.schedule = schedule
        self._order = tuple(schedule[worker_idx])
        self._forward_order = tuple(schedule.forward_only()[worker_idx])
        expected = set(schedule.stages_of(worker_idx))
        if set(self.stages) != expected:
            raise ValueError(
                f"worker {worker_idx}: holds stages {sorted(self.stages)} but the schedule places "
                f"{sorted(expected)} on it"
            )
        self._fetch_remote: RemoteFetch | None = None
        self._channel: BoundaryChannel | None = None
        self._lock = threading.Lock()
        self._outbox: dict[tuple[int, Action], torch.futures.Future] = {}
        """Outputs for other workers by step and action, each held from the first of its production and its
        fetch to the second: a worker may be handed the next step before this one is done, and its requests
        for that step's inputs may come in before this step's."""
        self._steps: dict[int, _StepState] = {}
        self._profiler: StepProfiler | None = None
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"worker{worker_idx}")
        self._start_lock = threading.Lock()
        self._startable: dict[int, Callable[[], None]] = {}
        self._next_step = 1
        """The id of the next step to start: the driver numbers a worker's steps 1, 2, ..."""
        self._watch = ActionWatch(f"worker{worker_idx}-reports")

    def connect(self, fetch_remote: RemoteFetch, channel: BoundaryChannel | None = None) -> None:
        """How this worker pulls the outputs of other workers' actions; with ``channel``, how it sends and
        receives them instead (outputs then skip the outbox)."""
        self._fetch_remote = fetch_remote
        self._channel = channel

    def run_actions(
        self,
        step_id: int,
        work: Work,
        progress: Callable[[int], None],
        profile: bool = False,
        evaluate: bool = False,
    ) -> torch.futures.Future:
        """Start the step's actions; the future completes (``None``, or the error) when all have run.

        ``progress(n)`` says that the first ``n`` actions are done, from the worker's report thread
        (:mod:`pipetrain.progress`): when action ``n`` has been under way for 10 ms, or as a heartbeat
        every 0.25 s; short actions go unreported, as the returned future says all are done. The end of
        the last action is reported from the compute thread, before the optimizer steps. With
        ``profile``, the step runs under ``torch.profiler`` until its optimizer steps are done; then
        :meth:`collect_profile` hands the profile out. With ``evaluate``, ``work`` is the forward actions
        only (:meth:`Schedule.forward_only`), run by :meth:`Stage.evaluate`; no optimizer step follows,
        :meth:`evaluation_reports` collects the results.
        """
        actions = tuple(action for action, _, _ in work)
        expected = self._forward_order if evaluate else self._order
        if actions != expected:
            raise RuntimeError(
                f"worker {self.worker_idx}: received actions {list(map(str, actions))}, but its schedule "
                f"is {list(map(str, expected))}"
            )
        received = time.time()
        done = self._step(step_id).actions_done
        devices = [stage.device for stage in self.stages.values()]
        profiler = StepProfiler(self.worker_idx, devices) if profile else None

        def _start() -> None:
            arrivals = [self._arrival(step_id, action, value) for action, value, _ in work]
            if evaluate:
                self._compute.submit(self._evaluate, step_id, work, arrivals, progress, done)
            else:
                self._compute.submit(self._run, step_id, work, arrivals, received, progress, done, profiler)

        # The driver may send a step before the previous one is done, and two requests may reach this
        # worker's RPC threads in either order: steps start (request their inputs, queue on the compute
        # thread) strictly in step order.
        with self._start_lock:
            self._startable[step_id] = _start
            while self._next_step in self._startable:
                self._startable.pop(self._next_step)()
                self._next_step += 1
        return done

    def optimizer_step(
        self, step_id: int, request: OptimizerStepRequest = PLAIN_STEP
    ) -> torch.futures.Future:
        """Step every stage's optimizer once its actions of ``step_id`` are done, as ``request`` says.

        The future carries the stages' :class:`StageReport` list (in stage order), or the error.
        """
        state = self._step(step_id)
        if not state.step_requested.done():
            state.step_requested.set_result(request)
        return state.reports

    def evaluation_reports(self, step_id: int) -> torch.futures.Future:
        """Once the evaluation actions of ``step_id`` are done: the stages' evaluation reports (in stage
        order), or the error."""
        state = self._step(step_id)
        if not state.step_requested.done():
            state.step_requested.set_result(None)
        return state.reports

    def gradient_norms(self, step_id: int) -> torch.futures.Future:
        """Once the actions of ``step_id`` are done: stage index -> that stage's gradient norms
        (:meth:`Stage.gradient_norms`), or the error.

        Asked before :meth:`optimizer_step` (the stages wait for it), so the gradients are complete (with
        replicas: averaged) and untouched; computed on the thread that finishes them, or on the caller's
        when done.
        """

        def _norms(done: torch.futures.Future) -> Any:
            error = result_or_error(done)
            if isinstance(error, BaseException):
                return error
            try:
                return {idx: stage.gradient_norms() for idx, stage in self.stages.items()}
            except Exception as failure:
                return StageError.wrap(failure, min(self.stages), "gradient norms")

        return self._step(step_id).gradients_ready.then(_norms)

    def fetch(self, step_id: int, action: Action) -> torch.futures.Future:
        """A future of ``(output, produced_at)`` of ``action`` of step ``step_id``: once, for its consumer on
        another worker."""
        key = (step_id, action)
        with self._lock:
            future = self._outbox.get(key)
            if future is None:  # not produced yet: the producer completes this one
                future = self._outbox[key] = torch.futures.Future()
            elif future.done():
                del self._outbox[key]
        return future

    def collect_profile(self) -> WorkerProfile:
        """The profile of this worker's last profiled step (each profile is handed out once)."""
        with self._lock:
            profiler, self._profiler = self._profiler, None
        if profiler is None:
            raise RuntimeError(f"worker {self.worker_idx}: no profiled step to collect")
        return profiler.export()

    def each_stage(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """``fn(stage, *args)`` for every stage of this worker, in stage order."""
        return [fn(self.stages[idx], *args) for idx in sorted(self.stages)]

    def _step(self, step_id: int) -> _StepState:
        with self._lock:
            return self._steps.setdefault(step_id, _StepState())

    def _arrival(self, step_id: int, action: Action, value: Any) -> Any:
        """The future of ``(input, produced_at, arrived_at)`` of ``action``, or ``_LOCAL``."""
        producer = input_dependency(action, self.schedule)
        if producer is None:
            now = time.time()
            return completed((value, now, now))
        producer_worker = self.schedule.worker_of(producer.stage_idx)
        if producer_worker == self.worker_idx:
            return _LOCAL
        assert self._fetch_remote is not None, "connect() first"

        def _arrived(result: Any) -> Any:
            if isinstance(result, StageError):
                return result
            if isinstance(result, BaseException):  # the producer's process is gone or unreachable
                return StageError(producer.stage_idx, _what(producer), f"{type(result).__name__}: {result}")
            return (*result, time.time())

        if self._channel is not None:
            return _Received(self._channel.receive(step_id, producer_worker, producer), _arrived)
        return _Received(self._fetch_remote(producer_worker, step_id, producer), _arrived)

    def _run(
        self,
        step_id: int,
        work: Work,
        arrivals: Sequence[Any],
        received: float,
        progress: Callable[[int], None],
        done: torch.futures.Future,
        profiler: StepProfiler | None = None,
    ) -> None:
        """The step on the compute thread (waiting here for an input blocks no transport thread)."""
        state = self._step(step_id)
        remaining = Counter(action.stage_idx for action, _, _ in work)
        reports: dict[int, StageReport] = {}
        syncs: dict[int, _Sync] = {}
        self._watch.begin(progress)
        local_outputs: dict[Action, Any] = {}
        # The request may have come while the previous step ran: the step begins when both are so.
        started_at = free_at = max(received, time.time())
        position, failed_stage, running = 0, min(self.stages), "optimizer step"
        try:
            if profiler is not None:
                failed_stage, running = min(self.stages), "starting the profiler"
                profiler.start()
            for position, ((action, _, target), arrival) in enumerate(zip(work, arrivals, strict=True)):
                failed_stage, running = action.stage_idx, _what(action)
                if arrival is _LOCAL:
                    value = local_outputs.pop(input_dependency(action, self.schedule))
                else:
                    value, produced_at, arrived_at = self._await_input(action, arrival, profiler)
                    self._record_idle(action, free_at, produced_at, arrived_at)
                with _NOT_PROFILED if profiler is None else profiler.action(action):
                    output = self._dispatch(action, value, target)
                self._hand_over(step_id, action, output, local_outputs)
                free_at = time.time()
                if position + 1 < len(work):
                    self._watch.done(position + 1)
                else:
                    self._watch.finished(len(work))
                remaining[action.stage_idx] -= 1
                if remaining[action.stage_idx] == 0 and self.gradient_sync is not None:
                    failed_stage, running = action.stage_idx, _SYNC
                    syncs[action.stage_idx] = self._start_sync(action.stage_idx)
                elif remaining[action.stage_idx] == 0 and state.step_requested.done():
                    failed_stage, running = action.stage_idx, "optimizer step"
                    reports[action.stage_idx] = self._step_stage(
                        action.stage_idx, state.step_requested.value(), profiler
                    )
            position = len(work)
            self._watch.end()
            done.set_result(None)
            _when_all_done([sync.outcome for sync in syncs.values()], state.gradients_ready)
            request = state.step_requested.wait()
            for stage_idx in sorted(self.stages):
                if stage_idx not in reports:
                    failed_stage, running = stage_idx, _SYNC
                    sync_figures = self._finish_sync(syncs[stage_idx]) if stage_idx in syncs else {}
                    failed_stage, running = stage_idx, "optimizer step"
                    report = self._step_stage(stage_idx, request, profiler)
                    reports[stage_idx] = dataclasses.replace(report, **sync_figures)
            for stage_idx, report in reports.items():
                reports[stage_idx] = dataclasses.replace(report, started_at=started_at)
            if profiler is not None:
                running = "stopping the profiler"
                profiler.stop()
                with self._lock:
                    self._profiler = profiler
        except Exception as error:  # every waiter learns of the failure, nothing waits forever
            self._watch.end()
            if profiler is not None:
                profiler.discard()
            failure = StageError.wrap(error, failed_stage, running)
            self._fail_consumers(step_id, work[position:], failure)
            if not done.done():
                done.set_result(failure)
            if not state.gradients_ready.done():
                state.gradients_ready.set_result(failure)
            state.reports.set_result(failure)  # kept: a late optimizer-step request gets the failure too
            return
        with self._lock:
            self._steps = {key: value for key, value in self._steps.items() if value is not state}
        state.reports.set_result([reports[idx] for idx in sorted(reports)])

    def _evaluate(
        self,
        step_id: int,
        work: Work,
        arrivals: Sequence[Any],
        progress: Callable[[int], None],
        done: torch.futures.Future,
    ) -> None:
        """An evaluation pass on the compute thread: forward actions only, then the stages' results."""
        state = self._step(step_id)
        local_outputs: dict[Action, Any] = {}
        self._watch.begin(progress)
        position, failed_stage, running = 0, min(self.stages), "evaluation"
        try:
            for position, ((action, _, target), arrival) in enumerate(zip(work, arrivals, strict=True)):
                failed_stage, running = action.stage_idx, f"evaluation {_what(action)}"
                if arrival is _LOCAL:
                    value = local_outputs.pop(input_dependency(action, self.schedule))
                else:
                    value = _result(arrival)[0]
                output = self.stages[action.stage_idx].evaluate(action.mb_idx, value, target)
                self._hand_over(step_id, action, output, local_outputs)
                self._watch.done(position + 1)
            position = len(work)
            self._watch.end()
            done.set_result(None)
            state.step_requested.wait()
            reports = [self.stages[idx].evaluation_report() for idx in sorted(self.stages)]
        except Exception as error:  # every waiter learns of the failure, nothing waits forever
            self._watch.end()
            failure = StageError.wrap(error, failed_stage, running)
            self._fail_consumers(step_id, work[position:], failure)
            if not done.done():
                done.set_result(failure)
            state.reports.set_result(failure)
            return
        with self._lock:
            self._steps = {key: value for key, value in self._steps.items() if value is not state}
        state.reports.set_result(reports)

    def _await_input(self, action: Action, arrival: Awaitable, profiler: StepProfiler | None) -> Any:
        """``(input, produced_at, arrived_at)`` of ``action`` once there (from a worker or the driver)."""
        producer = input_dependency(action, self.schedule)
        if profiler is None or producer is None:  # no producer: a micro-batch the driver sent with the step
            return _result(arrival)
        producer_worker = self.schedule.worker_of(producer.stage_idx)
        with profiler.wait(action, producer_worker):
            value, produced_at, arrived_at = _result(arrival)
        profiler.received(action, producer_worker, produced_at, arrived_at)
        return value, produced_at, arrived_at

    def _start_sync(self, stage_idx: int) -> _Sync:
        """Start averaging stage ``stage_idx``'s gradients with its copies in the other replicas."""
        assert self.gradient_sync is not None
        started_at = time.time()
        try:
            averaged = self.gradient_sync.start(self.stages[stage_idx])
        except Exception as error:
            averaged = torch.futures.Future()
            averaged.set_exception(error)

        def _outcome(future: torch.futures.Future) -> Any:
            try:
                future.wait()
            except Exception as error:
                failure = StageError.wrap(error, stage_idx, _SYNC)
                failure.secondary = True  # a replica's peer is usually what failed
                return failure
            return time.time()

        return _Sync(started_at, averaged.then(_outcome))

    @staticmethod
    def _finish_sync(sync: _Sync) -> dict[str, float]:
        """Wait for a stage's average; its figures for the stage's report (raises its error)."""
        waited_from = time.time()
        done_at = _result(sync.outcome)
        return {
            "allreduce_s": max(done_at - sync.started_at, 0.0),
            "allreduce_exposed_s": max(done_at - waited_from, 0.0),
        }

    def _step_stage(
        self, stage_idx: int, request: OptimizerStepRequest, profiler: StepProfiler | None
    ) -> StageReport:
        """Step stage ``stage_idx``'s optimizer as ``request`` says; its report."""
        with _NOT_PROFILED if profiler is None else profiler.optimizer_step(stage_idx):
            return self.stages[stage_idx].step(request.grad_scale, request.skip)

    def _dispatch(self, action: Action, value: Any, target: Any) -> Any:
        """Run ``action`` on its stage: the one place that maps action kinds to stage methods."""
        stage = self.stages[action.stage_idx]
        kind = action.kind
        if kind is ActionKind.FORWARD:
            return stage.forward(action.mb_idx, value, target)
        if kind is ActionKind.BACKWARD:
            return stage.backward(action.mb_idx, value)
        if kind is ActionKind.INPUT_GRAD:
            return stage.backward_input(action.mb_idx, value)
        if kind is ActionKind.WEIGHT_GRAD:
            return stage.backward_weight(action.mb_idx)
        raise AssertionError(f"unknown action kind {kind!r}")

    def _hand_over(self, step_id: int, action: Action, output: Any, local_outputs: dict[Action, Any]) -> None:
        """Keep ``output`` for a consumer on this worker, or pass it on to another worker (sent, or put in
        the outbox until it is fetched)."""
        consumer = output_consumer(action, self.schedule)
        if consumer is None:
            return
        consumer_worker = self.schedule.worker_of(consumer.stage_idx)
        if consumer_worker == self.worker_idx:
            local_outputs[action] = output
            return
        self.stages[action.stage_idx].record_sent(
            sum(t.numel() * t.element_size() for t in boundary.tensor_leaves(output))
        )
        if self._channel is not None:  # it copies the value out of the stage's device itself
            self._channel.send(step_id, consumer_worker, action, (output, time.time()))
        else:
            self._put_out(step_id, action, (boundary.to_cpu(output), time.time()))

    def _fail_consumers(self, step_id: int, work: Work, failure: StageError) -> None:
        """Tell the consumers on other workers of the outputs that ``failure`` stopped."""
        for action, _, _ in work:
            consumer = output_consumer(action, self.schedule)
            if consumer is None or self.schedule.worker_of(consumer.stage_idx) == self.worker_idx:
                continue
            if self._channel is not None:
                try:
                    self._channel.send(step_id, self.schedule.worker_of(consumer.stage_idx), action, failure)
                except Exception:  # the channel itself broke: the consumer's receive fails on its own
                    return
                continue
            self._put_out(step_id, action, failure)

    def _record_idle(self, action: Action, free_at: float, produced_at: float, arrived_at: float) -> None:
        if arrived_at <= free_at:
            return
        stage = self.stages[action.stage_idx]
        transfer_from = min(max(free_at, produced_at), arrived_at)
        if transfer_from > free_at:
            stage.record_span(SpanCategory.WAIT, str(action), free_at, transfer_from)
        stage.record_span(SpanCategory.TRANSFER, str(action), transfer_from, arrived_at)

    def _put_out(self, step_id: int, action: Action, payload: Any) -> None:
        """Hand ``payload`` to the fetch of ``action``'s output: at once if the fetch came first, else keep
        it until the fetch comes. No callback runs on the way, here or on the fetching thread."""
        key = (step_id, action)
        with self._lock:
            fetched = self._outbox.get(key)
            if fetched is None:
                self._outbox[key] = completed(payload)
                return
            if fetched.done():  # put out already (a failure after the hand-over): the first one stands
                return
            del self._outbox[key]
        fetched.set_result(payload)


class _Received:
    """An input on its way from another worker (a fetch's reply, or a value over a
    :class:`BoundaryChannel`): waited for on the compute thread, then ``then`` applied there to what came,
    or to the error that stopped it (as a future's ``then`` would, without another thread to run it)."""

    def __init__(self, incoming: Awaitable, then: Callable[[Any], Any]) -> None:
        self._incoming = incoming
        self._then = then

    def wait(self) -> Any:
        try:
            value = self._incoming.wait()
        except Exception as error:  # the producer's process is gone or unreachable
            value = error
        return self._then(value)


def _when_all_done(outcomes: Sequence[torch.futures.Future], target: torch.futures.Future) -> None:
    """Complete ``target`` once every outcome is in: with the first error among them, else ``None``."""

    def _complete(_: torch.futures.Future) -> None:
        errors = [
            value for value in (outcome.value() for outcome in outcomes) if isinstance(value, Exception)
        ]
        if not target.done():
            target.set_result(errors[0] if errors else None)

    if not outcomes:
        _complete(completed(None))
        return
    torch.futures.collect_all(list(outcomes)).add_done_callback(_complete)


def _what(action: Action) -> str:
    """How failures name an action: ``"action 3F2 (stage 3)"``."""
    return f"action {action} (stage {action.stage_idx})"
