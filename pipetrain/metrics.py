"""Per-step training metrics: busy/idle/transfer figures, bubble fractions, and their logging.

The driver collects one :class:`~pipetrain.timings.StageReport` per stage each step and turns
them into a :class:`StepMetrics` with :func:`step_metrics`, with figures per *worker* (a process runs
one action at a time, whichever of its stages it belongs to): the measured bubble fraction of the
step next to what the schedule simulator predicts, once with unit costs and once with the
per-stage forward/backward times measured in that step. :class:`MetricsLogger` writes those
metrics to TensorBoard (``run_dir/tb/``) and to ``run_dir/metrics.jsonl``; it and
:func:`log_failed_run` are the only places in pipetrain that create a
:class:`~torch.utils.tensorboard.SummaryWriter`.

Runs compare in TensorBoard: each run's hparams entry (:meth:`MetricsLogger.log_hparams`) names the
same few columns in every run of a sweep, its figures are the last values of the step scalars
(:data:`HPARAM_METRICS`, no single-point charts of their own), and a custom scalars layout
(:data:`CUSTOM_SCALARS_LAYOUT`) puts measured and predicted bubble on one chart.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from torch.utils.tensorboard import SummaryWriter

from pipetrain.critical_path import CriticalPath, critical_path
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
    "MEDIAN_TAGS",
    "HPARAM_METRICS",
    "CUSTOM_SCALARS_LAYOUT",
    "MetricsLogger",
    "log_failed_run",
    "write_chrome_trace",
]

MEDIAN_TAGS = ("perf/samples_per_sec", "perf/step_time_s", "pipeline/bubble_fraction")
"""Figures also logged as ``<tag>_median``: the median over the logged steps so far after the first (the
first carries the warm-up; it alone counts until a second is logged). Steadier than one step's value: the
figures a sweep's summary and HPARAMS table rank runs by."""

HPARAM_METRICS = {
    "perf/samples_per_sec_median": "samples/s",
    "perf/step_time_s_median": "step time (s)",
    "pipeline/bubble_fraction_median": "bubble",
    "pipeline/bubble_fraction_predicted": "bubble predicted",
    "train/loss": "loss",
}
"""Step scalars shown as the HPARAMS table's figures (their last logged value), with their column names.
TensorBoard shows the first five metrics of an experiment by default: these five all show."""

CUSTOM_SCALARS_LAYOUT = {
    "pipeline": {
        "bubble fraction: measured vs predicted": [
            "Multiline",
            ["^pipeline/bubble_fraction$", "^pipeline/bubble_fraction_predicted$"],
        ],
        "busy per worker (s)": ["Multiline", [r"^worker\d+/busy_s$"]],
        "idle per worker (s)": ["Multiline", [r"^worker\d+/idle_s$"]],
    },
}
"""TensorBoard's CUSTOM SCALARS page: charts that put related tags on one axis (tags are regular
expressions there, hence the anchors)."""


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
    busy_f_s: float = 0.0
    """The part of ``busy_s`` spent in forward actions (``F``)."""
    busy_b_s: float = 0.0
    """The part of ``busy_s`` spent in full backward actions (``B``)."""
    busy_i_s: float = 0.0
    """The part of ``busy_s`` spent in input-gradient actions (``I``, split backward)."""
    busy_w_s: float = 0.0
    """The part of ``busy_s`` spent in weight-gradient actions (``W``, split backward)."""
    allreduce_s: float = 0.0
    """With replicas: time its stages' gradient averages took, from start to end (overlapped or not)."""
    allreduce_exposed_s: float = 0.0
    """With replicas: the part of ``allreduce_s`` its optimizer steps waited for."""
    cpu_s: float | None = None
    """CPU seconds of its whole process since the previous step (workers in processes of their own)."""
    resident_bytes: int | None = None
    """Host memory its whole process held at the end of the step (workers in processes of their own)."""
    device_memory_bytes: int | None = None
    """Peak GPU memory its process allocated in the step (``torch.cuda.max_memory_allocated``; CUDA only)."""


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
    """Simulated bubble of the schedule with unit costs (``F = B = 1``; ``F = I = W = 1`` when the schedule
    splits backward)."""
    bubble_fraction_predicted_measured_costs: float
    """Simulated bubble of the schedule with this step's measured mean compute times (per stage and
    action kind: ``F``, ``B``, ``I``, ``W``)."""
    workers: tuple[WorkerFigures, ...]
    data_time_s: float = 0.0
    """Time the driver spent taking batches within ``step_time_s`` (with ``train.submit_ahead``, those of
    the step handed out ahead)."""
    learning_rate: float | None = None
    """The step's learning rate (``None``: no stage has an optimizer)."""
    grad_norm: float | None = None
    """The global gradient norm before clipping (only with ``train.clip_grad_norm``)."""
    evaluation: Evaluation | None = None
    """The evaluation pass run after this step, if one was."""
    replicas: tuple[tuple[WorkerFigures, ...], ...] = ()
    """With ``pipeline.replicas`` > 1: every replica's worker figures (``workers`` are replica 0's)."""
    driver_cpu_s: float | None = None
    """CPU seconds of the driver's process since the previous step (when it has one of its own)."""
    window_s: float = 0.0
    """The schedule's execution window (see :func:`worker_figures`): what the bubble is measured over."""
    window_predicted_measured_costs_s: float = 0.0
    """The window the simulator predicts with this step's measured mean compute times (the makespan
    behind ``bubble_fraction_predicted_measured_costs``)."""
    critical_path: CriticalPath | None = None
    """The step's window split along its critical path into compute, transfers, the runtime's overhead
    between actions, and its start (replica 0's; :mod:`pipetrain.critical_path`)."""

    @property
    def cpu_s(self) -> float | None:
        """CPU seconds of the driver's and every worker's process in the step (every replica's), where
        they run in processes of their own."""
        workers = [f.cpu_s for replica in self.replicas or (self.workers,) for f in replica]
        if self.driver_cpu_s is None or any(cpu is None for cpu in workers):
            return None
        return self.driver_cpu_s + sum(cpu for cpu in workers if cpu is not None)

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
        scalars["pipeline/window_s"] = float(self.window_s)
        predicted_window = float(self.window_predicted_measured_costs_s)
        scalars["pipeline/window_predicted_measured_costs_s"] = predicted_window
        if self.critical_path is not None:
            path = self.critical_path
            scalars["pipeline/critical_path/compute_s"] = float(path.compute_s)
            scalars["pipeline/critical_path/transfer_s"] = float(path.transfer_s)
            scalars["pipeline/critical_path/overhead_s"] = float(path.overhead_s)
            scalars["pipeline/critical_path/start_s"] = float(path.start_s)
            scalars["pipeline/critical_path/transfers"] = float(path.transfers)
            scalars["pipeline/critical_path/actions"] = float(len(path.actions))
        if self.cpu_s is not None:
            scalars["perf/cpu_s"] = float(self.cpu_s)
            scalars["perf/driver_cpu_s"] = float(self.driver_cpu_s or 0.0)
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
            for kind in _KINDS:
                scalars[f"worker{k}/busy_{kind}_s"] = float(getattr(figures, f"busy_{kind}_s"))
            if figures.cpu_s is not None:
                scalars[f"worker{k}/cpu_s"] = float(figures.cpu_s)
            if figures.resident_bytes is not None:
                scalars[f"worker{k}/host_memory_mib"] = figures.resident_bytes / 2**20
            if figures.device_memory_bytes is not None:
                scalars[f"worker{k}/device_memory_mib"] = figures.device_memory_bytes / 2**20
            if self.replicas:
                scalars[f"worker{k}/allreduce_s"] = float(figures.allreduce_s)
                scalars[f"worker{k}/allreduce_exposed_s"] = float(figures.allreduce_exposed_s)
        for r, replica in enumerate(self.replicas):
            for k, figures in enumerate(replica):
                scalars[f"replica{r}/worker{k}/busy_s"] = float(figures.busy_s)
                scalars[f"replica{r}/worker{k}/idle_s"] = float(figures.idle_s)
        return scalars


_KINDS = ("f", "b", "i", "w")
"""Action kinds whose busy time is logged apart, by their letter (``worker<k>/busy_<letter>_s``)."""


def _busy_by_kind(reports: Sequence[StageReport]) -> dict[str, float]:
    """Seconds of COMPUTE spans of each action kind, keyed ``busy_<letter>_s``."""
    busy = {f"busy_{kind}_s": 0.0 for kind in _KINDS}
    for report in reports:
        for span in report.spans:
            if span.category == SpanCategory.COMPUTE:
                busy[f"busy_{Action.parse(span.name).kind.value.lower()}_s"] += span.duration
    return busy


def _first_known(values: Iterable[Any]) -> Any:
    """The first value that is not ``None`` (a per-process figure, the same on every stage of a worker)."""
    return next((value for value in values if value is not None), None)


def _largest_known(values: Iterable[int | None]) -> int | None:
    """The largest value that is not ``None``, or ``None`` when none is known (no stage on CUDA)."""
    known = [value for value in values if value is not None]
    return max(known) if known else None


def _by_stage(reports: Sequence[StageReport]) -> list[StageReport]:
    return sorted(reports, key=lambda report: report.stage_idx)


def worker_figures(
    reports: Sequence[StageReport], window_s: float, placement: Sequence[int]
) -> tuple[WorkerFigures, ...]:
    """Busy, idle and transfer seconds of each worker (ordered by worker index).

    ``placement[stage_idx]`` is the worker hosting that stage. ``window_s`` is the wall time of the
    schedule's execution, from the first worker beginning the step to the last action completing; a
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
                allreduce_s=sum(report.allreduce_s for report in own),
                allreduce_exposed_s=sum(report.allreduce_exposed_s for report in own),
                cpu_s=_first_known(report.process_cpu_s for report in own),
                resident_bytes=_first_known(report.process_resident_bytes for report in own),
                device_memory_bytes=_largest_known(report.peak_memory_bytes for report in own),
                **_busy_by_kind(own),
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
    """Per-stage mean duration of the COMPUTE spans of each action kind.

    Span names are parsed as actions (``"1F3"``); a stage without spans of a kind gets 0.0. When any
    stage ran split backward actions, the costs carry their ``I`` and ``W`` means too, and a stage's
    ``backward`` is its ``I + W`` where it ran no full ``B``.
    """
    means: dict[ActionKind, list[float]] = {kind: [] for kind in ActionKind}
    for report in _by_stage(reports):
        durations: dict[ActionKind, list[float]] = {kind: [] for kind in ActionKind}
        for span in report.spans:
            if span.category == SpanCategory.COMPUTE:
                durations[Action.parse(span.name).kind].append(span.duration)
        for kind in ActionKind:
            means[kind].append(_mean(durations[kind]))
        if not durations[ActionKind.BACKWARD]:
            means[ActionKind.BACKWARD][-1] = (
                means[ActionKind.INPUT_GRAD][-1] + means[ActionKind.WEIGHT_GRAD][-1]
            )
    split = any(means[ActionKind.INPUT_GRAD]) or any(means[ActionKind.WEIGHT_GRAD])
    return StageCosts(
        forward=tuple(means[ActionKind.FORWARD]),
        backward=tuple(means[ActionKind.BACKWARD]),
        input_grad=tuple(means[ActionKind.INPUT_GRAD]) if split else None,
        weight_grad=tuple(means[ActionKind.WEIGHT_GRAD]) if split else None,
    )


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
    replica_reports: Sequence[Sequence[StageReport]] = (),
    driver_cpu_s: float | None = None,
) -> StepMetrics:
    """Assemble the :class:`StepMetrics` of one step from the stages' reports.

    ``step_time_s`` is the whole step (including the optimizer) and gives the throughput;
    ``window_s`` is the schedule's execution window (see :func:`worker_figures`); ``data_time_s`` is the
    part of the step spent waiting for the batch; ``grad_norm`` the global gradient norm, when clipped.
    With more than one ``replica_reports`` (``reports`` being replica 0's), the measured bubble is over
    the workers of every replica, and each replica's figures are kept too. ``driver_cpu_s``: the driver
    process's CPU seconds in the step, when it has a process of its own.
    """
    figures = worker_figures(reports, window_s, schedule.placement)
    replicas = (
        tuple(worker_figures(own, window_s, schedule.placement) for own in replica_reports)
        if len(replica_reports) > 1
        else ()
    )
    rates = [report.learning_rate for report in _by_stage(reports) if report.learning_rate is not None]
    predicted = simulate(schedule, measured_costs(reports))
    return StepMetrics(
        step=step,
        loss=float(loss),
        samples_per_sec=batch_size / step_time_s if step_time_s > 0 else 0.0,
        step_time_s=float(step_time_s),
        bubble_fraction=measured_bubble_fraction([f for replica in replicas or (figures,) for f in replica]),
        bubble_fraction_predicted=_unit_cost_bubble(schedule),
        bubble_fraction_predicted_measured_costs=predicted.bubble_fraction,
        workers=figures,
        data_time_s=float(data_time_s),
        learning_rate=rates[0] if rates else None,
        grad_norm=grad_norm,
        evaluation=evaluation,
        replicas=replicas,
        driver_cpu_s=driver_cpu_s,
        window_s=float(window_s),
        window_predicted_measured_costs_s=predicted.makespan,
        critical_path=critical_path(schedule, reports, window_s),
    )


@functools.lru_cache(maxsize=16)
def _unit_cost_bubble(schedule: Schedule) -> float:
    """The bubble ``schedule`` has with unit costs (the same every step: simulated once)."""
    return simulate(schedule).bubble_fraction


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


def _hparams_summaries(hparams: dict[str, object], status: str) -> list[Summary]:
    """The hparams plugin's experiment, session start and session end records of one run.

    The experiment lists the run's hparams (``status`` among them) and :data:`HPARAM_METRICS`; every run of
    a sweep writes the same names, so whichever run's experiment TensorBoard reads, the table is the same.
    """
    values = {str(k): _hparam_value(v) for k, v in hparams.items()}
    values["status"] = status
    start = plugin_data_pb2.SessionStartInfo()
    infos = []
    for name, value in values.items():
        if isinstance(value, bool):
            start.hparams[name].bool_value = value
            kind = api_pb2.DATA_TYPE_BOOL
        elif isinstance(value, (int, float)):
            start.hparams[name].number_value = value
            kind = api_pb2.DATA_TYPE_FLOAT64
        else:
            start.hparams[name].string_value = value
            kind = api_pb2.DATA_TYPE_STRING
        infos.append(api_pb2.HParamInfo(name=name, type=kind))
    experiment = api_pb2.Experiment(
        hparam_infos=infos,
        metric_infos=[
            api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=label)
            for tag, label in HPARAM_METRICS.items()
        ],
    )
    end = plugin_data_pb2.SessionEndInfo(
        status=api_pb2.STATUS_SUCCESS if status == "ok" else api_pb2.STATUS_FAILURE
    )
    records = [
        (hparams_metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)),
        (
            hparams_metadata.SESSION_START_INFO_TAG,
            plugin_data_pb2.HParamsPluginData(session_start_info=start),
        ),
        (hparams_metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end)),
    ]
    summaries = []
    for tag, data in records:
        data.version = hparams_metadata.PLUGIN_DATA_VERSION
        plugin_data = SummaryMetadata.PluginData(
            plugin_name=hparams_metadata.PLUGIN_NAME, content=data.SerializeToString()
        )
        summaries.append(
            Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin_data))])
        )
    return summaries


def log_failed_run(run_dir: Path | str, hparams: dict[str, object]) -> None:
    """Record a run that failed as a row of TensorBoard's HPARAMS table (``status`` = ``failed``).

    Written into ``run_dir/tb/`` next to whatever the run logged before it stopped, so a sweep's failed
    jobs are rows too.
    """
    with SummaryWriter(log_dir=str(Path(run_dir) / "tb")) as writer:
        for summary in _hparams_summaries(hparams, "failed"):
            writer.file_writer.add_summary(summary)


class MetricsLogger:
    """Writes step metrics to TensorBoard (``run_dir/tb/``) and ``run_dir/metrics.jsonl``.

    A run that continues after step ``continue_after`` (a resume, or a restart) logs its steps afresh: the
    lines of later steps that a run stopped after that checkpoint left in ``metrics.jsonl`` are dropped,
    and TensorBoard hides their events (the writer's ``purge_step``); the medians go on from the kept lines.
    Usable as a context manager; :meth:`close` flushes and closes both outputs.
    """

    def __init__(self, run_dir: Path | str, continue_after: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.tb_dir = self.run_dir / "tb"
        self.tb_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        kept = _keep_lines_up_to(self.jsonl_path, continue_after) if continue_after > 0 else []
        purge_step = continue_after + 1 if continue_after > 0 else None
        self._writer: SummaryWriter | None = SummaryWriter(log_dir=str(self.tb_dir), purge_step=purge_step)
        self._writer.add_custom_scalars(CUSTOM_SCALARS_LAYOUT)
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8")
        self._history: dict[str, list[float]] = {
            tag: [line[tag] for line in kept if tag in line] for tag in MEDIAN_TAGS
        }

    def _require_open(self) -> SummaryWriter:
        if self._writer is None:
            raise RuntimeError("MetricsLogger is closed")
        return self._writer

    def log_step(self, metrics: StepMetrics) -> None:
        """Write the scalars of ``metrics`` and the :data:`MEDIAN_TAGS` medians at ``metrics.step``, and one
        JSON line."""
        writer = self._require_open()
        scalars = metrics.scalars()
        for tag, history in self._history.items():
            history.append(scalars[tag])
            scalars[f"{tag}_median"] = statistics.median(history[1:] or history)
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, global_step=metrics.step)
        writer.flush()
        self._jsonl.write(json.dumps({"step": metrics.step, **scalars}) + "\n")
        self._jsonl.flush()

    def log_hparams(self, hparams: dict[str, object], status: str = "ok") -> None:
        """Record the run as a row of TensorBoard's HPARAMS table: ``hparams`` plus ``status``.

        Values that are not bool/int/float/str are stored as their ``str``. The row's figures are the last
        values of the scalars in :data:`HPARAM_METRICS`. The records go to ``run_dir/tb/`` itself, so one
        TensorBoard over a sweep's run directories shows the runs as one table.
        """
        writer = self._require_open()
        for summary in _hparams_summaries(hparams, status):
            writer.file_writer.add_summary(summary)
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


def _keep_lines_up_to(path: Path, step: int) -> list[dict]:
    """Rewrite ``path`` (atomically) keeping only its lines of steps up to ``step``; return them parsed.

    A torn last line (the writer killed mid-line) is dropped too.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(record)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")
    os.replace(tmp, path)
    return kept
