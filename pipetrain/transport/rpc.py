"""Stage workers over ``torch.distributed.rpc`` (TensorPipe); the only module that imports it.

Names: the driver is RPC worker ``driver`` (rank 0), stage ``k`` is worker ``stage<k>`` (rank ``k+1``).

The driver sends each stage its whole step in one request (:class:`RpcStageHandle`): the stage's
actions in schedule order, each with its input reference (a :class:`RemoteTensor` naming the action whose
output it consumes, or stage 0's micro-batch) and target. On the stage, :class:`StageServer` requests
every input from its producer at once, then runs the actions one at a time on a compute thread of its
own, each as soon as its input has arrived, and then steps the optimizer; the reply is the stage's
report. Inputs are *pulled* worker to worker (the producer answers a fetch when it has computed the
tensor), so activations and gradients never pass through the driver. The stage tells the driver how many
actions are done as it goes (:class:`_ProgressSender`), so that the driver can name the action a stage
was running when its process dies, and its watchdog sees progress.

No RPC handler blocks a thread: every handler is ``@rpc.functions.async_execution`` and returns a future
chained on what it needs, so any number of micro-batches runs on the default thread pool. Only the stage's
compute thread waits for inputs. It runs the forward, backward and optimizer step, rather than whichever
pool thread completed the last input: allocations then stay on one malloc arena and in one core's caches
(per-micro-batch compute of the benchmark MLP went from 43 to 34 ms on a 2-core machine). One request per
step rather than one per action also spares each action a round of RPC handling and thread hand-offs.
(RRefs are not used for the boundary tensors: an owner cannot await an RRef's value without blocking a
thread, and RRefs do not support CUDA tensors.)

Errors cross RPC as *values*: a handler answers with a picklable :class:`~pipetrain.failures.StageError`
instead of raising (RPC would re-create a raised exception from its message alone, and a future failed
with ``set_exception`` is sent as its value anyway). :func:`pipetrain.executor.wait_all` treats an
exception value as a failure and reports the stage and action it names.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.rpc as rpc

from pipetrain import boundary
from pipetrain.config import RpcConfig
from pipetrain.failures import StageError
from pipetrain.schedule import Action, ActionKind, Schedule, output_consumer
from pipetrain.stage import Stage
from pipetrain.timings import SpanCategory
from pipetrain.transport.handle import IssuedAction, completed

__all__ = [
    "DRIVER_NAME",
    "stage_worker_name",
    "RemoteTensor",
    "StageServer",
    "RpcStageHandle",
    "serve",
    "init_rpc",
    "shutdown_rpc",
]

DRIVER_NAME = "driver"

# Calls carry no RPC deadline (0 = none): a stage may legitimately be busy for long. The driver's
# watchdog (no progress for rpc.timeout_s, see pipetrain.executor.wait_all) catches a stuck pipeline.
_NO_DEADLINE = 0


def stage_worker_name(stage_idx: int) -> str:
    """The RPC worker name of stage ``stage_idx``."""
    return f"stage{stage_idx}"


@dataclass(frozen=True)
class RemoteTensor:
    """A reference to the tensor that ``action`` produces (or produced) on RPC worker ``worker``."""

    worker: str
    action: str


class StageServer:
    """Runs one stage's actions, a step's worth at a time, as the driver sends them over RPC."""

    def __init__(self, stage: Stage, schedule: Schedule) -> None:
        self.stage = stage
        self._order = list(schedule[stage.stage_idx])
        self._lock = threading.Lock()
        self._outbox: dict[Action, torch.futures.Future] = {}
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stage{stage.stage_idx}")

    def run_step(self, step_id: int, work: Sequence[tuple[Action, Any, Any]]) -> torch.futures.Future:
        """Run ``work`` (each action with its input reference and target), then step the optimizer.

        The actions must be the stage's schedule, in order. Every input is requested from its producer at
        once; the compute thread then runs the actions one by one, each as soon as its input is there,
        reporting progress to the driver as it goes. The future carries the stage's report, or the
        :class:`StageError` of what failed.
        """
        actions = [action for action, _, _ in work]
        if actions != self._order:
            raise RuntimeError(
                f"stage {self.stage.stage_idx}: received actions {list(map(str, actions))}, but its "
                f"schedule is {list(map(str, self._order))}"
            )
        received = time.time()
        arrivals = [self._input_future(input_ref) for _, input_ref, _ in work]
        progress = _ProgressSender(self.stage.stage_idx, step_id)
        reported: torch.futures.Future = torch.futures.Future()
        self._compute.submit(self._run, work, arrivals, received, progress, reported)
        return reported

    def _run(
        self,
        work: Sequence[tuple[Action, Any, Any]],
        arrivals: Sequence[torch.futures.Future],
        received: float,
        progress: _ProgressSender,
        reported: torch.futures.Future,
    ) -> None:
        """The step on the compute thread (waiting here for an input blocks no RPC thread)."""
        free_at = received
        position = 0
        running = "optimizer step"
        try:
            for position, ((action, _, target), arrival) in enumerate(zip(work, arrivals, strict=True)):
                running = f"action {action}"
                tensor, produced_at, arrived_at = _result(arrival)
                self._record_idle(action, free_at, produced_at, arrived_at)
                if action.kind == ActionKind.FORWARD:
                    output = self.stage.forward(action.mb_idx, tensor, target)
                else:
                    output = self.stage.backward(action.mb_idx, tensor)
                if output_consumer(action, self.stage.num_stages) is not None:
                    self._outbox_future(action).set_result((boundary.to_cpu(output), time.time()))
                free_at = time.time()
                progress.advance(position + 1)
            position, running = len(work), "optimizer step"
            report = self.stage.step()
        except Exception as error:  # every waiter learns of the failure, nothing waits forever
            failure = StageError.wrap(error, self.stage.stage_idx, running)
            for action, _, _ in work[position:]:
                if output_consumer(action, self.stage.num_stages) is not None:
                    outbox = self._outbox_future(action)
                    if not outbox.done():
                        outbox.set_exception(failure)
            reported.set_result(failure)
            return
        reported.set_result(report)

    def fetch(self, action: Action) -> torch.futures.Future:
        """The future of ``(tensor, produced_at)`` for the output of ``action`` (once, for its consumer)."""
        future = self._outbox_future(action)

        def _release(done: torch.futures.Future) -> Any:
            with self._lock:
                self._outbox.pop(action, None)
            return _result_or_error(done)

        return future.then(_release)

    def _input_future(self, input_ref: Any) -> torch.futures.Future:
        """Future of ``(tensor, produced_at, arrived_at)`` for an action's input."""
        if not isinstance(input_ref, RemoteTensor):
            now = time.time()
            return completed((input_ref, now, now))
        request = rpc.rpc_async(input_ref.worker, _fetch, args=(input_ref.action,), timeout=_NO_DEADLINE)

        def _arrived(reply: torch.futures.Future) -> Any:
            value = _result_or_error(reply)
            if isinstance(value, StageError):
                return value
            if isinstance(value, BaseException):  # the producer's process is gone or unreachable
                producer = Action.parse(input_ref.action).stage_idx
                return StageError(producer, f"action {input_ref.action}", f"{type(value).__name__}: {value}")
            return (*value, time.time())

        return request.then(_arrived)

    def _record_idle(self, action: Action, free_at: float, produced_at: float, arrived_at: float) -> None:
        if arrived_at <= free_at:
            return
        transfer_from = min(max(free_at, produced_at), arrived_at)
        if transfer_from > free_at:
            self.stage.record_span(SpanCategory.WAIT, str(action), free_at, transfer_from)
        self.stage.record_span(SpanCategory.TRANSFER, str(action), transfer_from, arrived_at)

    def _outbox_future(self, action: Action) -> torch.futures.Future:
        with self._lock:
            return self._outbox.setdefault(action, torch.futures.Future())


def _result(future: torch.futures.Future) -> Any:
    """The future's value; raises its error, including one that arrived as a value (see module doc)."""
    value = future.wait()
    if isinstance(value, BaseException):
        raise value
    return value


def _result_or_error(future: torch.futures.Future) -> Any:
    """The future's value, or its error *as a value*: raising inside a callback would lose its type."""
    try:
        return _result(future)
    except Exception as error:
        return error


_SERVER: StageServer | None = None


def serve(server: StageServer) -> None:
    """Make ``server`` the stage this process serves (call before :func:`init_rpc`)."""
    global _SERVER
    _SERVER = server


def _server() -> StageServer:
    if _SERVER is None:
        raise RuntimeError("this RPC worker serves no stage")
    return _SERVER


@rpc.functions.async_execution
def _run_step(step_id: int, work: list[tuple[str, Any, Any]]) -> torch.futures.Future:
    server = _server()
    try:
        return server.run_step(step_id, [(Action.parse(text), ref, target) for text, ref, target in work])
    except Exception as error:
        return completed(StageError.wrap(error, server.stage.stage_idx, "step request"))


@rpc.functions.async_execution
def _fetch(action_text: str) -> torch.futures.Future:
    return _server().fetch(Action.parse(action_text))


class _ProgressSender:
    """A stage's reports to the driver of how many of the step's actions are done.

    At most one report is in flight: one that would queue behind it is merged into the next, so a stage
    of short actions sends fewer reports than it runs actions, while the driver lags by at most a round
    trip (it names the first action it has not heard finish when a stage's process dies).
    """

    def __init__(self, stage_idx: int, step_id: int) -> None:
        self._stage_idx = stage_idx
        self._step_id = step_id
        self._lock = threading.Lock()
        self._done = 0
        self._sent = 0
        self._in_flight = False

    def advance(self, done: int) -> None:
        """``done`` actions of the step are done."""
        with self._lock:
            self._done = done
            if self._in_flight:
                return
            self._in_flight = True
            self._sent = done
        self._send(done)

    def _send(self, done: int) -> None:
        reply = rpc.rpc_async(
            DRIVER_NAME, _progress, args=(self._stage_idx, self._step_id, done), timeout=_NO_DEADLINE
        )
        reply.add_done_callback(self._acknowledged)

    def _acknowledged(self, _: torch.futures.Future) -> None:
        with self._lock:
            if self._done == self._sent:
                self._in_flight = False
                return
            done = self._sent = self._done
        self._send(done)


class _ProgressTracker:
    """The driver's side of one stage's step: completes the ``done`` futures of its actions."""

    def __init__(self, step_id: int, done: Sequence[torch.futures.Future]) -> None:
        self.step_id = step_id
        self._done = list(done)
        self._completed = 0
        self._lock = threading.Lock()

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
        """The stage answered the step: every action is done, or whatever is not failed."""
        error = _result_or_error(reply)
        if isinstance(error, BaseException):
            self.advance(0, error)
        else:
            self.advance(len(self._done))


_TRACKERS: dict[int, _ProgressTracker] = {}


def _progress(stage_idx: int, step_id: int, done: int) -> None:
    tracker = _TRACKERS.get(stage_idx)
    if tracker is not None and tracker.step_id == step_id:  # a late report of an earlier step is moot
        tracker.advance(done)


class RpcStageHandle:
    """The driver's handle on stage ``stage_idx``, served by RPC worker ``stage<k>`` at ``rank``.

    It sends a step's actions in one request, when :meth:`step` is called; the stage reports progress,
    which completes each issued action's ``done`` future.
    """

    def __init__(self, stage_idx: int, rank: int) -> None:
        self.stage_idx = stage_idx
        self.rank = rank
        self.worker = stage_worker_name(stage_idx)
        self._work: list[tuple[str, Any, Any]] = []
        self._done: list[torch.futures.Future] = []
        self._steps_sent = 0

    @property
    def label(self) -> str:
        """``"stage <k> (rank <r>)"``."""
        return f"stage {self.stage_idx} (rank {self.rank})"

    def issue(self, action: Action, input_ref: Any, target: Any | None) -> IssuedAction:
        """Add ``action`` to the step's request; its output stays on the worker (a :class:`RemoteTensor`)."""
        done: torch.futures.Future = torch.futures.Future()
        self._work.append((str(action), input_ref, target))
        self._done.append(done)
        return IssuedAction(output=RemoteTensor(self.worker, str(action)), done=done)

    def step(self) -> torch.futures.Future:
        """Send the issued actions; the worker runs them, then steps its optimizer and sends its report."""
        self._steps_sent += 1
        tracker = _ProgressTracker(self._steps_sent, self._done)
        _TRACKERS[self.stage_idx] = tracker
        work, self._work, self._done = self._work, [], []
        reply = rpc.rpc_async(self.worker, _run_step, args=(self._steps_sent, work), timeout=_NO_DEADLINE)
        reply.add_done_callback(tracker.finish)
        return reply

    def call(self, fn: Callable[..., Any], *args: Any) -> torch.futures.Future:
        """Run ``fn(stage, *args)`` on the worker (checkpoints and other whole-stage requests)."""
        return rpc.rpc_async(self.worker, _call_on_server, args=(fn, *args), timeout=_NO_DEADLINE)


def _call_on_server(fn: Callable[..., Any], *args: Any) -> Any:
    server = _server()
    try:
        return fn(server.stage, *args)
    except Exception as error:
        return StageError.wrap(error, server.stage.stage_idx, getattr(fn, "__name__", "request"))


def init_rpc(name: str, rank: int, world_size: int, settings: RpcConfig) -> None:
    """Join the RPC group (rendezvous through torchrun's ``MASTER_ADDR`` / ``MASTER_PORT``)."""
    options = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=settings.num_worker_threads,
        rpc_timeout=settings.timeout_s,
        init_method="env://",
        _transports=list(settings.transports) if settings.transports else None,
        _channels=list(settings.channels) if settings.channels else None,
    )
    with warnings.catch_warnings():
        # torch's TensorPipe backend gathers the workers' device maps by passing its own
        # ProcessGroupGloo to all_gather_object, which warns about that (deprecated) use on every rank;
        # nothing a caller can change, so only that warning is silenced, only here.
        warnings.filterwarnings("ignore", message="You are using a Backend .* as a ProcessGroup")
        rpc.init_rpc(name, rank=rank, world_size=world_size, rpc_backend_options=options)


def shutdown_rpc(graceful: bool = True) -> None:
    """Leave the RPC group; ``graceful`` waits for every worker to finish its outstanding work."""
    rpc.shutdown(graceful=graceful)
