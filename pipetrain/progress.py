"""A worker's progress reports to the driver, merged so that short actions do not send one each.

The driver needs a worker's reports only to name the action a dead or stuck worker was running, yet each
report costs CPU on both sides. :class:`ThrottledProgress` sends the first report after a quiet spell at
once and merges the ones that follow within :data:`REPORT_EVERY_S` into one, sent when that time is up by
the worker's :class:`DeferredCalls` thread. That thread lives as long as the worker: starting a thread per
merged report cost the compute thread a thread start each time (7% of its samples in a profile of an
interleaved step), since ``Thread.start`` waits until the new thread runs.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

__all__ = ["REPORT_EVERY_S", "DeferredCalls", "ThrottledProgress"]

REPORT_EVERY_S = 0.02
"""How often at most a worker reports its progress to the driver."""


class DeferredCalls:
    """One daemon thread that makes calls at their due times (``time.monotonic()``), in due order."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def call_at(self, due: float, fn: Callable[[], None]) -> None:
        """Call ``fn()`` on this object's thread once ``due`` has passed."""
        with self._changed:
            heapq.heappush(self._due, (due, next(self._order), fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                self._thread.start()
            self._changed.notify()

    def _serve(self) -> None:
        while True:
            with self._changed:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._changed.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, _, fn = heapq.heappop(self._due)
            fn()


class ThrottledProgress:
    """One step's progress reports: ``report(n)`` when the first ``n`` actions are done, at most one per
    :data:`REPORT_EVERY_S`; the driver hears of every action at most that long after its end."""

    def __init__(self, report: Callable[[int], None], later: DeferredCalls) -> None:
        self._report = report
        self._later = later
        self._lock = threading.Lock()
        self._reported_at = -REPORT_EVERY_S
        self._latest = 0
        self._merged_pending = False
        self._closed = False

    def done(self, count: int) -> None:
        """The first ``count`` actions of the step are done."""
        with self._lock:
            self._latest = count
            if self._merged_pending or self._closed:  # a merged report will carry this count
                return
            now = time.monotonic()
            due = self._reported_at + REPORT_EVERY_S
            if due > now:
                self._merged_pending = True
                self._later.call_at(due, self._send_merged)
                return
            self._reported_at = now
        self._report(count)

    def close(self) -> None:
        """The step is over (its future says so): drop a report still waiting."""
        with self._lock:
            self._closed = True

    def _send_merged(self) -> None:
        with self._lock:
            self._merged_pending = False
            if self._closed:
                return
            self._reported_at = time.monotonic()
            count = self._latest
        self._report(count)
