"""The driver's bookkeeping of a worker's progress reports (``pipetrain.transport``), without processes.

The reports themselves travel over RPC in ``tests/test_distributed.py`` and ``tests/test_failures.py``;
here: which ``done`` futures a report, a late report, and the stage's reply complete or fail.
"""

from __future__ import annotations

import threading
import time

import torch

from pipetrain.failures import StageError
from pipetrain.progress import DeferredCalls, ThrottledProgress
from pipetrain.runner import completed
from pipetrain.transport.handle import ProgressTracker
from pipetrain.transport.rpc import ProgressBoard


def _futures(count: int) -> list[torch.futures.Future]:
    return [torch.futures.Future() for _ in range(count)]


def test_a_report_completes_the_actions_it_counts_and_a_stale_one_changes_nothing():
    done = _futures(4)
    tracker = ProgressTracker(step_id=2, done=done)
    board = ProgressBoard()
    board.track((0, 0), tracker)  # what RpcWorkerHandle.submit registers for worker 0 of replica 0
    board.advance((0, 0), 2, 2)
    assert [future.done() for future in done] == [True, True, False, False]
    board.advance((0, 0), 2, 1)  # reports can arrive out of order
    board.advance((0, 0), 1, 4)  # a late report of the previous step
    assert [future.done() for future in done] == [True, True, False, False]
    tracker.finish(completed("report"))
    assert all(future.done() and future.value() is None for future in done)


def test_a_failed_step_fails_the_actions_not_reported_done_with_its_error():
    done = _futures(4)
    tracker = ProgressTracker(step_id=1, done=done)
    tracker.advance(1)
    error = StageError(0, "action 0F1", "RuntimeError: boom")
    tracker.finish(completed(error))  # the worker answers with its error as a value
    assert done[0].value() is None
    for future in done[1:]:
        try:
            future.wait()
        except StageError as raised:
            assert raised.action == "action 0F1"
        else:
            raise AssertionError("an action after the failure was reported done")
    tracker.advance(3)  # a report that was already on its way when the worker failed
    assert all(future.done() for future in done)


def test_reports_within_20_ms_of_each_other_merge_into_one_sent_later():
    sent: list[int] = []
    progress = ThrottledProgress(sent.append, DeferredCalls("reports"))
    progress.done(1)  # after a quiet spell: at once
    assert sent == [1]
    for count in range(2, 6):  # actions back to back, well within 20 ms
        progress.done(count)
    assert sent == [1]
    time.sleep(0.2)  # the timer carries the latest count, once
    assert sent == [1, 5]
    time.sleep(0.03)
    progress.done(6)  # 20 ms after the last report: at once
    assert sent == [1, 5, 6]
    progress.done(7)
    progress.close()  # the step is over: the waiting report is dropped
    time.sleep(0.1)
    assert sent == [1, 5, 6]


def test_deferred_calls_run_in_due_order_on_one_long_lived_thread():
    later = DeferredCalls("deferred-order")
    calls: list[tuple[str, str]] = []
    now = time.monotonic()
    later.call_at(now + 0.2, lambda: calls.append(("late", threading.current_thread().name)))
    later.call_at(now + 0.05, lambda: calls.append(("early", threading.current_thread().name)))
    time.sleep(0.12)  # the earlier call, added second, did not wait for the later one
    assert calls == [("early", "deferred-order")]
    time.sleep(0.2)
    assert calls == [("early", "deferred-order"), ("late", "deferred-order")]
    threads = [thread for thread in threading.enumerate() if thread.name == "deferred-order"]
    assert len(threads) == 1
