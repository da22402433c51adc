"""In-process stage handles: the whole pipeline in the driver's process, one action at a time.

The executor issues actions in an order that respects every dependency, so a local handle simply runs
each action when it is issued. Used by the tests and for debugging a split without processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pipetrain.failures import StageError
from pipetrain.schedule import Action, ActionKind
from pipetrain.stage import Stage
from pipetrain.transport.handle import IssuedAction, completed, failed

__all__ = ["LocalStageHandle"]


class LocalStageHandle:
    """A :class:`~pipetrain.transport.handle.StageHandle` running ``stage`` in this process."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.stage_idx = stage.stage_idx

    @property
    def label(self) -> str:
        """``"stage <k> (in-process)"``."""
        return f"stage {self.stage_idx} (in-process)"

    def issue(self, action: Action, input_ref: Any, target: Any | None) -> IssuedAction:
        """Run ``action`` now; its output reference is the output tensor itself."""
        try:
            if action.kind == ActionKind.FORWARD:
                output = self.stage.forward(action.mb_idx, input_ref, target)
            else:
                output = self.stage.backward(action.mb_idx, input_ref)
        except Exception as error:  # surfaces through the future, like a remote failure
            return IssuedAction(
                output=None, done=failed(StageError.wrap(error, self.stage_idx, f"action {action}"))
            )
        return IssuedAction(output=output, done=completed(None))

    def step(self) -> torch.futures.Future:
        """Step the optimizer now."""
        try:
            return completed(self.stage.step())
        except Exception as error:
            return failed(StageError.wrap(error, self.stage_idx, "optimizer step"))

    def call(self, fn: Callable[..., Any], *args: Any) -> torch.futures.Future:
        """Run ``fn(stage, *args)`` now."""
        try:
            return completed(fn(self.stage, *args))
        except Exception as error:
            return failed(StageError.wrap(error, self.stage_idx, getattr(fn, "__name__", "request")))
