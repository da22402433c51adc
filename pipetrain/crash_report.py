"""What a crashed driver's error log says: the launcher shows it, since the driver cannot say why itself.

torchrun writes each process's error output to ``<log_dir>/<run id>/attempt_<n>/<rank>/stderr.log``; the
driver is rank 0. Every process enables ``faulthandler``, so a fatal signal leaves the Python stacks there.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["driver_crash_report"]

_CRASH_LINES = 30


def driver_crash_report(log_dir: Path) -> str | None:
    """What the driver's newest error log says of a crash, or ``None`` if it shows none.

    The last uncaught Python exception (the end of its traceback) or C++ ``terminate``, then, for a fatal
    signal, ``faulthandler``'s error line and the stack of the thread it hit.
    """
    logs = sorted(log_dir.glob("*/attempt_*/0/stderr.log"), key=lambda path: path.stat().st_mtime)
    if not logs:
        return None
    lines = logs[-1].read_text(errors="replace").splitlines()
    shown = _last_exception(lines) + _fatal_signal(lines)
    if not shown:
        return None
    return "\n".join([f"pipetrain: the driver (rank 0) crashed; its error output ({logs[-1]}):", *shown])


def _last_exception(lines: list[str]) -> list[str]:
    """The last traceback up to its exception's line (its last lines if long), or ``terminate``'s line."""
    starts = [
        i for i, line in enumerate(lines) if line.startswith(("Traceback (most recent", "terminate called"))
    ]
    if not starts:
        return []
    start = starts[-1]
    if lines[start].startswith("terminate called"):
        return lines[start : start + 2]
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines) - 1
    )
    block = lines[start : end + 1]
    return block if len(block) <= _CRASH_LINES else [block[0], "  ...", *block[-_CRASH_LINES:]]


def _fatal_signal(lines: list[str]) -> list[str]:
    """``faulthandler``'s report of a fatal signal: its error line and the current thread's stack."""
    fatal = [i for i, line in enumerate(lines) if line.startswith("Fatal Python error")]
    if not fatal:
        return []
    current = next((i for i in range(fatal[-1], len(lines)) if lines[i].startswith("Current thread")), None)
    if current is None:
        return [lines[fatal[-1]]]
    stack_end = next((i for i in range(current, len(lines)) if not lines[i].strip()), len(lines))
    return [lines[fatal[-1]], *lines[current:stack_end][:_CRASH_LINES]]
