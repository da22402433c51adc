"""The driver's bookkeeping of a worker's progress reports (``pipetrain.transport``), without processes.

Reports between processes are covered by ``tests/test_distributed.py`` and ``tests/test_failures.py``;
here: which ``done`` futures a report, a late report, and the stage's reply complete or fail, how counts
travel through a real store (:mod:`pipetrain.transport.progress_store`), and which reports a worker's
:class:`~pipetrain.progress.ActionWatch` sends.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from pipetrain.failures import StageError
from pipetrain.progress import ActionWatch
from pipetrain.runner import completed
from pipetrain.transport.handle import ProgressTracker
from pipetrain.transport.progress_store import ProgressBoard, StoreProgress, connect_progress_store


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


def test_a_count_that_returns_has_completed_what_it_counts_whichever_thread_completes_it():
    """Two replies of a dead worker read its final count on two threads. The driver names the first of
    the worker's actions not complete once the second has passed its error on, so the count must have
    completed every action it counts by then, even while the first thread is still completing them."""
    done = _futures(2)
    tracker = ProgressTracker(step_id=1, done=done)
    completing, release = threading.Event(), threading.Event()

    def _slow_callback(_: torch.futures.Future) -> None:  # the first thread, preempted mid-way
        completing.set()
        release.wait(10)

    done[0].add_done_callback(_slow_callback)
    first = threading.Thread(target=tracker.advance, args=(2,), daemon=True)
    first.start()
    assert completing.wait(10)
    seen: list[bool] = []
    second = threading.Thread(target=lambda: (tracker.advance(2), seen.append(done[1].done())), daemon=True)
    second.start()
    second.join(0.2)
    release.set()
    first.join(10)
    second.join(10)
    assert seen == [True]


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


@pytest.fixture
def run_store(monkeypatch):
    """A rendezvous store on loopback, where ``connect_progress_store`` finds it (as under torchrun)."""
    server = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10)
    )
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    return server


def _until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_counts_written_to_the_store_complete_the_actions_they_count(run_store):
    board = ProgressBoard(connect_progress_store(), poll_s=0.02)
    board.start([(0, 1)])
    done = _futures(4)
    board.track((0, 1), ProgressTracker(step_id=1, done=done))
    worker_side = connect_progress_store()  # the worker's own client
    StoreProgress(worker_side, (0, 1), step_id=1).advance(2)
    assert _until(lambda: done[1].done())
    assert [future.done() for future in done] == [True, True, False, False]
    StoreProgress(worker_side, (0, 1), step_id=2).advance(4)  # the next step's count: not this step's
    time.sleep(0.1)
    assert [future.done() for future in done] == [True, True, False, False]
    board.close()


def _serve_store(port_out) -> None:
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    port_out.put(server.port)
    time.sleep(120)


def test_the_count_of_a_step_s_last_action_returns_only_once_the_store_holds_it(monkeypatch):
    """A write alone returns as soon as it is on the socket; the worker's optimizer steps, and its death in
    them, could then come before the store has the count that says every action is done."""
    context = multiprocessing.get_context("spawn")
    port_out = context.Queue()
    server = context.Process(target=_serve_store, args=(port_out,), daemon=True)
    server.start()
    try:
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port_out.get(timeout=30)))
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
        worker_side, driver_side = connect_progress_store(), connect_progress_store()
        progress = StoreProgress(worker_side, (0, 0), step_id=1, total=3)
        progress.advance(2)  # not the last: written, not waited for
        os.kill(server.pid, signal.SIGSTOP)  # the store answers nothing for now
        try:
            progress.advance(2)  # returns with the store stopped: a wait here would last until the timeout
            last = threading.Thread(target=progress.advance, args=(3,), daemon=True)
            last.start()
            last.join(0.5)
            assert last.is_alive(), "the last count returned before the store had it"
        finally:
            os.kill(server.pid, signal.SIGCONT)
        last.join(10)
        assert not last.is_alive()
        assert driver_side.get("0/0") == b"1 3"
    finally:
        server.kill()
        server.join(10)


def test_a_dead_workers_last_count_names_its_action_after_it_is_gone(run_store):
    board = ProgressBoard(connect_progress_store(), poll_s=60.0)  # no poll in time: only the refresh reads
    board.start([(0, 0)])
    done = _futures(4)
    tracker = ProgressTracker(step_id=3, done=done)
    board.track((0, 0), tracker)
    worker_side = connect_progress_store()
    StoreProgress(worker_side, (0, 0), step_id=3).advance(3)
    del worker_side  # the worker's process is gone; what it wrote is not
    board.refresh((0, 0))  # what the handle does when the step's reply is an error
    tracker.finish(completed(RuntimeError("lost the connection to it")))
    assert [future.done() and future.value() is None for future in done[:3]] == [True] * 3
    with pytest.raises(RuntimeError, match="lost the connection"):
        done[3].wait()
    board.close()


@pytest.mark.parametrize("failure_as", ["exception", "value"])
def test_whichever_reply_of_a_dead_worker_fails_first_it_fails_after_reading_the_last_count(
    run_store, failure_as
):
    """The driver names a dead worker on the first of its replies to fail: the optimizer step's may beat
    the actions'. Each must read the count first, or the name is of an action that had ended."""
    board = ProgressBoard(connect_progress_store(), poll_s=60.0)  # no poll in time: only the read on failure
    board.start([(0, 2)])
    done = _futures(6)
    board.track((0, 2), ProgressTracker(step_id=1, done=done))
    StoreProgress(connect_progress_store(), (0, 2), step_id=1).advance(4)
    optimizer_step = torch.futures.Future()
    seen_when_failed: list[list[bool]] = []
    passed_on = board.read_before_failing((0, 2), optimizer_step)
    passed_on.add_done_callback(lambda _: seen_when_failed.append([future.done() for future in done]))
    error = RuntimeError("lost the connection to it")
    optimizer_step.set_exception(error) if failure_as == "exception" else optimizer_step.set_result(error)
    assert seen_when_failed == [[True, True, True, True, False, False]]
    assert "lost the connection" in str(passed_on.value())
    board.close()


def test_a_reply_that_succeeds_is_passed_on_without_a_read(run_store):
    board = ProgressBoard(connect_progress_store(), poll_s=60.0)
    board.start([(0, 0)])
    done = _futures(2)
    board.track((0, 0), ProgressTracker(step_id=1, done=done))
    StoreProgress(connect_progress_store(), (0, 0), step_id=1).advance(2)
    reply = torch.futures.Future()
    passed_on = board.read_before_failing((0, 0), reply)
    reply.set_result(["reports"])
    assert passed_on.value() == ["reports"]
    assert not any(future.done() for future in done)  # only a failure reads the store at once
    board.close()


def test_the_board_s_reading_thread_has_ended_when_its_block_does(run_store):
    """The driver reads progress inside a ``with`` block around its run: nothing reads the store after."""
    with ProgressBoard(connect_progress_store(), poll_s=60.0) as board:
        board.start([(0, 0)])
        readers = [thread for thread in threading.enumerate() if thread.name == "progress-board"]
        assert readers
    assert not any(thread.is_alive() for thread in readers)


def test_attempts_of_a_run_keep_their_progress_apart(run_store, monkeypatch):
    StoreProgress(connect_progress_store(), (0, 0), step_id=7).advance(5)
    assert connect_progress_store().check(["0/0"])
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun restarted the run
    assert not connect_progress_store().check(["0/0"])  # the failed attempt's counts are not this one's


def _reports_of(watch: ActionWatch) -> list[int]:
    sent: list[int] = []
    watch.begin(sent.append)
    return sent


def test_an_action_under_way_for_10_ms_is_reported_and_short_ones_are_not():
    watch = ActionWatch("reports-long")
    sent = _reports_of(watch)
    for count in range(1, 6):  # five actions back to back, far shorter than 10 ms
        watch.done(count)
    assert sent == []  # no report leaves for an action as it ends
    time.sleep(0.2)  # action 5 (the sixth) is still under way: the driver hears that five are done
    assert sent == [5]
    time.sleep(0.1)
    assert sent == [5]  # said once
    watch.done(6)
    watch.end()  # the step is over: nothing more is reported for it
    time.sleep(0.1)
    assert sent == [5]


def test_a_step_of_short_actions_still_reports_a_heartbeat():
    watch = ActionWatch("reports-heartbeat", report_after_s=0.01, heartbeat_s=0.1)
    sent = _reports_of(watch)
    count = 0
    stop_at = time.monotonic() + 0.5
    while time.monotonic() < stop_at:  # actions of 1 ms each, none reported for running long
        count += 1
        watch.done(count)
        time.sleep(0.001)
    watch.end()
    # about one per 0.1 s however many actions ran (a loaded machine runs fewer in the 0.5 s)
    assert 2 <= len(sent) <= 8 and len(sent) < count, (sent, count)
    assert sent == sorted(sent) and sent[-1] <= count


def test_the_end_of_the_last_action_is_reported_at_once_and_no_earlier_count_follows_it():
    """Before the optimizer steps begin, the driver has the count that says every action is done, without
    waiting for the watch thread (here it would not look for a minute)."""
    watch = ActionWatch("reports-finished", report_after_s=60.0, heartbeat_s=60.0)
    sent = _reports_of(watch)
    watch.done(1)
    watch.finished(2)
    assert sent == [2]
    watch._send(watch._report, 1)  # what the watch thread does with a count it took just before
    assert sent == [2]
    watch.end()


def test_one_long_lived_thread_reports_step_after_step():
    watch = ActionWatch("reports-steps")
    for step in range(3):
        sent = _reports_of(watch)
        watch.done(2)
        time.sleep(0.1)
        watch.end()
        assert sent == [2], f"step {step}: {sent}"
    threads = [thread for thread in threading.enumerate() if thread.name == "reports-steps"]
    assert len(threads) == 1
