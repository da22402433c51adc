"""The figures, rows and outputs of ``scripts/bench.py`` (its docstring defines every column)."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from bench_settings import Config, Settings, configurations, model_overrides, schedule_of, unsupported

from pipetrain.schedule import Schedule, Timeline, simulate, splits_backward

__all__ = ["build_rows", "check_losses", "describe", "format_table", "summarize_run", "write_outputs"]

COLUMNS = [
    # (header, row key, format)
    ("method", "method", "{}"),
    ("m", "m", "{}"),
    ("step_s", "step_time_s", "{:.4f}"),
    ("samples/s", "samples_per_sec", "{:.1f}"),
    ("x_1t", "x_1t", "{:.2f}"),
    ("t_mb_ms", "t_mb_ms", "{:.1f}"),
    ("E_mb", "e_mb", "{:.2f}"),
    ("bubble", "bubble", "{:.3f}"),
    ("pred_u", "pred_unit", "{:.3f}"),
    ("pred_m", "pred_measured", "{:.3f}"),
    ("ovh_ms", "overhead_ms", "{:.2f}"),
    ("cp_xfer", "path_transfer_ms", "{:.1f}"),
    ("cp_gap", "path_overhead_ms", "{:.1f}"),
    ("rt_ms", "runtime_ms_per_action", "{:.2f}"),
    ("cpu_ms", "cpu_ms", "{:.0f}"),
    ("peak_MiB", "peak_activation_mib", "{}"),
    ("vs_pp", "vs_pp", "{:.2f}"),
]

CSV_FIELDS = (
    "method schedule m p workers batch_size runs_ok step_time_s samples_per_sec x_1t t_mb_ms e_mb bubble "
    "pred_unit pred_measured overhead_ms path_transfer_ms path_overhead_ms runtime_ms_per_action cpu_ms "
    "peak_activation_mib vs_pp "
    "loss_step1 not_applicable"
).split()


def step_figures(record: dict[str, Any], batch_size: int, unit: Timeline | None) -> dict[str, Any]:
    """The table's figures for one measured step; ``unit`` is the schedule simulated with unit costs
    (``None`` for the single-process methods)."""
    step_time = record["step_time_s"]
    figures: dict[str, Any] = {"step_time_s": step_time, "samples_per_sec": batch_size / step_time}
    if unit is None:
        return figures
    schedule = unit.schedule
    stage_passes = schedule.num_stages // schedule.num_workers * schedule.num_microbatches
    busy = record["busy_s"]
    t_mb = max(busy) / stage_passes
    figures.update(
        t_mb_ms=t_mb * 1e3,
        e_mb=unit.makespan / _unit_passes(schedule) * t_mb / step_time,
        bubble=record["bubble"],
        pred_unit=record["pred_unit"],
        pred_measured=record["pred_measured"],
        overhead_ms=(record["window_s"] - measured_makespan(record))
        / (_unit_passes(schedule) * stage_passes)
        * 1e3,
        peak_activation_mib=list(record["peak_activation_mib"]),
    )
    if record.get("cpu_s") is not None:
        figures["cpu_ms"] = record["cpu_s"] * 1e3
    if record.get("path_transfer_s") is not None:
        figures["path_transfer_ms"] = record["path_transfer_s"] * 1e3
        figures["path_overhead_ms"] = record["path_overhead_s"] * 1e3
    if record.get("path_actions"):
        runtime_s = record["path_transfer_s"] + record["path_overhead_s"]
        figures["runtime_ms_per_action"] = runtime_s / record["path_actions"] * 1e3
    return figures


def _unit_passes(schedule: Schedule) -> int:
    """Unit-cost time of one micro-batch's forward and backward on one stage: F + B = 2, or F + I + W = 3
    for a schedule that splits the backward."""
    return 3 if splits_backward(schedule) else 2


def measured_makespan(record: dict[str, Any]) -> float:
    """Makespan of the schedule simulated with the step's measured per-stage mean forward / backward times.

    Each worker's simulated busy time is its measured ``busy_s`` (its stages' means times their counts), so
    the logged bubble of that simulation gives the makespan back: ``sum(busy) / (W * (1 - bubble))``.
    """
    busy = record["busy_s"]
    return sum(busy) / (len(busy) * (1.0 - record["pred_measured"]))


def median_figures(per_step: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Element-wise median of figure dicts (lists are taken per entry)."""
    result: dict[str, Any] = {}
    for key, first in per_step[0].items():
        if isinstance(first, list):
            result[key] = [statistics.median(f[key][i] for f in per_step) for i in range(len(first))]
        else:
            result[key] = statistics.median(f[key] for f in per_step)
    return result


def summarize_run(records: list[dict[str, Any]], settings: Settings, config: Config) -> dict[str, Any]:
    """Median figures of one run over its measured steps (the first ``--warmup`` dropped)."""
    unit = None if config.method == "single" else simulate(schedule_of(settings, config))
    measured = records[settings.warmup :]
    summary = median_figures([step_figures(record, settings.batch_size, unit) for record in measured])
    summary["loss_step1"] = records[0]["loss"]
    return summary


def build_rows(settings: Settings, results: dict[Config, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per configuration: medians over its successful repeats, plus the relative columns."""
    rows = [config_row(settings, config, results.get(config, [])) for config in configurations(settings)]
    by_key = {(row["method"], row["m"]): row for row in rows}
    pipelining = {(row["schedule"], row["m"]): row for row in rows if row["method"].startswith("pipelining-")}
    single = by_key.get(("single-1t", None), {}).get("samples_per_sec")
    for row in rows:
        if single and "samples_per_sec" in row:
            row["x_1t"] = row["samples_per_sec"] / single
        if row["method"].startswith("pipetrain") and "samples_per_sec" in row:
            reference = pipelining.get((row["schedule"], row["m"]), {}).get("samples_per_sec")
            if reference:
                row["vs_pp"] = row["samples_per_sec"] / reference
    return rows


def config_row(settings: Settings, config: Config, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The row of one configuration, without the columns relative to other rows."""
    row: dict[str, Any] = {
        "method": config.name,
        "schedule": config.schedule,
        "m": config.num_microbatches,
        "p": 1,
        "workers": 1,
        "batch_size": settings.batch_size,
        "runs_ok": len(runs),
    }
    reason = unsupported(settings, config)
    if reason:
        row["not_applicable"] = reason
    elif config.method != "single":
        schedule: Schedule = schedule_of(settings, config)
        row.update(p=schedule.num_stages, workers=schedule.num_workers)
    if runs:
        row.update(median_figures([{k: v for k, v in run.items() if k != "loss_step1"} for run in runs]))
        row["samples_per_sec"] = settings.batch_size / row["step_time_s"]
        row["loss_step1"] = runs[0]["loss_step1"]
        row["step_time_s_repeats"] = [run["step_time_s"] for run in runs]
    return row


def cell(row: dict[str, Any], key: str, fmt: str) -> str:
    """One table cell: ``-`` when the figure does not apply, ``failed`` when the run did not finish, ``n/a``
    when the configuration cannot run (see :func:`bench_settings.unsupported`)."""
    value = row.get(key)
    if value is None:
        if key == "step_time_s" and not row["runs_ok"]:
            return "n/a" if row.get("not_applicable") else "failed"
        return "-"
    if isinstance(value, list):
        return "/".join(f"{v:.2f}" for v in value)
    return fmt.format(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table, then a note per configuration that cannot run."""
    cells = [[header for header, _, _ in COLUMNS]]
    cells += [[cell(row, key, fmt) for _, key, fmt in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(
            text.rjust(width) if i else text.ljust(width)
            for i, (text, width) in enumerate(zip(line, widths, strict=True))
        )
        for line in cells
    ]
    lines.insert(1, "-" * len(lines[0]))
    notes = [
        f"n/a: {row['method']} m={row['m']}: {row['not_applicable']}"
        for row in rows
        if "not_applicable" in row
    ]
    return "\n".join([*lines, *notes])


def describe(settings: Settings) -> str:
    """One line naming what was measured."""
    v = settings.stages_per_worker
    return (
        f"model {settings.model} ({' '.join(model_overrides(settings))}), p={settings.num_workers} "
        f"(balance {list(settings.balance)}; interleaved: {settings.num_workers * v} stages, v={v}), "
        f"B={settings.batch_size}, {settings.steps} steps/run ({settings.warmup} warm-up dropped), "
        f"{settings.repeats} repeats, stage threads {settings.stage_threads}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}"
    )


def write_outputs(
    out: Path, settings: Settings, rows: list[dict[str, Any]], raw: list[dict[str, Any]]
) -> tuple[Path, Path]:
    """Write ``<out>.json`` (settings, rows, every run's medians) and ``<out>.csv`` (the rows)."""
    json_path, csv_path = Path(f"{out}.json"), Path(f"{out}.csv")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "description": describe(settings),
        "settings": asdict(settings),
        "overrides": model_overrides(settings),
        "rows": [{k: _json_value(v) for k, v in row.items()} for row in rows],
        "runs": raw,
    }
    json_path.write_text(json.dumps(document, indent=1))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            flat = dict(row)
            if isinstance(flat.get("peak_activation_mib"), list):
                flat["peak_activation_mib"] = "/".join(f"{v:.3f}" for v in flat["peak_activation_mib"])
            writer.writerow(flat)
    return json_path, csv_path


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_losses(rows: list[dict[str, Any]]) -> str | None:
    """A warning when the methods' first-step losses differ (they train the same model on the same batch)."""
    losses = {row["method"]: row["loss_step1"] for row in rows if row.get("loss_step1") is not None}
    if losses and max(losses.values()) - min(losses.values()) > 1e-3 * max(1.0, abs(min(losses.values()))):
        return f"warning: first-step losses differ between methods: {losses}"
    return None
