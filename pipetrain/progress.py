"""A worker's progress reports to the driver, sent only for actions that run long.

The driver needs a worker's reports for two things: to name the action a dead or stuck worker was running,
and to see that a worker still moves (the ``rpc.timeout_s`` watchdog). A worker process writes them to the
run's store (:mod:`pipetrain.transport.progress_store`), a message each; on a machine whose cores all
compute, every thread wake-up takes a core from a compute thread, and an action's end is the busiest
moment of a worker (outputs to hand over, the next input to take). So a worker does not report actions as
they end. Its :class:`ActionWatch` thread looks at the action under way every :data:`REPORT_AFTER_S`, and
reports it when it has run that long: a failure during such an action names it. Short actions are
reported only by a heartbeat every :data:`HEARTBEAT_S` while the step moves, which is all the watchdog
needs. A worker that dies during a short action is named with the last action the driver heard of. The end
of a step's last action is the exception: the compute thread reports it itself, once a step, before the
optimizer steps begin, so that a failure in those is never blamed on an action.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["REPORT_AFTER_S", "HEARTBEAT_S", "ActionWatch"]

REPORT_AFTER_S = 0.01
"""An action (or the wait for its input) still under way this long after it began is reported."""

HEARTBEAT_S = 0.25
"""While a step moves through short actions, the latest count is reported this often."""


class ActionWatch:
    """One worker's progress reports, step after step, from one long-lived daemon thread.

    The compute thread calls :meth:`begin` with a step's report function, :meth:`done` as its actions
    end (:meth:`finished` for the last), and :meth:`end` when the step is over. ``done`` only records the
    count and the time (no thread is woken); the watch thread wakes every ``report_after_s`` during a step
    and calls ``report(n)`` (the first ``n`` actions are done, the next is under way) when the next action
    has been under way for ``report_after_s``, or when ``heartbeat_s`` has passed since the last report and
    the count has grown. Reports of a step go out one at a time and in order: a count lower than one
    already reported is dropped.
    """

    def __init__(
        self, name: str, report_after_s: float = REPORT_AFTER_S, heartbeat_s: float = HEARTBEAT_S
    ) -> None:
        self._name = name
        self._report_after_s = report_after_s
        self._heartbeat_s = heartbeat_s
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._report: Callable[[int], None] | None = None
        self._count = 0
        self._since = 0.0
        self._reported = 0
        self._reported_at = 0.0
        self._sending = threading.Lock()
        self._sent: tuple[Callable[[int], None] | None, int] = (None, 0)

    def begin(self, report: Callable[[int], None]) -> None:
        """A step starts: its first action is under way; reports go to ``report``."""
        with self._changed:
            self._report = report
            self._count = self._reported = 0
            self._since = self._reported_at = time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name=self._name, daemon=True)
                self._thread.start()
            self._changed.notify()

    def done(self, count: int) -> None:
        """The first ``count`` actions of the step are done; the next one (if any) is under way."""
        with self._changed:
            self._count = count
            self._since = time.monotonic()

    def finished(self, count: int) -> None:
        """The step's last action (the ``count``-th) is done: report it now, on the calling thread. What
        follows, the optimizer steps, may run long, and a failure there must not be blamed on an action
        because the watch thread had not looked yet."""
        with self._changed:
            self._count = self._reported = count
            self._since = self._reported_at = time.monotonic()
            report = self._report
        if report is not None:
            self._send(report, count)

    def end(self) -> None:
        """The step is over: nothing more is reported for it."""
        with self._changed:
            self._report = None

    def _watch(self) -> None:
        while True:
            with self._changed:
                while self._report is None:
                    self._changed.wait()
                self._changed.wait(self._report_after_s)
                report, count, now = self._report, self._count, time.monotonic()
                if report is None or count <= self._reported:
                    continue
                ran_long = now - self._since >= self._report_after_s
                if not ran_long and now - self._reported_at < self._heartbeat_s:
                    continue
                self._reported, self._reported_at = count, now
            self._send(report, count)

    def _send(self, report: Callable[[int], None], count: int) -> None:
        """``report(count)``, unless a higher count of the same step has gone out already."""
        with self._sending:
            last_report, last_count = self._sent
            if report is last_report and count <= last_count:
                return
            self._sent = (report, count)
            report(count)
