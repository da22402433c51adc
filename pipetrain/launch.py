"""Start one run's processes with torchrun on this machine, show the driver's output, return the status.

Single-node runs rendezvous on a free loopback port and keep RPC (TensorPipe, Gloo) on the loopback
interface: RPC executes pickled calls, so it must never listen where untrusted hosts can reach it.

The console shows the driver's own lines (plan, progress, the one-line result) and nothing else; every
process's full output goes to ``<run_dir>/logs/`` (torchrun's own to ``logs/torchrun.log``), and the
driver's lines also to ``<run_dir>/train.log``. A driver that crashes cannot say why itself: the end of
its error output (a fatal signal's Python stacks, an uncaught exception) is shown instead.

Ctrl-C (or SIGTERM) asks the driver to finish its step and save a checkpoint; a second one stops every
process at once.

Once the driver has exited, the workers have a few seconds to follow (torchrun stops them when a process
fails); a worker that is stuck, and so deaf to torchrun's SIGTERM, is killed then, instead of after
torchrun's own 30 s. Runs that torchrun may restart are left to torchrun.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from pipetrain.crash_report import driver_crash_report
from pipetrain.run_dir import DRIVER_PID_FILE

__all__ = [
    "free_loopback_port",
    "torchrun_command",
    "run_torchrun",
    "append_train_log",
]

_TEE_PREFIX = re.compile(r"^\[[^\]\s]*0\]:")
_POLL_S = 0.1
_STRAGGLER_GRACE_S = 5.0


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(
    num_processes: int, worker_args: Sequence[str], port: int, log_dir: Path, max_restarts: int = 0
) -> list[str]:
    """torchrun for one driver plus ``num_processes - 1`` workers; only rank 0 reaches the console.

    torchrun restarts every process up to ``max_restarts`` times after one fails (checking them every
    0.1 s, its default); the restarted run resumes from its newest checkpoint (:mod:`pipetrain.restart`).
    """
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={num_processes}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        f"--max-restarts={max_restarts}",
        f"--log-dir={log_dir}",
        "--redirects=3",
        "--tee=1",
        "--local-ranks-filter=0",
        "-m",
        "pipetrain.worker",
        *worker_args,
    ]


def run_torchrun(
    num_processes: int, worker_args: Sequence[str], run_dir: Path, env: dict[str, str], max_restarts: int = 0
) -> int:
    """Run torchrun to completion in its own process group; return its exit status (130 if interrupted)."""
    env = {**os.environ, **env}
    env.setdefault("TP_SOCKET_IFNAME", "lo")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.setdefault("OMP_NUM_THREADS", "1")
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    command = torchrun_command(num_processes, worker_args, free_loopback_port(), log_dir, max_restarts)
    with open(log_dir / "torchrun.log", "ab") as torchrun_log, open(run_dir / "train.log", "a") as train_log:
        process = subprocess.Popen(
            command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=torchrun_log, text=True
        )
        echo = threading.Thread(target=_echo, args=(process.stdout, train_log), daemon=True)
        echo.start()
        interrupts = _Interrupts()
        driver = _DriverWatch(run_dir) if max_restarts == 0 else None
        try:
            status = _wait(process, run_dir, interrupts, driver)
        finally:
            interrupts.restore()
            if process.poll() is None:
                _kill(process)
        echo.join(timeout=5)
    if interrupts.count:
        return 130
    if status != 0:
        crash = driver_crash_report(log_dir)
        if crash is not None:
            print(crash, flush=True)
        print(f"pipetrain: the output of every process of the run is in {log_dir}", flush=True)
    return status


class _Interrupts:
    """Counts SIGINT / SIGTERM while the run is on, instead of raising into the wait."""

    def __init__(self) -> None:
        self.count = 0
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _on_signal(self, signum: int, frame: object) -> None:
        self.count += 1

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _DriverWatch:
    """Tells how long ago this run's driver exited (it writes its pid into the run directory at start)."""

    def __init__(self, run_dir: Path) -> None:
        self._pid_file = run_dir / DRIVER_PID_FILE
        self._launched_at = time.time()
        self._pid: int | None = None
        self._exited_at: float | None = None

    def exited_for(self) -> float:
        """Seconds since the driver was first seen gone (0 while it runs or has not started)."""
        if self._pid is None:
            self._pid = self._read_pid()
            if self._pid is None:
                return 0.0
        if self._exited_at is None:
            if _is_running(self._pid):
                return 0.0
            self._exited_at = time.monotonic()
        return time.monotonic() - self._exited_at

    def _read_pid(self) -> int | None:
        try:
            if self._pid_file.stat().st_mtime < self._launched_at - 1.0:
                return None  # a previous run's
            return int(self._pid_file.read_text())
        except (OSError, ValueError):
            return None


def _is_running(pid: int) -> bool:
    """Whether ``pid`` is alive and, on Linux, not a zombie waiting for its parent (torchrun) to reap it."""
    if sys.platform == "linux":
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rpartition(")")[2].split()[0] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _wait(
    process: subprocess.Popen, run_dir: Path, interrupts: _Interrupts, driver: _DriverWatch | None
) -> int:
    """Wait for torchrun; pass the first interrupt to the driver, stop everything at the second; stop the
    workers left a few seconds after the driver has exited (``driver``: unless torchrun may restart)."""
    handled = 0
    while True:
        try:
            return process.wait(timeout=_POLL_S)
        except subprocess.TimeoutExpired:
            pass
        if driver is not None and driver.exited_for() > _STRAGGLER_GRACE_S:
            print(
                f"pipetrain: workers still running {_STRAGGLER_GRACE_S:g} s after the driver exited "
                "(stuck?): stopping them",
                flush=True,
            )
            _kill(process)
            process.wait()
            return 1
        if interrupts.count == handled:
            continue
        handled = interrupts.count
        if handled >= 2 or not _interrupt_driver(run_dir):
            print("pipetrain: stopping every process of the run now", flush=True)
            _kill(process)
            return process.wait()


def _interrupt_driver(run_dir: Path) -> bool:
    """Send SIGINT to the run's driver (it finishes the step and saves); whether one was there to ask."""
    try:
        os.kill(int((run_dir / DRIVER_PID_FILE).read_text()), signal.SIGINT)
    except (OSError, ValueError):
        return False
    return True


def _echo(stream: IO[str], log: IO[str]) -> None:
    """Copy the driver's lines (tee'd by torchrun) to the console and to ``train.log``."""
    for line in stream:
        line = _TEE_PREFIX.sub("", line, count=1)
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(_stamped(line))
        log.flush()


def append_train_log(run_dir: Path, line: str) -> None:
    """Add one of the launcher's own lines (e.g. a configuration error) to ``<run_dir>/train.log``."""
    with open(run_dir / "train.log", "a") as log:
        log.write(_stamped(line.rstrip("\n") + "\n"))


def _stamped(line: str) -> str:
    return f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}"


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL torchrun's whole group; its workers die with it (they ask the kernel to)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
