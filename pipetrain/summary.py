"""A sweep's answer: one row per job, read from the jobs' run directories, written as CSV and markdown.

``<sweep_dir>/summary.csv`` and ``summary.md`` list every job of a multirun, fastest first: its overrides,
split, schedule, micro-batches, throughput, step time, measured and predicted bubble, final loss and status;
failed jobs follow, with their error. The figures come from each run's ``metrics.jsonl`` and
``config.yaml``: the last logged values of throughput, step time and measured bubble medians
(:data:`~pipetrain.metrics.MEDIAN_TAGS`: over the logged steps after the first), predicted bubble and loss,
the same figures as the sweep's HPARAMS table in TensorBoard.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "JobRow",
    "job_row",
    "run_config",
    "run_error",
    "sorted_rows",
    "best_row",
    "write_summary",
    "format_markdown",
    "describe_best",
]

CSV_NAME = "summary.csv"
MARKDOWN_NAME = "summary.md"
_COLUMNS = (
    "job",
    "overrides",
    "split",
    "schedule",
    "m",
    "samples_per_sec",
    "step_time_s",
    "bubble",
    "bubble_predicted",
    "final_loss",
    "status",
    "error",
    "dir",
)
_ERROR_LINE = re.compile(
    r"^(?:\[[^\]]*\] )?pipetrain(?: \[rank \d+\])?: ((?:configuration error|run stopped).*)$"
)


@dataclass(frozen=True, kw_only=True)
class JobRow:
    """One job of a sweep and what it achieved (figures are ``None`` when the job logged none)."""

    job: int
    """Hydra's job number (the order the sweep ran them)."""
    overrides: str
    """The overrides the sweep varies, as typed (``schedule=1f1b pipeline.balance=[2,4]``)."""
    split: str
    """Units per stage (``[2,4]``), from the run's resolved ``pipeline.balance`` or ``pipeline.stages``."""
    schedule: str
    m: int | None
    """Micro-batches per step."""
    samples_per_sec: float | None
    step_time_s: float | None
    bubble: float | None
    """Measured bubble fraction."""
    bubble_predicted: float | None
    """The schedule's simulated bubble fraction (unit costs)."""
    final_loss: float | None
    status: str
    """``ok``, ``interrupted`` or ``failed (...)``."""
    error: str = ""
    dir: str = ""
    """The job's run directory, relative to the sweep directory."""


def job_row(
    job: int, overrides: str, run_dir: Path, config: dict[str, Any], status: str, error: str = ""
) -> JobRow:
    """The row of the job that ran in ``run_dir`` with the resolved ``config`` (a plain mapping).

    ``config`` is the run's ``config.yaml`` when it was written, else the job's composed config.
    """
    records = _records(run_dir / "metrics.jsonl")
    pipeline = config.get("pipeline") or {}
    schedule = config.get("schedule") or {}
    return JobRow(
        job=job,
        overrides=overrides,
        split=_split(pipeline),
        schedule=str(schedule.get("name", "")) if isinstance(schedule, dict) else str(schedule),
        m=pipeline.get("num_microbatches"),
        samples_per_sec=_last(records, "perf/samples_per_sec_median"),
        step_time_s=_last(records, "perf/step_time_s_median"),
        bubble=_last(records, "pipeline/bubble_fraction_median"),
        bubble_predicted=_last(records, "pipeline/bubble_fraction_predicted"),
        final_loss=_last(records, "train/loss"),
        status=status,
        error=error,
        dir=run_dir.name,
    )


def run_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``config.yaml`` as a plain mapping, or ``None`` when the run did not get to write it."""
    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def run_error(run_dir: Path) -> str:
    """What the run said last about why it stopped (``configuration error: ...``, ``run stopped ...``), from
    its ``train.log``; ``""`` when it said nothing."""
    path = run_dir / "train.log"
    if not path.is_file():
        return ""
    found = ""
    for line in path.read_text(errors="replace").splitlines():
        match = _ERROR_LINE.match(line)
        if match:
            found = match.group(1)
    return found


def sorted_rows(rows: Sequence[JobRow]) -> list[JobRow]:
    """Jobs that logged a throughput, fastest first; then the others in the order they ran."""
    measured = [row for row in rows if row.status == "ok" and row.samples_per_sec is not None]
    others = sorted((row for row in rows if row not in measured), key=lambda row: row.job)
    return sorted(measured, key=lambda row: (-row.samples_per_sec, row.job)) + others


def write_summary(sweep_dir: Path, rows: Sequence[JobRow]) -> tuple[Path, Path]:
    """Write ``summary.csv`` and ``summary.md`` (rows sorted by :func:`sorted_rows`); return their paths."""
    rows = sorted_rows(rows)
    csv_path, md_path = sweep_dir / CSV_NAME, sweep_dir / MARKDOWN_NAME
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(_COLUMNS)
        for row in rows:
            writer.writerow(["" if value is None else value for value in _values(row)])
    md_path.write_text(format_markdown(rows))
    return csv_path, md_path


def format_markdown(rows: Sequence[JobRow]) -> str:
    """The rows as a markdown table (in the given order), with the best job named below it."""
    header = ("job", "overrides", "split", "schedule", "m", "samples/s", "step time (s)", "bubble")
    header += ("bubble predicted", "final loss", "status", "error", "dir")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = (
            str(row.job),
            _code(row.overrides),
            row.split,
            row.schedule,
            _text(row.m),
            _number(row.samples_per_sec, ".1f"),
            _number(row.step_time_s, ".4f"),
            _number(row.bubble, ".3f"),
            _number(row.bubble_predicted, ".3f"),
            _number(row.final_loss, ".4f"),
            row.status,
            row.error,
            _code(row.dir),
        )
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    best = describe_best(rows)
    if best:
        lines += ["", best]
    return "\n".join(lines) + "\n"


def best_row(rows: Sequence[JobRow]) -> JobRow | None:
    """The fastest job that finished, or ``None`` when none did."""
    ranked = sorted_rows(rows)
    if not ranked or ranked[0].status != "ok" or ranked[0].samples_per_sec is None:
        return None
    return ranked[0]


def describe_best(rows: Sequence[JobRow]) -> str:
    """One line naming the fastest job that finished, or ``""`` when none did."""
    best = best_row(rows)
    if best is None:
        return ""
    return (
        f"best: job {best.job} `{best.overrides}`: {best.samples_per_sec:.1f} samples/s, "
        f"step {best.step_time_s:.4f} s, bubble {best.bubble:.3f} (in {best.dir})"
    )


def _values(row: JobRow) -> list[object]:
    return [getattr(row, column) for column in _COLUMNS]


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
            continue
    return records


def _last(records: list[dict[str, Any]], key: str) -> float | None:
    values = [record[key] for record in records if key in record]
    return values[-1] if values else None


def _split(pipeline: dict[str, Any]) -> str:
    """Units per stage as ``[a,b,...]``; any other resolved ``balance`` (a future ``auto``) as it is."""
    balance = pipeline.get("balance")
    if balance is None and isinstance(pipeline.get("stages"), list):
        balance = [len(stage) for stage in pipeline["stages"]]
    if isinstance(balance, list):
        return "[" + ",".join(str(count) for count in balance) + "]"
    return "" if balance is None else str(balance)


def _number(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _code(text: str) -> str:
    return f"`{text}`" if text else ""
