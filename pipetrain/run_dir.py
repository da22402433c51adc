"""Run directories: one per run, never shared by two live runs, checked before anything starts.

A run directory named after the clock (``runs/<date>/<time>``) is *claimed* by creating it: a second run
started in the same second gets ``<time>-1``. A run holds :class:`RunLock` (an ``flock`` on
``<run_dir>/.lock``, released by the kernel when its process dies) for as long as it trains, so a second
run pointed at the same ``run_dir`` is refused instead of interleaving its metrics and checkpoints.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

__all__ = [
    "LOCK_FILE",
    "DRIVER_PID_FILE",
    "claim_run_dir",
    "claim_new_dir",
    "default_run_dir",
    "check_writable",
    "RunLock",
    "lock_holder",
]

LOCK_FILE = ".lock"
DRIVER_PID_FILE = "driver.pid"
"""Written into the run directory by the driver: a graceful stop request (SIGINT) goes to this pid."""

_CLAIMED: dict[str, Path] = {}


def claim_run_dir(base: str | os.PathLike) -> Path:
    """Create and return ``base``, or ``base-1``, ``base-2``, ... when it is taken.

    Claims are atomic (``mkdir``), so runs started at the same moment get different directories; within
    one process the same ``base`` always gives the same directory.
    """
    key = os.fspath(base)
    if key not in _CLAIMED:
        _CLAIMED[key] = claim_new_dir(key)
    return _CLAIMED[key]


def claim_new_dir(base: str | os.PathLike) -> Path:
    """Create and return ``base``, or ``base-1``, ``base-2``, ... when it is taken (a new one each call)."""
    path = Path(base)
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in range(1000):
        candidate = path if suffix == 0 else path.with_name(f"{path.name}-{suffix}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise ValueError(
        f"run_dir: {os.fspath(base)} and its 999 suffixed variants are all taken; choose a run_dir"
    )


def default_run_dir() -> Path:
    """A newly claimed ``runs/<date>/<time>`` under the working directory."""
    return claim_run_dir(Path("runs") / time.strftime("%Y-%m-%d/%H-%M-%S"))


def check_writable(run_dir: str | os.PathLike) -> None:
    """Create ``run_dir`` if needed and write a probe file in it; ``ValueError`` naming ``run_dir``."""
    path = Path(run_dir)
    probe = path / f".write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise ValueError(
            f"run_dir: cannot write to {str(path)!r} ({reason}); choose a writable directory with run_dir=..."
        ) from None


def lock_holder(run_dir: str | os.PathLike) -> int | None:
    """The pid of the live run holding ``run_dir``'s lock, or ``None`` when no live run holds it."""
    path = Path(run_dir) / LOCK_FILE
    try:
        handle = open(path, "a+")
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            handle.seek(0)
            text = handle.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


def _try_flock(handle) -> bool:
    """Take an exclusive ``flock`` on ``handle``; ``False`` when another open file of it holds one."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


class RunLock:
    """An exclusive lock on a run directory, held by the process that trains in it.

    The lock file holds the holder's pid, so a launcher can signal the run's driver.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._handle = None

    def acquire(self, wait_s: float = 0.0) -> RunLock:
        """Take the lock; ``ValueError`` naming ``run_dir`` when a live run holds it (for ``wait_s``)."""
        handle = open(self.path, "a+")
        deadline = time.monotonic() + wait_s
        locked = _try_flock(handle)
        while not locked and time.monotonic() < deadline:
            time.sleep(0.1)
            locked = _try_flock(handle)
        if not locked:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise ValueError(
                f"run_dir: {str(self.path.parent)!r} is in use by a live run (pid {holder}); wait for it to "
                "end or choose another run_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        """Release the lock (idempotent); the file stays, empty, for the next run."""
        if self._handle is None:
            return
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.flush()
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None

    def __enter__(self) -> RunLock:
        return self if self._handle is not None else self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
