"""The launcher's report of a driver that crashed, read from the driver's error log as torchrun writes it."""

from __future__ import annotations

from pathlib import Path

from pipetrain.crash_report import driver_crash_report

# A driver's stderr as written when its loader process was killed under it, then the process aborted.
UNCAUGHT_THEN_ABORTED = """\
[W1203 02:35:52.1 tensorpipe_agent.cpp:941] RPC agent for driver encountered error: EOF
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/work/main/pipetrain/executor.py", line 314, in wait_all
    changed.wait(wait_s)
  File "/usr/lib/python3.11/threading.py", line 331, in wait
    gotit = waiter.acquire(True, timeout)
            ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/torch/utils/data/_utils/signal_handling.py", line 73, in handler
    _error_if_any_worker_fails()
RuntimeError: DataLoader worker (pid 11485) is killed by signal: Terminated.
[E1203 02:35:53.4 thread_pool.cpp:172] Exception in thread pool task: unknown
Fatal Python error: Aborted

Thread 0x00007efc68c246c0 (most recent call first):
  <no Python frame>

Current thread 0x00007efc5bfff6c0 (most recent call first):
  Garbage-collecting
  <no Python frame>

Extension modules: numpy._core._multiarray_umath, torch._C (total: 2)
"""

STOPPED_CLEANLY = """\
[W1203 01:54:00.5 tensorpipe_agent.cpp:941] RPC agent for driver encountered error: EOF
[W1203 01:54:00.5 rref_context.cpp:161] Detected RRef Leaks during shutdown.
Leaking RRef GloballyUniqueId(created_on=0, local_id=0) with fork Id GloballyUniqueId(created_on=0, ...)
"""


def write_driver_log(log_dir: Path, text: str) -> Path:
    path = log_dir / "none_abc123" / "attempt_0" / "0" / "stderr.log"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


def test_an_uncaught_exception_and_the_abort_after_it_are_both_shown(tmp_path):
    path = write_driver_log(tmp_path, UNCAUGHT_THEN_ABORTED)
    report = driver_crash_report(tmp_path).splitlines()
    assert report[0] == f"pipetrain: the driver (rank 0) crashed; its error output ({path}):"
    assert report[1] == "Traceback (most recent call last):"
    assert "RuntimeError: DataLoader worker (pid 11485) is killed by signal: Terminated." in report
    assert report[-4:] == [
        "Fatal Python error: Aborted",
        "Current thread 0x00007efc5bfff6c0 (most recent call first):",
        "  Garbage-collecting",
        "  <no Python frame>",
    ]
    assert not any(line.startswith(("[W", "[E", "Thread 0x", "Extension")) for line in report)


def test_a_long_traceback_keeps_its_end(tmp_path):
    frames = [f'  File "deep.py", line {n}, in f{n}\n    f{n + 1}()' for n in range(100)]
    text = "\n".join(["Traceback (most recent call last):", *frames, "RecursionError: x\n"])
    write_driver_log(tmp_path, text)
    report = driver_crash_report(tmp_path).splitlines()
    assert report[1:3] == ["Traceback (most recent call last):", "  ..."]
    assert report[-1] == "RecursionError: x"
    assert len(report) < 40


def test_a_driver_that_stopped_cleanly_has_no_crash_report(tmp_path):
    write_driver_log(tmp_path, STOPPED_CLEANLY)
    assert driver_crash_report(tmp_path) is None
    assert driver_crash_report(tmp_path / "missing") is None
