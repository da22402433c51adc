"""Stage workers over ``torch.distributed.rpc`` (TensorPipe); the only module that imports it.

Names: the driver is RPC worker ``driver`` (rank 0), stage ``k`` is worker ``stage<k>`` (rank ``k+1``).

The driver issues every action of a step at once (:class:`RpcStageHandle`); each carries a
:class:`RemoteTensor` naming the action whose output it consumes. On the stage, :class:`StageServer`
runs the actions one at a time in schedule order: an action starts once the stage's previous action is
done and its input has arrived. Inputs are *pulled* worker to worker: the consumer asks the producer for
the tensor as soon as the action is issued, and the producer answers when it has computed it, so
activations and gradients never pass through the driver.

No RPC handler blocks a thread: every handler is ``@rpc.functions.async_execution`` and returns a future
that is chained on the futures it needs, so any number of micro-batches runs on the default thread pool.
The compute runs on one thread of the stage's own (forward, backward, optimizer step), not on whichever
pool thread completed the last input: allocations then stay on one malloc arena and in one core's caches
(per-micro-batch compute of the benchmark MLP went from 43 to 34 ms on a 2-core machine).
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.rpc as rpc

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
    """Runs one stage's actions, in schedule order, as the driver issues them over RPC."""

    def __init__(self, stage: Stage, schedule: Schedule) -> None:
        self.stage = stage
        self._positions = {action: pos for pos, action in enumerate(schedule[stage.stage_idx])}
        self._lock = threading.Lock()
        self._done: dict[int, torch.futures.Future] = {}
        self._free_at: dict[int, float] = {}
        self._outbox: dict[Action, torch.futures.Future] = {}
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stage{stage.stage_idx}")

    def run_action(self, action: Action, input_ref: Any, target: torch.Tensor | None) -> torch.futures.Future:
        """Queue ``action``; the future completes when it has run on this stage."""
        position = self._positions.get(action)
        if position is None:
            raise RuntimeError(f"stage {self.stage.stage_idx}: action {action} is not in its schedule")
        received = time.time()
        previous = self._done_future(position - 1) if position > 0 else completed(None)
        arrival = self._input_future(input_ref)
        finished: torch.futures.Future = torch.futures.Future()

        def _run(_: torch.futures.Future) -> None:
            try:
                _result(previous)
                tensor, produced_at, arrived_at = _result(arrival)
                free_at = self._free_at.pop(position - 1, received) if position > 0 else received
                self._record_idle(action, free_at, produced_at, arrived_at)
                if action.kind == ActionKind.FORWARD:
                    output = self.stage.forward(action.mb_idx, tensor, target)
                else:
                    output = self.stage.backward(action.mb_idx, tensor)
                if output_consumer(action, self.stage.num_stages) is not None:
                    self._outbox_future(action).set_result((output.detach().cpu(), time.time()))
                self._free_at[position] = time.time()
                finished.set_result(None)
                # Last: completing this queues the stage's next action (if its input is there).
                self._done_future(position).set_result(None)
            except Exception as error:  # every waiter learns of the failure, nothing waits forever
                failure = StageError.wrap(error, self.stage.stage_idx, f"action {action}")
                for future in (self._outbox_future(action), self._done_future(position), finished):
                    if not future.done():
                        future.set_exception(failure)

        torch.futures.collect_all([previous, arrival]).add_done_callback(
            lambda ready: self._compute.submit(_run, ready)
        )
        return finished

    def fetch(self, action: Action) -> torch.futures.Future:
        """The future of ``(tensor, produced_at)`` for the output of ``action`` (once, for its consumer)."""
        future = self._outbox_future(action)

        def _release(done: torch.futures.Future) -> Any:
            with self._lock:
                self._outbox.pop(action, None)
            return _result_or_error(done)

        return future.then(_release)

    def step(self) -> torch.futures.Future:
        """Once the stage's last action of the step is done: step the optimizer, reset the action order.

        The future carries the stage's report, or the :class:`StageError` of what failed.
        """
        last = len(self._positions) - 1
        actions_done = self._done_future(last) if last >= 0 else completed(None)
        reported: torch.futures.Future = torch.futures.Future()

        def _step(_: torch.futures.Future) -> None:
            try:
                _result(actions_done)
                report = self.stage.step()
                # The outbox empties itself as consumers fetch: a consumer may still be on its way to
                # the last outputs, since this stage steps before the others finish.
                with self._lock:
                    self._done.clear()
                    self._free_at.clear()
                reported.set_result(report)
            except Exception as error:
                reported.set_result(StageError.wrap(error, self.stage.stage_idx, "optimizer step"))

        actions_done.add_done_callback(lambda done: self._compute.submit(_step, done))
        return reported

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

    def _done_future(self, position: int) -> torch.futures.Future:
        with self._lock:
            return self._done.setdefault(position, torch.futures.Future())

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
def _run_action(action_text: str, input_ref: Any, target: torch.Tensor | None) -> torch.futures.Future:
    server = _server()
    try:
        return server.run_action(Action.parse(action_text), input_ref, target)
    except Exception as error:
        return completed(StageError.wrap(error, server.stage.stage_idx, f"action {action_text}"))


@rpc.functions.async_execution
def _fetch(action_text: str) -> torch.futures.Future:
    return _server().fetch(Action.parse(action_text))


@rpc.functions.async_execution
def _step() -> torch.futures.Future:
    return _server().step()


class RpcStageHandle:
    """The driver's handle on stage ``stage_idx``, served by RPC worker ``stage<k>`` at ``rank``."""

    def __init__(self, stage_idx: int, rank: int) -> None:
        self.stage_idx = stage_idx
        self.rank = rank
        self.worker = stage_worker_name(stage_idx)

    @property
    def label(self) -> str:
        """``"stage <k> (rank <r>)"``."""
        return f"stage {self.stage_idx} (rank {self.rank})"

    def issue(self, action: Action, input_ref: Any, target: Any | None) -> IssuedAction:
        """Send ``action`` to the worker; its output stays there, referenced by a :class:`RemoteTensor`."""
        done = rpc.rpc_async(
            self.worker, _run_action, args=(str(action), input_ref, target), timeout=_NO_DEADLINE
        )
        return IssuedAction(output=RemoteTensor(self.worker, str(action)), done=done)

    def step(self) -> torch.futures.Future:
        """Step the worker's optimizer once its actions are done; the future carries its report."""
        return rpc.rpc_async(self.worker, _step, timeout=_NO_DEADLINE)

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
    rpc.init_rpc(name, rank=rank, world_size=world_size, rpc_backend_options=options)


def shutdown_rpc(graceful: bool = True) -> None:
    """Leave the RPC group; ``graceful`` waits for every worker to finish its outstanding work."""
    rpc.shutdown(graceful=graceful)
