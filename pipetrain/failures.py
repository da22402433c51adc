"""Errors that name where a pipeline failed: which stage, which action, and the stage's own traceback."""

from __future__ import annotations

import traceback

__all__ = [
    "StageError",
    "StageFailure",
    "RunStopped",
    "request_stop",
    "stop_requested",
    "request_interrupt",
    "interrupt_requested",
]

_CONNECTION_LOST = ("eof", "pipe closed", "connection reset", "connection refused", "broken pipe")


class StageError(RuntimeError):
    """An error raised while a stage ran ``action``; picklable, so it crosses process boundaries intact."""

    def __init__(
        self, stage_idx: int, action: str, message: str, stage_traceback: str = "", secondary: bool = False
    ) -> None:
        super().__init__(f"stage {stage_idx} {action}: {message}")
        self.stage_idx = stage_idx
        self.action = action
        self.message = message
        self.stage_traceback = stage_traceback
        self.secondary = secondary
        """Likely the consequence of a failure elsewhere (a collective whose peer is gone): the driver
        names the original failure instead when it learns of it a moment later."""

    def __reduce__(self):
        return (StageError, (self.stage_idx, self.action, self.message, self.stage_traceback, self.secondary))

    @classmethod
    def wrap(cls, error: BaseException, stage_idx: int, action: str) -> StageError:
        """``error`` as a :class:`StageError` of ``action`` (an existing one is kept: it names the origin)."""
        if isinstance(error, StageError):
            return error
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        return cls(stage_idx, action, f"{type(error).__name__}: {error}", text)


class StageFailure(RuntimeError):
    """The driver's view of a failed run: ``label`` (stage and rank) failed during ``what``."""

    def __init__(self, label: str, what: str, cause: BaseException | str) -> None:
        details = ""
        if isinstance(cause, StageError):
            reason = cause.message
            if cause.stage_traceback:
                details = f"\n--- traceback on {label} ---\n{cause.stage_traceback.rstrip()}"
        else:
            reason = str(cause)
        if any(marker in reason.lower() for marker in _CONNECTION_LOST):
            reason = f"lost the connection to it: its process exited or was killed ({reason.strip()})"
        super().__init__(f"{label} failed during {what}: {reason}{details}")
        self.label = label
        self.what = what
        self.cause = cause
        self.step: int | None = None
        """The (1-based) training step the failure stopped, when the driver knows it."""


class RunStopped(BaseException):
    """This process was asked to stop (SIGTERM from torchrun, which stops a run when a process dies)."""


_stop_requested = False


def request_stop() -> None:
    """Ask this process to stop (from a SIGTERM handler).

    Only a flag: raising from a signal handler can land between a lock's acquire and the ``with`` block
    that releases it, leaving the lock held. The driver's waits poll the flag and raise
    :class:`RunStopped` themselves.
    """
    global _stop_requested
    _stop_requested = True


def stop_requested() -> bool:
    """Whether :func:`request_stop` was called."""
    return _stop_requested


_interrupt_requested = False


def request_interrupt() -> bool:
    """Ask the driver to stop after the current step and save (Ctrl-C); return whether it was asked before.

    Unlike :func:`request_stop`, no wait is cut short: the step in flight finishes, so the stages are
    consistent and a final checkpoint can be written.
    """
    global _interrupt_requested
    asked_before = _interrupt_requested
    _interrupt_requested = True
    return asked_before


def interrupt_requested() -> bool:
    """Whether :func:`request_interrupt` was called."""
    return _interrupt_requested
