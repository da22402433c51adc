"""Workers' progress, kept in the run's rendezvous store: each worker writes its own, the driver reads.

The driver needs to know how far each worker got for two things: to name the action a worker was running
when its process died, and to see that a worker still moves (the ``rpc.timeout_s`` watchdog). A worker's
:class:`~pipetrain.progress.ActionWatch` decides when to say so (an action under way for 10 ms, a
heartbeat every 0.25 s); :class:`StoreProgress` writes ``"<step> <count>"`` under the worker's key in the
key-value store that torchrun's rendezvous already runs (``MASTER_ADDR:MASTER_PORT``: a C++ server in
torchrun's agent, or in rank 0), in the keys of the run's attempt (:mod:`pipetrain.rendezvous`).

Why not over RPC: a write is one message that no one answers and that wakes no Python thread anywhere,
where an RPC report was a round trip that woke the transport and RPC threads of the worker and of the
driver and ran a Python handler on both sides. On a machine whose cores all compute, every such wake-up
takes a core from a compute thread: GPT 1f1b on 2 cores ran 3-5% faster without the reports (see the
README's Performance section). The value also outlives the worker's process, which is the point of it.

The driver's :class:`ProgressBoard` reads the keys of the workers it tracks every :data:`POLL_S` and
completes the ``done`` futures of the actions they count, which the watchdog sees move; when a worker's
step fails, it reads that worker's key once more first, so a dead worker is named with the last count it
wrote.
"""

from __future__ import annotations

import os
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from pipetrain.rendezvous import attempt_prefix
from pipetrain.runner import result_or_error
from pipetrain.transport.handle import ProgressTracker

__all__ = ["POLL_S", "ProgressBoard", "StoreProgress", "connect_progress_store"]

POLL_S = 0.25
"""How often the driver reads the workers' progress: as often as a moving step writes a heartbeat."""

_STORE_TIMEOUT_S = 30.0
"""How long a read waits for the store; the keys exist from the start, so only a store that is gone waits."""

_CLOSE_WAIT_S = 1.0
"""How long closing the board waits for a read under way (one takes milliseconds while the store is up)."""

Worker = tuple[int, int]
"""(replica index, worker index)."""


def connect_progress_store() -> dist.Store:
    """A client of the run's rendezvous store (``MASTER_ADDR:MASTER_PORT``, up once RPC has started), its
    keys under this attempt's ``progress/``."""
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=_STORE_TIMEOUT_S),
    )
    return dist.PrefixStore(f"{attempt_prefix()}progress/", store)


def _key(worker: Worker) -> str:
    return f"{worker[0]}/{worker[1]}"


class StoreProgress:
    """A worker's progress in one step of ``total`` actions: ``advance(n)`` says the first ``n`` are done."""

    def __init__(self, store: dist.Store, worker: Worker, step_id: int, total: int | None = None) -> None:
        self._store = store
        self._key = _key(worker)
        self._step_id = step_id
        self._total = total

    def advance(self, done: int) -> None:
        """``done`` actions of the step are done. The count of the last one returns only once the store
        holds it: the optimizer steps follow, and a worker that dies in them must not be named by a count
        still on its way to the store when the driver reads it."""
        try:
            self._store.set(self._key, f"{self._step_id} {done}")
            if self._total is not None and done >= self._total:
                self._store.check([self._key])  # answered after the write before it on this connection
        except Exception:  # the store is gone, so is the run: the driver hears of it over RPC
            return


class ProgressBoard:
    """The driver's view of the workers' progress: routes each worker's count to the tracker of its step.

    With a ``store``, a thread reads the tracked workers' keys every ``poll_s`` until :meth:`close` (or the
    end of a ``with`` block); without one (tests), counts come only through :meth:`advance`.
    """

    def __init__(self, store: dist.Store | None = None, poll_s: float = POLL_S) -> None:
        self._trackers: dict[tuple[int, int, int], ProgressTracker] = {}
        self._lock = threading.Lock()
        self._store = store
        self._poll_s = poll_s
        self._closed = threading.Event()
        self._poller: threading.Thread | None = None
        if store is not None:
            self._poller = threading.Thread(target=self._poll, name="progress-board", daemon=True)
            self._poller.start()

    def __enter__(self) -> ProgressBoard:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self, workers: list[Worker]) -> None:
        """Give every worker's key a value that counts nothing (step 0), so that reads never wait."""
        if self._store is not None:
            for worker in workers:
                self._store.set(_key(worker), "0 0")

    def track(self, worker: Worker, tracker: ProgressTracker) -> None:
        """Route the counts of ``worker`` on ``tracker.step_id`` to ``tracker`` until :meth:`untrack`; a
        worker may have two steps in flight (one handed out ahead)."""
        with self._lock:
            self._trackers[(*worker, tracker.step_id)] = tracker

    def untrack(self, worker: Worker, step_id: int) -> None:
        """The worker has answered for step ``step_id``: later counts of it are moot."""
        with self._lock:
            self._trackers.pop((*worker, step_id), None)

    def advance(self, worker: Worker, step_id: int, done: int) -> None:
        """``worker`` has run the first ``done`` actions of step ``step_id``."""
        with self._lock:
            tracker = self._trackers.get((*worker, step_id))
        if tracker is not None:
            tracker.advance(done)

    def refresh(self, worker: Worker) -> None:
        """Read ``worker``'s count now (before its failed step's actions are failed)."""
        self._read([worker])

    def read_before_failing(self, worker: Worker, reply: torch.futures.Future) -> torch.futures.Future:
        """``reply`` (a request to ``worker``), passed on once done, and when it failed, only after
        ``worker``'s count has been read.

        The driver names a failed worker by its first action not counted done, on the first of the
        worker's replies to fail; each of them must therefore read first, or a stale count names an action
        that had ended.
        """
        passed_on: torch.futures.Future = torch.futures.Future()

        def _pass_on(done: torch.futures.Future) -> None:
            outcome = result_or_error(done)
            if isinstance(outcome, BaseException):
                self.refresh(worker)
            passed_on.set_result(outcome)

        reply.add_done_callback(_pass_on)
        return passed_on

    def close(self) -> None:
        """Stop reading; the reading thread has ended when this returns, unless a read under way waits for
        a store that is gone: that thread (a daemon) is left behind after :data:`_CLOSE_WAIT_S` rather
        than holding up the end of the run."""
        self._closed.set()
        if self._poller is not None and self._poller is not threading.current_thread():
            self._poller.join(timeout=_CLOSE_WAIT_S)

    def _poll(self) -> None:
        while not self._closed.wait(self._poll_s):
            with self._lock:
                workers = sorted({key[:2] for key in self._trackers})
            if workers:
                self._read(workers)

    def _read(self, workers: list[Worker]) -> None:
        if self._store is None:
            return
        try:
            values = self._store.multi_get([_key(worker) for worker in workers])
        except Exception:  # the store is gone, so is the run: the driver hears of it over RPC
            return
        for worker, value in zip(workers, values, strict=True):
            step_id, done = map(int, value.split())
            self.advance(worker, step_id, done)
