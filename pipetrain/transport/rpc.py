"""Workers over ``torch.distributed.rpc`` (TensorPipe); the only module that imports it.

Names: the driver is RPC worker ``driver`` (rank 0), worker ``w`` is RPC worker ``worker<w>`` (rank
``w + 1``); with replicas, worker ``w`` of replica ``r > 0`` is ``replica<r>-worker<w>``.

**RRefs, and what for.** An RRef is a reference to an object that lives in another process (its owner);
calls through it (``rref.rpc_async().method(...)``) run on the owner, on the object itself. The driver
creates each worker's :class:`RpcRunner` on that worker with ``rpc.remote`` and keeps the RRef: every
request it sends for a step goes to that object. At start each runner receives the RRefs of its peer
runners, which name the processes it pulls its inputs from. Tensors themselves travel worker to worker,
never through the driver (RRefs to CUDA tensors are unsupported; a reference to the producing runner is
what is needed anyway): as RPC payloads with ``rpc.data_plane=rpc``, through shared memory (:mod:`.shm`,
what ``auto`` picks on one host) or over c10d (:mod:`.p2p`) otherwise.

**One call skips RRefs.** The call made per boundary value, a worker pulling an input from its producer,
addresses the process by its RPC name and reaches the one runner it serves through :data:`_SERVED`: an
RRef argument makes a call about 0.3 ms slower (its fork bookkeeping; 1.16 against 0.89 ms per round trip
on loopback here), a cost paid on every hop of the pipeline's critical path. Everything else goes through
the RRefs, except progress: workers write it to the run's rendezvous store, where it outlives them
(:mod:`.progress_store`).

No RPC handler blocks a thread: request handlers are ``@rpc.functions.async_execution`` and return
futures chained on what they need, so any number of micro-batches runs on the default thread pool. Only
a runner's compute thread waits for inputs.

Errors cross RPC as *values*: a handler answers with a picklable :class:`~pipetrain.failures.StageError`
instead of raising (RPC would re-create a raised exception from its message alone).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc

from pipetrain.config import RpcConfig
from pipetrain.failures import StageError, StageFailure
from pipetrain.host_memory import resident_bytes
from pipetrain.rendezvous import INIT_METHOD
from pipetrain.runner import PLAIN_STEP, OptimizerStepRequest, Work, WorkerRunner, completed, result_or_error
from pipetrain.schedule import Action, Schedule
from pipetrain.stage import Stage
from pipetrain.topology import Topology
from pipetrain.transport.collectives import ProcessGroupGradientSync
from pipetrain.transport.handle import ProgressTracker
from pipetrain.transport.p2p import P2PChannel
from pipetrain.transport.progress_store import ProgressBoard, StoreProgress, connect_progress_store
from pipetrain.transport.shm import ShmChannel

__all__ = [
    "DRIVER_NAME",
    "worker_name",
    "RpcRunner",
    "RpcWorkerHandle",
    "start_workers",
    "init_rpc",
    "shutdown_rpc",
]

DRIVER_NAME = "driver"

# Calls carry no RPC deadline (0 = none): a worker may legitimately be busy for long. The driver's
# no-progress watchdog (rpc.timeout_s, see pipetrain.executor.wait_all) catches a stuck pipeline.
_NO_DEADLINE = 0

_SERVED: dict[str, Any] = {}
"""This process's ``"runner"`` (a worker), for the fetches that skip RRefs."""

StageFactory = Callable[..., dict[int, Stage]]
"""``factory(*args, worker_idx=...)``: the stages of a worker (stage index -> stage), built where it runs."""


def worker_name(worker_idx: int, replica_idx: int = 0) -> str:
    """The RPC worker name of worker ``worker_idx`` of replica ``replica_idx``."""
    return f"worker{worker_idx}" if replica_idx == 0 else f"replica{replica_idx}-worker{worker_idx}"


class RpcRunner:
    """A worker's :class:`WorkerRunner`, owned by the worker process and reached through its RRef."""

    def __init__(self, worker_idx: int, replica_idx: int = 0) -> None:
        self.worker_idx = worker_idx
        self.replica_idx = replica_idx
        self._runner: WorkerRunner | None = None
        self._progress_store: dist.Store | None = None
        self._cpu_mark = time.process_time()

    def start(
        self,
        schedule: Schedule,
        factory: StageFactory,
        factory_args: tuple[Any, ...],
        peers: Sequence[rpc.RRef],
        replica_ranks: Sequence[int] = (),
        timeout_s: float = 60.0,
        data_plane: str = "rpc",
        run_name: str = "",
    ) -> StageError | None:
        """Build this worker's stages (``factory``), connect to the peer runners (of its replica) and to the
        store its progress goes to (:mod:`.progress_store`); with several ``replica_ranks``, join their
        gradient average (:mod:`.collectives`); with ``data_plane="c10d"`` or ``"shm"``, send boundary
        values over c10d (:mod:`.p2p`) or through shared memory (:mod:`.shm`, its sockets named by
        ``run_name``) instead of serving fetches."""
        first_stage = schedule.stages_of(self.worker_idx)[0]
        try:
            stages = factory(*factory_args, worker_idx=self.worker_idx)
        except Exception as error:
            return StageError.wrap(error, first_stage, "building its stages")
        try:
            device = next(iter(stages.values())).device  # every stage of a worker sits on its device
            sync = None
            if len(replica_ranks) > 1:
                sync = ProcessGroupGradientSync(replica_ranks, timeout_s, device)
            runner = WorkerRunner(self.worker_idx, stages, schedule, sync)
        except Exception as error:
            return StageError.wrap(
                error, first_stage, f"joining the replica group of ranks {list(replica_ranks)}"
            )

        peer_names = [peer.owner_name() for peer in peers]

        def _fetch(worker: int, step_id: int, action: Action) -> torch.futures.Future:
            return rpc.rpc_async(
                peer_names[worker], _fetch_here, args=(step_id, str(action)), timeout=_NO_DEADLINE
            )

        channel: P2PChannel | ShmChannel | None = None
        if data_plane == "c10d":
            peer_ranks = [peer.owner().id for peer in peers]
            channel = P2PChannel(peer_ranks.__getitem__, schedule.num_stages, schedule.num_microbatches)
        elif data_plane == "shm":
            try:
                # The driver's watchdog names a stalled producer after timeout_s; this wait is a backstop.
                channel = ShmChannel(run_name, self.replica_idx, self.worker_idx, 2 * timeout_s, device)
            except OSError as error:
                return StageError.wrap(error, first_stage, "opening its socket (rpc.data_plane=shm)")
        runner.connect(_fetch, channel)
        try:
            progress_store = connect_progress_store()
        except Exception as error:
            return StageError.wrap(error, first_stage, "connecting to the run's store")
        self._runner, self._progress_store = runner, progress_store
        _SERVED["runner"] = self
        return None

    @rpc.functions.async_execution
    def run_actions(
        self, step_id: int, work: list[tuple[str, Any, Any]], profile: bool = False, evaluate: bool = False
    ) -> torch.futures.Future:
        """Run the step's actions (text form), profiled with ``profile``, as an evaluation pass with
        ``evaluate``; writes its progress to the run's store."""
        runner = self._started()
        progress = StoreProgress(
            self._progress_store, (self.replica_idx, self.worker_idx), step_id, total=len(work)
        )
        try:
            parsed = [(Action.parse(text), value, target) for text, value, target in work]
            return runner.run_actions(step_id, parsed, progress.advance, profile, evaluate)
        except Exception as error:
            return completed(StageError.wrap(error, min(runner.stages), "step request"))

    @rpc.functions.async_execution
    def optimizer_step(self, step_id: int, request: OptimizerStepRequest) -> torch.futures.Future:
        """Step the stages once their actions of ``step_id`` are done; the future carries their reports,
        with the CPU time this process spent since the previous step's and the host memory it holds."""
        return self._started().optimizer_step(step_id, request).then(self._with_process_figures)

    def _with_process_figures(self, reports: torch.futures.Future) -> Any:
        value = result_or_error(reports)
        if isinstance(value, BaseException):
            return value
        now = time.process_time()
        spent, self._cpu_mark = now - self._cpu_mark, now
        resident = resident_bytes()
        return [
            dataclasses.replace(report, process_cpu_s=spent, process_resident_bytes=resident)
            for report in value
        ]

    @rpc.functions.async_execution
    def evaluation_reports(self, step_id: int) -> torch.futures.Future:
        """The stages' results of evaluation pass ``step_id`` once it is done."""
        return self._started().evaluation_reports(step_id)

    @rpc.functions.async_execution
    def gradient_norms(self, step_id: int) -> torch.futures.Future:
        """The stages' gradient norms once their actions of ``step_id`` are done."""
        return self._started().gradient_norms(step_id)

    @rpc.functions.async_execution
    def fetch(self, step_id: int, action_text: str) -> torch.futures.Future:
        """The output of ``action_text`` (with when it was produced), once it exists."""
        return self._started().fetch(step_id, Action.parse(action_text))

    def call_each_stage(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(stage, *args)`` for each stage of the worker, or the error as a value."""
        runner = self._started()
        try:
            return runner.each_stage(fn, *args)
        except Exception as error:
            return StageError.wrap(error, min(runner.stages), getattr(fn, "__name__", "request"))

    def collect_profile(self) -> Any:
        """The worker's profile of its last profiled step (a ``WorkerProfile``), or the error as a value."""
        runner = self._started()
        try:
            return runner.collect_profile()
        except Exception as error:
            return StageError.wrap(error, min(runner.stages), "profile collection")

    def _started(self) -> WorkerRunner:
        if self._runner is None:
            raise RuntimeError(f"worker {self.worker_idx} was not started")
        return self._runner


class RpcWorkerHandle:
    """The driver's handle on worker ``worker_idx`` of replica ``replica_idx``, through its runner's RRef."""

    def __init__(
        self, topology: Topology, worker_idx: int, replica_idx: int, runner: rpc.RRef, board: ProgressBoard
    ) -> None:
        self.worker_idx = worker_idx
        self.replica_idx = replica_idx
        self.rank = topology.rank_of(worker_idx, replica_idx)
        self._label = topology.label(worker_idx, replica_idx)
        self._runner = runner
        self._board = board
        self._steps_sent = 0

    @property
    def label(self) -> str:
        """``"worker <k> (rank <r>)"``; with replicas ``"replica <p> worker <k> (rank <r>)"``."""
        return self._label

    def submit(self, work: Work, profile: bool = False, evaluate: bool = False) -> list[torch.futures.Future]:
        """Send the step's actions in one request; the worker's progress (read by the board) completes their
        futures."""
        self._steps_sent += 1
        done = [torch.futures.Future() for _ in work]
        tracker = ProgressTracker(self._steps_sent, done)
        self._board.track((self.replica_idx, self.worker_idx), tracker)
        texts = [(str(action), value, target) for action, value, target in work]
        reply = self._runner.rpc_async(timeout=_NO_DEADLINE).run_actions(
            self._steps_sent, texts, profile, evaluate
        )
        worker, step_id = (self.replica_idx, self.worker_idx), self._steps_sent

        def _answered(reply: torch.futures.Future) -> None:
            self._board.untrack(worker, step_id)
            tracker.finish(reply)

        self._board.read_before_failing(worker, reply).add_done_callback(_answered)
        return done

    def _read_before_failing(self, reply: torch.futures.Future) -> torch.futures.Future:
        """``reply``, failing only after the board has read this worker's progress (see
        :meth:`ProgressBoard.read_before_failing`)."""
        return self._board.read_before_failing((self.replica_idx, self.worker_idx), reply)

    def optimizer_step(self, request: OptimizerStepRequest = PLAIN_STEP) -> torch.futures.Future:
        """Ask the worker to step its stages once their actions are done."""
        return self._read_before_failing(
            self._runner.rpc_async(timeout=_NO_DEADLINE).optimizer_step(self._steps_sent, request)
        )

    def evaluation_reports(self) -> torch.futures.Future:
        """Ask the worker for its results of the evaluation pass once it is done."""
        return self._read_before_failing(
            self._runner.rpc_async(timeout=_NO_DEADLINE).evaluation_reports(self._steps_sent)
        )

    def gradient_norms(self) -> torch.futures.Future:
        """Ask the worker for its gradient norms once its actions are done."""
        return self._read_before_failing(
            self._runner.rpc_async(timeout=_NO_DEADLINE).gradient_norms(self._steps_sent)
        )

    def call_each_stage(self, fn: Callable[..., Any], *args: Any) -> torch.futures.Future:
        """Run ``fn(stage, *args)`` for each stage on the worker (checkpoint saves and the like)."""
        return self._runner.rpc_async(timeout=_NO_DEADLINE).call_each_stage(fn, *args)

    def collect_profile(self) -> torch.futures.Future:
        """Fetch the worker's profile of its last profiled step."""
        return self._runner.rpc_async(timeout=_NO_DEADLINE).collect_profile()


@rpc.functions.async_execution
def _fetch_here(step_id: int, action_text: str) -> torch.futures.Future:
    """On a worker: the output of ``action_text`` once it exists (:meth:`RpcRunner.fetch`)."""
    return _SERVED["runner"].fetch(step_id, action_text)


def resolve_data_plane(setting: str) -> str:
    """The data plane ``rpc.data_plane`` names, with ``auto`` resolved on the driver: ``shm`` on Linux when
    torchrun started every process of the run on this node, else ``rpc``."""
    if setting != "auto":
        return setting
    one_node = os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE")
    return "shm" if one_node and sys.platform.startswith("linux") else "rpc"


def start_workers(
    topology: Topology,
    schedule: Schedule,
    factory: StageFactory,
    factory_args: tuple[Any, ...],
    board: ProgressBoard,
    timeout_s: float = 60.0,
    data_plane: str = "rpc",
) -> list[RpcWorkerHandle]:
    """Driver: create every worker's runner (``rpc.remote``), build its stages, connect them; the handles
    (replica by replica, worker by worker), whose progress ``board`` reads (the caller closes it when the
    run is over). The copies of a worker in the replicas form a process group with ``timeout_s`` on its
    collectives. ``data_plane``: how boundary values travel (``rpc.data_plane``).

    Raises :class:`StageFailure`, naming the worker, for the first one that could not build its stages.
    """
    workers = [
        (replica, worker)
        for replica in range(topology.num_replicas)
        for worker in range(topology.num_workers)
    ]
    board.start(workers)
    run_name = uuid.uuid4().hex[:16]
    runners = {
        (replica, worker): rpc.remote(
            worker_name(worker, replica), RpcRunner, args=(worker, replica), timeout=_NO_DEADLINE
        )
        for replica, worker in workers
    }
    started = [
        runners[(replica, worker)]
        .rpc_async(timeout=_NO_DEADLINE)
        .start(
            schedule,
            factory,
            factory_args,
            [runners[(replica, peer)] for peer in range(topology.num_workers)],
            topology.replica_ranks(worker),
            timeout_s,
            data_plane,
            run_name,
        )
        for replica, worker in workers
    ]
    for (replica, worker), reply in zip(workers, started, strict=True):
        error = result_or_error(reply)
        if isinstance(error, StageError):
            raise StageFailure(topology.label(worker, replica), error.action, error) from error
        if isinstance(error, BaseException):
            raise error
    return [
        RpcWorkerHandle(topology, worker, replica, runners[(replica, worker)], board)
        for replica, worker in workers
    ]


def init_rpc(name: str, rank: int, world_size: int, settings: RpcConfig) -> None:
    """Join the RPC group (rendezvous through torchrun's ``MASTER_ADDR`` / ``MASTER_PORT``, apart from the
    run's earlier attempts: :mod:`pipetrain.rendezvous`)."""
    options = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=settings.num_worker_threads,
        rpc_timeout=settings.timeout_s,
        init_method=INIT_METHOD,
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
