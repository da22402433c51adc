"""Pipeline actions: one pass of one micro-batch through one stage.

The text form follows ``torch.distributed.pipelining``: ``"2F5"`` is the forward pass of micro-batch 5
on stage 2, ``"0B3"`` the full backward pass of micro-batch 3 on stage 0, and ``"1I2"`` / ``"1W2"`` the
two halves of a backward pass that zero-bubble schedules run apart: the gradient of stage 1's input
(which the previous stage waits for) and the gradients of its weights (which nobody waits for).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

__all__ = ["Action", "ActionKind"]


class ActionKind(str, Enum):
    """Kind of pipeline action; the value is its letter in the text form."""

    FORWARD = "F"
    """Forward pass: consumes the previous stage's output, produces this stage's output."""
    BACKWARD = "B"
    """Full backward pass: the gradients of the stage's input and of its parameters."""
    INPUT_GRAD = "I"
    """Backward pass for the gradient of the stage's input only (the previous stage waits for it)."""
    WEIGHT_GRAD = "W"
    """Backward pass for the parameter gradients only, after the stage's ``I`` of the same micro-batch."""


_LETTERS = "".join(kind.value for kind in ActionKind)
_ACTION_RE = re.compile(rf"(\d+)([{_LETTERS}])(\d+)")


@dataclass(frozen=True, order=True)
class Action:
    """The ``kind`` pass of micro-batch ``mb_idx`` on stage ``stage_idx``."""

    stage_idx: int
    kind: ActionKind
    mb_idx: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ActionKind(self.kind))
        for name in ("stage_idx", "mb_idx"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Action.{name} must be an int >= 0, got {value!r}")

    def __str__(self) -> str:
        return f"{self.stage_idx}{self.kind.value}{self.mb_idx}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Parse the text form (e.g. ``"2F5"``) back into an :class:`Action`."""
        match = _ACTION_RE.fullmatch(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise ValueError(
                f"invalid action text {text!r}: expected <stage><{'|'.join(_LETTERS)}><micro-batch>, "
                "e.g. '2F5', '0B3', '1I2' or '1W2'"
            )
        stage, kind, mb = match.groups()
        return cls(int(stage), ActionKind(kind), int(mb))
