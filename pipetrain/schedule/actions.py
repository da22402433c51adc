"""Pipeline actions: one forward or backward pass of one micro-batch on one stage.

The text form follows ``torch.distributed.pipelining``: ``"2F5"`` is the forward pass of
micro-batch 5 on stage 2 and ``"0B3"`` the backward pass of micro-batch 3 on stage 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import TypeAlias

__all__ = ["Action", "ActionKind", "Schedule"]

_ACTION_RE = re.compile(r"(\d+)([FB])(\d+)")


class ActionKind(str, Enum):
    """Kind of pipeline action: a forward or a backward pass."""

    FORWARD = "F"
    BACKWARD = "B"


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
                f"invalid action text {text!r}: expected <stage><F|B><micro-batch>, e.g. '2F5' or '0B3'"
            )
        stage, kind, mb = match.groups()
        return cls(int(stage), ActionKind(kind), int(mb))


Schedule: TypeAlias = dict[int, list[Action]]
"""A pipeline schedule: stage index -> the ordered actions that stage runs."""
