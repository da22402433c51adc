"""Per-step training metrics: busy/idle/transfer figures, bubble fractions, and their logging.

The driver collects one :class:`~pipetrain.timings.StageReport` per stage each step and turns
them into a :class:`StepMetrics` with :func:`step_metrics`, with figures per *worker* (a process runs
one action at a time, whichever of its stages it belongs to): the measured bubble fraction of the
step next to what the schedule simulator predicts, once with unit costs and once with the
per-stage forward/backward times measured in that step. :class:`MetricsLogger` writes those
metrics to TensorBoard (``run_dir/tb/``) and to ``run_dir/metrics.jsonl``; it is the only place
in pipetrain that creates a :class:`~torch.utils.tensorboard.SummaryWriter`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from torch.utils.tensorboard import SummaryWriter

from pipetrain.schedule import Action, ActionKind, Schedule, StageCosts, simulate
from pipetrain.timings import SpanCategory, StageReport
from pipetrain.trace import write_chrome_trace

__all__ = [
    "Evaluation",
    "StepMetrics",
    "WorkerFigures",
    "worker_figures",
    "measured_bubble_fraction",
    "measured_costs",
    "step_metrics",
    "format_progress",
    "MetricsLogger",
    "write_chrome_trace",
]


@dataclass(frozen=True)
class WorkerFigures:
    """How one worker spent the step's schedule window, in seconds (all its stages together)."""

    busy_s: float
    """Total time running forward/backward actions (COMPUTE spans)."""
    idle_s: float
    """Window time not spent computing: ``max(window - busy, 0)``."""
    transfer_s: float
    """Total time moving inputs from other workers (TRANSFER spans)."""
    peak_activation_bytes: int = 0
    """Peak activation bytes held for backward (micro-batches in flight)."""
    sent_bytes: int = 0
    """Bytes of activations and gradients sent to other workers."""


@dataclass(frozen=True)
class Evaluation:
    """The result of one evaluation pass."""

    loss: float
    """Mean loss over the evaluation samples."""
    accuracy: float | None
    """Share of correct predictions (classification), else ``None``."""
    samples: int


@dataclass(frozen=True)
class StepMetrics:
    """Everything logged for one training step."""

    step: int
    loss: float
    samples_per_sec: float
    step_time_s: float
    """Wall time since the previous step ended: loading the batch, the schedule, the optimizer steps."""
    bubble_fraction: float
    """Measured: idle over idle + busy, summed over workers."""
    bubble_fraction_predicted: float
    """Simulated bubble of the schedule with unit forward/backward costs."""
    bubble_fraction_predicted_measured_costs: float
    """Simulated bubble of the schedule with this step's measured mean compute times."""
    workers: tuple[WorkerFigures, ...]
    data_time_s: float = 0.0
    """Time the driver waited for the step's batch (included in ``step_time_s``)."""
    learning_rate: float | None = None
    """The step's learning rate (``None``: no stage has an optimizer)."""
    grad_norm: float | None = None
    """The global gradient norm before clipping (only with ``train.clip_grad_norm``)."""
    evaluation: Evaluation | None = None
    """The evaluation pass run after this step, if one was."""

    def scalars(self) -> dict[str, float]:
        """The tag -> value mapping written to TensorBoard and ``metrics.jsonl``."""
        scalars = {
            "train/loss": float(self.loss),
            "perf/samples_per_sec": float(self.samples_per_sec),
            "perf/step_time_s": float(self.step_time_s),
            "perf/data_time_s": float(self.data_time_s),
            "pipeline/bubble_fraction": float(self.bubble_fraction),
            "pipeline/bubble_fraction_predicted": float(self.bubble_fraction_predicted),
            "pipeline/bubble_fraction_predicted_measured_costs": float(
                self.bubble_fraction_predicted_measured_costs
            ),
        }
        if self.learning_rate is not None:
            scalars["train/lr"] = float(self.learning_rate)
        if self.grad_norm is not None:
            scalars["train/grad_norm"] = float(self.grad_norm)
        if self.evaluation is not None:
            scalars["eval/loss"] = float(self.evaluation.loss)
            if self.evaluation.accuracy is not None:
                scalars["eval/accuracy"] = float(self.evaluation.accuracy)
        for k, figures in enumerate(self.workers):
            scalars[f"worker{k}/busy_s"] = float(figures.busy_s)
            scalars[f"worker{k}/idle_s"] = float(figures.idle_s)
            scalars[f"worker{k}/transfer_s"] = float(figures.transfer_s)
            scalars[f"worker{k}/peak_activation_mib"] = figures.peak_activation_bytes / 2**20
            scalars[f"worker{k}/sent_mib"] = figures.sent_bytes / 2**20
        return scalars


def _by_stage(reports: Sequence[StageReport]) -> list[StageReport]:
    return sorted(reports, key=lambda report: report.stage_idx)


def worker_figures(
    reports: Sequence[StageReport], window_s: float, placement: Sequence[int]
) -> tuple[WorkerFigures, ...]:
    """Busy, idle and transfer seconds of each worker (ordered by worker index).

    ``placement[stage_idx]`` is the worker hosting that stage. ``window_s`` is the wall time of the
    schedule's execution, from the driver handing out the first action to the last action completing; a
    worker is idle for the part of it it did not compute. Its peak activation memory is the sum of its
    stages' peaks.
    """
    figures = []
    for worker in range(max(placement) + 1):
        own = [report for report in reports if placement[report.stage_idx] == worker]
        busy = sum(report.total(SpanCategory.COMPUTE) for report in own)
        figures.append(
            WorkerFigures(
                busy_s=busy,
                idle_s=max(window_s - busy, 0.0),
                transfer_s=sum(report.total(SpanCategory.TRANSFER) for report in own),
                peak_activation_bytes=sum(report.peak_activation_bytes for report in own),
                sent_bytes=sum(report.sent_bytes for report in own),
            )
        )
    return tuple(figures)


def measured_bubble_fraction(figures: Sequence[WorkerFigures]) -> float:
    """Fraction of the workers' window time spent idle: ``sum(idle) / sum(idle + busy)``.

    Returns 0.0 when there is no time at all.
    """
    idle = sum(f.idle_s for f in figures)
    total = idle + sum(f.busy_s for f in figures)
    return idle / total if total > 0 else 0.0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def measured_costs(reports: Sequence[StageReport]) -> StageCosts:
    """Per-stage mean duration of the forward and of the backward COMPUTE spans.

    Span names are parsed as actions (``"1F3"``); a stage without spans of a kind gets 0.0.
    """
    forward: list[float] = []
    backward: list[float] = []
    for report in _by_stage(reports):
        durations: dict[ActionKind, list[float]] = {ActionKind.FORWARD: [], ActionKind.BACKWARD: []}
        for span in report.spans:
            if span.category == SpanCategory.COMPUTE:
                durations[Action.parse(span.name).kind].append(span.duration)
        forward.append(_mean(durations[ActionKind.FORWARD]))
        backward.append(_mean(durations[ActionKind.BACKWARD]))
    return StageCosts(forward=tuple(forward), backward=tuple(backward))


def step_metrics(
    step: int,
    loss: float,
    batch_size: int,
    step_time_s: float,
    window_s: float,
    reports: Sequence[StageReport],
    schedule: Schedule,
    data_time_s: float = 0.0,
    grad_norm: float | None = None,
    evaluation: Evaluation | None = None,
) -> StepMetrics:
    """Assemble the :class:`StepMetrics` of one step from the stages' reports.

    ``step_time_s`` is the whole step (including the optimizer) and gives the throughput;
    ``window_s`` is the schedule's execution window (see :func:`worker_figures`); ``data_time_s`` is the
    part of the step spent waiting for the batch; ``grad_norm`` the global gradient norm, when clipped.
    """
    figures = worker_figures(reports, window_s, schedule.placement)
    rates = [report.learning_rate for report in _by_stage(reports) if report.learning_rate is not None]
    return StepMetrics(
        step=step,
        loss=float(loss),
        samples_per_sec=batch_size / step_time_s if step_time_s > 0 else 0.0,
        step_time_s=float(step_time_s),
        bubble_fraction=measured_bubble_fraction(figures),
        bubble_fraction_predicted=simulate(schedule).bubble_fraction,
        bubble_fraction_predicted_measured_costs=simulate(schedule, measured_costs(reports)).bubble_fraction,
        workers=figures,
        data_time_s=float(data_time_s),
        learning_rate=rates[0] if rates else None,
        grad_norm=grad_norm,
        evaluation=evaluation,
    )


def format_progress(metrics: StepMetrics, total_steps: int) -> str:
    """One progress line, e.g.::

        step   10/100  loss 1.2345  1234.5 samples/s  bubble 0.21 (predicted 0.20)

    The bubble shown is the measured one; ``predicted`` is the simulator's with unit costs.
    """
    width = max(4, len(str(total_steps)))
    line = (
        f"step {metrics.step:>{width}d}/{total_steps}  loss {metrics.loss:.4f}  "
        f"{metrics.samples_per_sec:.1f} samples/s  "
        f"bubble {metrics.bubble_fraction:.2f} (predicted {metrics.bubble_fraction_predicted:.2f})"
    )
    if metrics.evaluation is not None:
        line += f"  eval loss {metrics.evaluation.loss:.4f}"
        if metrics.evaluation.accuracy is not None:
            line += f" accuracy {metrics.evaluation.accuracy:.3f}"
    return line


def _hparam_value(value: object) -> float | int | str | bool:
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class MetricsLogger:
    """Writes step metrics to TensorBoard (``run_dir/tb/``) and ``run_dir/metrics.jsonl``.

    Usable as a context manager; :meth:`close` flushes and closes both outputs.
    """

    def __init__(self, run_dir: Path | str) -> None:
        self.run_dir = Path(run_dir)
        self.tb_dir = self.run_dir / "tb"
        self.tb_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self._writer: SummaryWriter | None = SummaryWriter(log_dir=str(self.tb_dir))
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8")

    def _require_open(self) -> SummaryWriter:
        if self._writer is None:
            raise RuntimeError("MetricsLogger is closed")
        return self._writer

    def log_step(self, metrics: StepMetrics) -> None:
        """Write every scalar of ``metrics`` at ``global_step=metrics.step`` and one JSON line."""
        writer = self._require_open()
        scalars = metrics.scalars()
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, global_step=metrics.step)
        writer.flush()
        self._jsonl.write(json.dumps({"step": metrics.step, **scalars}) + "\n")
        self._jsonl.flush()

    def log_hparams(self, hparams: dict[str, float | int | str | bool], final: dict[str, float]) -> None:
        """Record the run's hyper-parameters and final metrics in TensorBoard's hparams view.

        Values that are not bool/int/float/str are stored as their ``str``; each final metric
        ``k`` is logged as ``hparam/k``. The records go to ``run_dir/tb/`` itself, so one
        TensorBoard over a sweep's run directories shows the runs as one table.
        """
        writer = self._require_open()
        hparam_dict = {str(k): _hparam_value(v) for k, v in hparams.items()}
        metric_dict = {"hparam/" + str(k): float(v) for k, v in final.items()}
        writer.add_hparams(hparam_dict, metric_dict, run_name=".")
        writer.flush()

    def write_trace(
        self,
        step: int,
        reports: Sequence[StageReport],
        placement: Sequence[int] | None = None,
        path: Path | str | None = None,
    ) -> Path:
        """Write the step's spans as a Chrome trace (default ``run_dir/traces/step{step}.json``).

        ``placement[stage_idx]`` is the worker of a stage: each worker is one process of the trace.
        """
        target = Path(path) if path is not None else self.run_dir / "traces" / f"step{step:06d}.json"
        write_chrome_trace(target, reports, metadata={"step": step}, placement=placement)
        return target

    def close(self) -> None:
        """Flush and close the TensorBoard writer and the JSONL file (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if not self._jsonl.closed:
            self._jsonl.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
