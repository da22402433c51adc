"""Chrome Trace Event Format export of a step's stage spans.

The file opens in Perfetto (https://ui.perfetto.dev) and ``chrome://tracing``: every worker is
one process (``pid`` = worker index; the span names are actions, ``3F2``, which name the stage) and
every :class:`~pipetrain.timings.SpanCategory` one thread of it, so compute, waits, transfers and the
optimizer steps of a worker show as separate lanes. Compute spans carry their action kind (``args.kind``)
and a colour per kind (``cname``: forward, full backward, and the split backward's input and weight
gradients each in their own). Times are microseconds relative to an origin (by default the earliest span
start).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipetrain.schedule import Action, ActionKind
from pipetrain.timings import SpanCategory, StageReport

__all__ = [
    "CATEGORY_TIDS",
    "KIND_COLOURS",
    "chrome_trace_events",
    "write_chrome_trace",
    "write_trace_document",
]

CATEGORY_TIDS: dict[SpanCategory, int] = {category: tid for tid, category in enumerate(SpanCategory)}
"""Thread id of each span category inside a stage's process (fixed across stages and steps)."""

KIND_COLOURS: dict[ActionKind, str] = {
    ActionKind.FORWARD: "thread_state_running",
    ActionKind.BACKWARD: "thread_state_iowait",
    ActionKind.INPUT_GRAD: "rail_response",
    ActionKind.WEIGHT_GRAD: "rail_animation",
}
"""Colour (a Chrome trace ``cname``) of the compute spans of each action kind."""

_US_PER_S = 1e6


def _metadata_event(name: str, pid: int, args: dict[str, Any], tid: int = 0) -> dict[str, Any]:
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": args}


def _identity_placement(reports: Sequence[StageReport]) -> list[int]:
    return list(range(max((report.stage_idx for report in reports), default=-1) + 1))


def _default_origin(reports: Sequence[StageReport]) -> float:
    starts = [span.start for report in reports for span in report.spans]
    return min(starts) if starts else 0.0


def chrome_trace_events(
    reports: Sequence[StageReport], origin: float | None = None, placement: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """The trace events of ``reports``: metadata events first, then one ``"X"`` event per span.

    ``origin`` is the wall-clock time (seconds) that maps to ``ts == 0``; it defaults to the
    earliest span start over all reports. ``placement[stage_idx]`` is the worker of a stage (default:
    stage k on worker k).
    """
    if origin is None:
        origin = _default_origin(reports)
    worker_of = placement if placement is not None else _identity_placement(reports)
    events: list[dict[str, Any]] = []
    for pid in sorted({worker_of[report.stage_idx] for report in reports}):
        stages = sorted(report.stage_idx for report in reports if worker_of[report.stage_idx] == pid)
        events.append(_metadata_event("process_name", pid, {"name": f"worker {pid} (stages {stages})"}))
        events.append(_metadata_event("process_sort_index", pid, {"sort_index": pid}))
        for category, tid in CATEGORY_TIDS.items():
            events.append(_metadata_event("thread_name", pid, {"name": category.value}, tid))
            events.append(_metadata_event("thread_sort_index", pid, {"sort_index": tid}, tid))
    for report in reports:
        for span in report.spans:
            event = {
                "name": span.name,
                "cat": SpanCategory(span.category).value,
                "ph": "X",
                "pid": worker_of[report.stage_idx],
                "tid": CATEGORY_TIDS[SpanCategory(span.category)],
                "ts": (span.start - origin) * _US_PER_S,
                "dur": max(span.duration, 0.0) * _US_PER_S,
            }
            if SpanCategory(span.category) is SpanCategory.COMPUTE:
                kind = Action.parse(span.name).kind
                event["cname"] = KIND_COLOURS[kind]
                event["args"] = {"kind": kind.value}
            events.append(event)
    return events


def write_chrome_trace(
    path: Path | str,
    reports: Sequence[StageReport],
    origin: float | None = None,
    metadata: Mapping[str, Any] | None = None,
    placement: Sequence[int] | None = None,
) -> None:
    """Write ``reports`` as a Chrome Trace Event Format JSON file at ``path``, atomically.

    The document is ``{"traceEvents": [...], "displayTimeUnit": "ms"}`` (plus ``"otherData"``
    when ``metadata`` is given), written by :func:`write_trace_document`.
    """
    document: dict[str, Any] = {
        "traceEvents": chrome_trace_events(reports, origin, placement),
        "displayTimeUnit": "ms",
    }
    if metadata:
        document["otherData"] = dict(metadata)
    write_trace_document(path, document)


def write_trace_document(path: Path | str, document: Mapping[str, Any]) -> None:
    """Write a Chrome trace ``document`` (``{"traceEvents": [...], ...}``) as JSON at ``path``, atomically.

    It is written to a temporary file in the same directory and moved into place with :func:`os.replace`,
    so readers never see a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            json.dump(document, tmp)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
