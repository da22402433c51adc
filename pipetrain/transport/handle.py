"""The :class:`StageHandle` protocol: what the executor and driver need from a stage, wherever it runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pipetrain.schedule import Action

__all__ = ["IssuedAction", "StageHandle", "completed", "failed"]


@dataclass(frozen=True)
class IssuedAction:
    """An action handed to its stage.

    ``output`` is a reference to what the action produces (its output for a forward, its input's gradient
    for a backward), to be passed as the input of the action that consumes it; what a reference is belongs
    to the transport (a tensor in-process, a remote reference over RPC). ``done`` completes when the action
    has run, or carries its error.
    """

    output: Any
    done: torch.futures.Future


class StageHandle(Protocol):
    """The driver's view of one stage."""

    stage_idx: int

    @property
    def label(self) -> str:
        """How errors name this stage, e.g. ``"stage 1 (rank 2)"``."""
        ...

    def issue(self, action: Action, input_ref: Any, target: Any | None) -> IssuedAction:
        """Hand ``action`` to the stage; it runs after the stage's previous action, once its input exists.

        A transport may hold the step's actions until :meth:`step` and send them together.

        ``input_ref`` is the micro-batch input (stage 0 forward), the output reference of the action this
        one depends on, or ``None`` (last stage backward). ``target`` is given to the last stage's forward.
        """
        ...

    def step(self) -> torch.futures.Future:
        """Step the stage's optimizer once the actions issued to it for this step are done.

        Called once per step, right after the step's actions are issued (it sends any the transport held
        back). The future carries the stage's :class:`StageReport`.
        """
        ...

    def call(self, fn: Callable[..., Any], *args: Any) -> torch.futures.Future:
        """Run ``fn(stage, *args)`` where the stage lives (``fn`` importable by name)."""
        ...


def completed(value: Any) -> torch.futures.Future:
    """A future that already holds ``value``."""
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(value)
    return future


def failed(error: BaseException) -> torch.futures.Future:
    """A future that already holds ``error``."""
    future: torch.futures.Future = torch.futures.Future()
    future.set_exception(error)
    return future
