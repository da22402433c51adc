"""What a stage measured during one step: wall-clock spans, losses, memory.

Stages record every interval of their time as a :class:`Span` on their own wall clock
(``time.time()``); the driver turns a step's :class:`StageReport` list into busy, idle and
transfer figures (see :mod:`pipetrain.metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["SpanCategory", "Span", "StageReport"]


class SpanCategory(str, Enum):
    """What a stage was doing during a span."""

    COMPUTE = "compute"
    """Running a forward or backward action (the only category that counts as busy)."""
    WAIT = "wait"
    """Ready to run its next action but waiting for that action's input to be produced."""
    TRANSFER = "transfer"
    """Moving an input tensor from the stage that produced it (after it was produced)."""
    OPTIMIZER = "optimizer"
    """Stepping the stage's optimizer (after all actions of the step)."""


@dataclass(frozen=True)
class Span:
    """One interval of one stage's time, in seconds on that stage's wall clock."""

    stage_idx: int
    category: SpanCategory
    name: str
    """The action in text form (``"1F3"``), or ``"step"`` for the optimizer."""
    start: float
    end: float

    @property
    def duration(self) -> float:
        """Length of the span in seconds."""
        return self.end - self.start


@dataclass(frozen=True)
class StageReport:
    """Everything one stage reports to the driver at the end of a step."""

    stage_idx: int
    spans: tuple[Span, ...]
    losses: tuple[float, ...] = ()
    """Per micro-batch loss contributions (last stage only); they sum to the batch's mean loss."""
    peak_memory_bytes: int | None = None
    """Peak device memory of the step, where the device reports it (CUDA)."""
    peak_activation_bytes: int = 0
    """Peak bytes autograd held for backward across the micro-batches in flight (any device)."""
    learning_rate: float | None = None
    """The learning rate of the step (of the optimizer's first parameter group); ``None``: no optimizer."""
    sent_bytes: int = 0
    """Bytes of outputs and input gradients sent to stages on other workers."""
    correct: int = 0
    """Evaluation, last stage, classification: predictions (arg-max of the last dimension) equal to the
    target."""
    predictions: int = 0
    """Evaluation, last stage, classification: predictions made (``correct`` out of these)."""
    allreduce_s: float = 0.0
    """With replicas: from the start of the gradient average across replicas to its end."""
    allreduce_exposed_s: float = 0.0
    """With replicas: the part of ``allreduce_s`` the stage's optimizer step waited for (not overlapped)."""
    process_cpu_s: float | None = None
    """CPU seconds of the worker's whole process (every thread: compute, transport, reports) since its
    previous step's reports; the same on every stage of a worker. Set by the RPC transport (in-process
    workers share the driver's process)."""
    process_resident_bytes: int | None = None
    """Host memory the worker's whole process held at the end of the step (its resident set); set like
    ``process_cpu_s``."""
    started_at: float | None = None
    """``time.time()`` when the stage's worker began the step: its request there and its previous step
    done (``None`` where no worker runner sent the report)."""

    def total(self, category: SpanCategory) -> float:
        """Total seconds spent in ``category``."""
        return sum(span.duration for span in self.spans if span.category == category)
