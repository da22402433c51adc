"""torch.profiler on every worker for chosen steps, merged with pipetrain's own timeline of the step.

With ``log.profile_steps=[N, ...]`` every worker runs ``torch.profiler.profile`` (CPU activities, plus
CUDA where one of its stages is on CUDA) around step N: it starts on the worker's compute thread before
the step's first action and stops after its last optimizer step. Meanwhile the runner names what the
compute thread does with ``torch.profiler.record_function``, so operators nest inside the action that
ran them:

    2F5                         an action (stage 2, forward, micro-batch 5)
    wait 2F5 <- worker 1        the compute thread blocked until that action's input came from worker 1
    optimizer step (stage 2)    a stage's optimizer step

and notes each input's flight, ``recv 2F5 <- worker 1``: from the moment worker 1 had the output ready
(on its clock) to its arrival here (on this worker's clock). Transfers run on transport threads, which the
profiler does not watch, so these spans come from the runner's own timestamps. Steps not profiled run
as without this module: no profiler, no ``record_function`` call.

After the step the driver asks each worker for its profile (:class:`WorkerProfile`: the profiler's
exported Chrome trace events, JSON-able, with the recvs) and writes ``traces/profile_step<N>.json``
(:func:`merge_trace`): one process per worker holding pipetrain's own lanes (compute, wait, transfer,
optimizer; see :mod:`pipetrain.trace`), its recv lanes and the profiler's thread (and GPU stream) lanes;
and ``traces/profile_step<N>.txt`` (:func:`summarize`: per worker, time per action kind and the top
operators by self CPU time), also printed in the driver's log.

Clocks. A profiler counts time from an origin of its own. Right after starting it, the worker reads its
wall clock (``time.time()``) just before and just after entering a marker ``record_function``, a few
times over; the marker with the tightest pair of readings (a thread switch between them widens the pair
and is dropped) and the middle of its readings map every profiler timestamp onto the worker's wall clock
(to a few microseconds). Each worker's wall clock is then mapped onto the driver's:
the driver notes when it sent the request for the profile and when the reply came back, and the worker
says when it answered, so the worker's clock offset lies within ``[answered - received, answered - sent]``.
The offset used is the point of that interval closest to zero: exactly zero on one machine (one clock),
and across machines the smallest correction the round trip allows (within half a round trip of the
truth). Every event of the merged trace is placed relative to the driver's start of the step (``ts`` 0,
microseconds).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, record_function

from pipetrain.schedule import Action
from pipetrain.timings import SpanCategory, StageReport
from pipetrain.trace import CATEGORY_TIDS, chrome_trace_events, write_trace_document

__all__ = [
    "Recv",
    "WorkerProfile",
    "StepProfiler",
    "warm_up",
    "recv_name",
    "wait_name",
    "optimizer_name",
    "clock_offset",
    "on_wall_clock",
    "request_profile",
    "merge_trace",
    "summarize",
    "write_profile",
]

_US_PER_S = 1e6
_CLOCK_MARK = "pipetrain clock"
"""The marker ``record_function`` whose timestamp ties a profile to the worker's wall clock."""
_CLOCK_READINGS = 8
"""Markers per profile: the one read most tightly is used (see the module's *Clocks*)."""
_ONE_PER_PROCESS = threading.Lock()
"""torch.profiler runs one profile per process at a time."""
_RECV_CATEGORY = "recv"
_NESTING_CATEGORIES = ("cpu_op", "user_annotation")
"""Profiler events that nest on a thread: operators, and the names the runner gives with record_function."""
_PIPELINE_CATEGORIES = tuple(category.value for category in SpanCategory)
_EPSILON_US = 0.01
_FLOW_ID_SPAN = 2**32
"""Worker ``w``'s flow ``i`` becomes ``(w + 1) * 2**32 + i`` (exact in JSON readers' doubles)."""


def recv_name(action: Action, producer_worker: int) -> str:
    """``"recv 2F5 <- worker 1"``: the flight of ``action``'s input from ``producer_worker``."""
    return f"recv {action} <- worker {producer_worker}"


def wait_name(action: Action, producer_worker: int) -> str:
    """``"wait 2F5 <- worker 1"``: the compute thread blocked until ``action``'s input arrived."""
    return f"wait {action} <- worker {producer_worker}"


def optimizer_name(stage_idx: int) -> str:
    """``"optimizer step (stage 2)"``."""
    return f"optimizer step (stage {stage_idx})"


@dataclass(frozen=True)
class Recv:
    """One input's flight from the worker that produced it, in seconds on each end's wall clock."""

    name: str
    """``recv 2F5 <- worker 1``."""
    producer_worker: int
    produced_at: float
    """When the producer had the output ready to send (the producer's clock)."""
    arrived_at: float
    """When it arrived on the consumer (the consumer's clock)."""


@dataclass(frozen=True)
class WorkerProfile:
    """What a worker hands the driver for a profiled step: plain data (``dataclasses.asdict`` is JSON)."""

    worker_idx: int
    started_at: float
    """The worker's wall clock (seconds) at ``ts == 0`` of ``events``."""
    events: list[dict[str, Any]]
    """The profiler's Chrome trace events as ``export_chrome_trace`` writes them, ``ts`` in microseconds
    since ``started_at``."""
    recvs: list[Recv] = field(default_factory=list)
    answered_at: float = 0.0
    """The worker's wall clock when it answered the driver's request (see the module's *Clocks*)."""
    clock_offset_s: float = 0.0
    """The worker's clock minus the driver's, set by the driver (:func:`request_profile`)."""


def warm_up() -> None:
    """Start and stop an empty profile: the first start in a process takes seconds (profiler set-up).

    Called once when a worker process starts, so no profiled step pays for it.
    """
    with _ONE_PER_PROCESS, torch.profiler.profile(activities=[ProfilerActivity.CPU]):
        pass


class StepProfiler:
    """One worker's profile of one step, started and stopped on its compute thread."""

    def __init__(self, worker_idx: int, devices: Iterable[torch.device]) -> None:
        self.worker_idx = worker_idx
        self._cuda_devices = sorted(
            {torch.device(d) for d in devices if torch.device(d).type == "cuda"}, key=str
        )
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self._cuda_devices else [])
        self._profile = torch.profiler.profile(activities=activities)
        self._recvs: list[Recv] = []
        self._clock_readings: list[tuple[float, float]] = []
        self._running = False

    def start(self) -> None:
        """Start the profiler on this thread and tie its clock to the wall clock."""
        if not _ONE_PER_PROCESS.acquire(blocking=False):
            raise RuntimeError(
                f"worker {self.worker_idx}: another worker of this process is being profiled; torch.profiler "
                "profiles one worker per process (run the workers as processes: python -m pipetrain.train)"
            )
        self._running = True
        self._profile.start()
        self._clock_readings = []
        for _ in range(_CLOCK_READINGS):
            before = time.time()
            with record_function(_CLOCK_MARK):
                after = time.time()
            self._clock_readings.append((before, after))

    def action(self, action: Action) -> record_function:
        """The scope of running ``action``, named like it (``2F5``)."""
        return record_function(str(action))

    def wait(self, action: Action, producer_worker: int) -> record_function:
        """The scope of blocking until ``action``'s input from ``producer_worker`` is there."""
        return record_function(wait_name(action, producer_worker))

    def optimizer_step(self, stage_idx: int) -> record_function:
        """The scope of stage ``stage_idx``'s optimizer step."""
        return record_function(optimizer_name(stage_idx))

    def received(self, action: Action, producer_worker: int, produced_at: float, arrived_at: float) -> None:
        """Note the flight of ``action``'s input (produced on the producer's clock, arrived on ours)."""
        self._recvs.append(Recv(recv_name(action, producer_worker), producer_worker, produced_at, arrived_at))

    def stop(self) -> None:
        """Stop the profiler (idempotent; also after a failed step)."""
        if not self._running:
            return
        self._running = False
        try:
            for device in self._cuda_devices:
                torch.cuda.synchronize(device)
        finally:
            try:
                self._profile.stop()
            finally:
                _ONE_PER_PROCESS.release()

    def discard(self) -> None:
        """Stop after a failed step: the step's own error is what counts, so a failure to stop is dropped."""
        try:
            self.stop()
        except Exception:  # noqa: BLE001 - the step's error is already on its way to the driver
            pass

    def export(self) -> WorkerProfile:
        """The stopped profile as :class:`WorkerProfile` (the profiler's Chrome trace, read back)."""
        with tempfile.TemporaryDirectory(prefix="pipetrain-profile-") as directory:
            path = Path(directory) / "trace.json"
            self._profile.export_chrome_trace(str(path))
            events = json.loads(path.read_text())["traceEvents"]
        started_at, events = on_wall_clock(events, self._clock_readings)
        return WorkerProfile(
            worker_idx=self.worker_idx,
            started_at=started_at,
            events=events,
            recvs=list(self._recvs),
            answered_at=time.time(),
        )


def on_wall_clock(
    events: list[dict[str, Any]], readings: Sequence[tuple[float, float]]
) -> tuple[float, list[dict[str, Any]]]:
    """Tie a profile to the wall clock: the wall-clock time of its new ``ts == 0``, and ``events``
    without the clock markers, their ``ts`` counted from the marker used.

    ``readings`` are the ``(before, after)`` wall-clock readings around each marker, in the order they
    were entered. The marker read most tightly is used; its time is the middle of its readings.
    """
    marks = sorted((e for e in events if _is_clock_mark(e)), key=lambda e: float(e["ts"]))
    if not marks or len(marks) != len(readings):
        raise RuntimeError(
            f"the profile has {len(marks)} clock markers for {len(readings)} readings; it cannot be placed "
            "on the step's timeline"
        )
    tightest = min(range(len(readings)), key=lambda i: readings[i][1] - readings[i][0])
    zero = float(marks[tightest]["ts"])
    shifted = []
    for event in events:
        if _is_clock_mark(event):
            continue
        if "ts" in event:
            event = {**event, "ts": float(event["ts"]) - zero}
        shifted.append(event)
    return sum(readings[tightest]) / 2, shifted


def _is_clock_mark(event: Mapping[str, Any]) -> bool:
    return event.get("name") == _CLOCK_MARK and event.get("ph") == "X"


def clock_offset(sent_at: float, answered_at: float, received_at: float) -> float:
    """A worker's clock minus the driver's, from one request (driver clock: sent, received; worker: answered).

    The worker answered between ``sent_at`` and ``received_at`` on the driver's clock, so the offset lies in
    ``[answered_at - received_at, answered_at - sent_at]``; the point of that interval closest to zero.
    """
    low, high = answered_at - received_at, answered_at - sent_at
    return min(max(0.0, low), high)


def request_profile(handle: Any) -> torch.futures.Future:
    """Ask ``handle``'s worker for its profile of the step just run (``handle.collect_profile()``).

    The future carries the :class:`WorkerProfile` with its ``clock_offset_s`` set, or the error as a value.
    """
    sent_at = time.time()

    def _received(reply: torch.futures.Future) -> Any:
        received_at = time.time()
        try:
            profile = reply.wait()
        except Exception as error:  # noqa: BLE001 - errors travel as values, like every reply
            return error
        if isinstance(profile, BaseException):
            return profile
        offset = clock_offset(sent_at, profile.answered_at, received_at)
        return dataclasses.replace(profile, clock_offset_s=offset)

    return handle.collect_profile().then(_received)


def merge_trace(
    reports: Sequence[StageReport],
    placement: Sequence[int],
    profiles: Sequence[WorkerProfile],
    origin: float,
    step: int,
) -> dict[str, Any]:
    """One Chrome trace of the step: per worker, pipetrain's lanes, its recvs and its profiler's lanes.

    ``origin`` is the driver's wall clock (seconds) at ``ts == 0``; each worker's times are first moved
    onto the driver's clock by its profile's ``clock_offset_s``.
    """
    offsets = {profile.worker_idx: profile.clock_offset_s for profile in profiles}
    events = _pipeline_events(reports, placement, origin, offsets)
    for profile in profiles:
        recv_events, recv_lanes = _recv_events(profile, origin, offsets, len(CATEGORY_TIDS))
        events += recv_events
        events += _profiler_events(profile, origin, len(CATEGORY_TIDS) + recv_lanes)
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "step": step,
            "origin_s": origin,
            "clock_offsets_s": {str(worker): offset for worker, offset in sorted(offsets.items())},
        },
    }


def _pipeline_events(
    reports: Sequence[StageReport], placement: Sequence[int], origin: float, offsets: Mapping[int, float]
) -> list[dict[str, Any]]:
    """pipetrain's own spans (:func:`~pipetrain.trace.chrome_trace_events`) on the driver's clock."""
    events = chrome_trace_events(reports, origin=origin, placement=placement)
    for event in events:
        if event["ph"] != "M":
            event["ts"] -= offsets.get(event["pid"], 0.0) * _US_PER_S
    return events


def _lane_metadata(pid: int, tid: int, name: str) -> list[dict[str, Any]]:
    return [
        {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}},
        {"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": tid}},
    ]


def _recv_events(
    profile: WorkerProfile, origin: float, offsets: Mapping[int, float], first_tid: int
) -> tuple[list[dict[str, Any]], int]:
    """The worker's recvs as ``X`` events in lanes from ``first_tid`` on; the events and the lanes used.

    Each recv starts on its producer's clock and ends on this worker's, both moved onto the driver's.
    Recvs in flight at the same time go in lanes side by side (a lane's slices must not overlap).
    """
    pid = profile.worker_idx
    spans = sorted(
        (
            (recv.produced_at - offsets.get(recv.producer_worker, 0.0) - origin) * _US_PER_S,
            (recv.arrived_at - offsets.get(pid, 0.0) - origin) * _US_PER_S,
            recv,
        )
        for recv in profile.recvs
    )
    lane_ends: list[float] = []
    events: list[dict[str, Any]] = []
    for start, end, recv in spans:
        lane = next((i for i, lane_end in enumerate(lane_ends) if lane_end <= start), len(lane_ends))
        if lane == len(lane_ends):
            lane_ends.append(end)
        lane_ends[lane] = max(end, start)
        events.append(
            {
                "name": recv.name,
                "cat": _RECV_CATEGORY,
                "ph": "X",
                "pid": pid,
                "tid": first_tid + lane,
                "ts": start,
                "dur": max(end - start, 0.0),
                "args": {"from worker": recv.producer_worker},
            }
        )
    for lane in range(len(lane_ends)):
        events += _lane_metadata(pid, first_tid + lane, "recv" if lane == 0 else f"recv {lane + 1}")
    return events, len(lane_ends)


def _profiler_events(profile: WorkerProfile, origin: float, first_tid: int) -> list[dict[str, Any]]:
    """The profiler's events in the worker's process: one lane per profiled thread or GPU stream."""
    pid = profile.worker_idx
    shift_us = (profile.started_at - profile.clock_offset_s - origin) * _US_PER_S
    process_names = {e["pid"]: e["args"]["name"] for e in profile.events if e.get("name") == "process_name"}
    thread_names = {
        (e["pid"], e["tid"]): e["args"]["name"] for e in profile.events if e.get("name") == "thread_name"
    }
    lanes: dict[tuple[Any, Any], int] = {}
    events: list[dict[str, Any]] = []
    for event in profile.events:
        if event.get("ph") == "M" or not isinstance(event.get("pid"), int) or "ts" not in event:
            continue  # metadata is rewritten below; string pids are the profiler's own bookkeeping
        key = (event["pid"], event.get("tid", 0))
        tid = lanes.setdefault(key, first_tid + len(lanes))
        moved = {**event, "pid": pid, "tid": tid, "ts": event["ts"] + shift_us}
        if isinstance(event.get("id"), int):  # flow ids count per process: keep the workers' flows apart
            moved["id"] = (pid + 1) * _FLOW_ID_SPAN + event["id"]
        events.append(moved)
    for (source_pid, source_tid), tid in lanes.items():
        process = process_names.get(source_pid, str(source_pid))
        thread = thread_names.get((source_pid, source_tid), str(source_tid))
        events += _lane_metadata(pid, tid, f"torch.profiler: {process} / {thread}")
    return events


@dataclass
class _Node:
    """A profiler event that nests on its thread, with what the summary needs of it."""

    name: str
    category: str
    start: float
    duration: float
    children_us: float = 0.0
    kind: str | None = None
    """Its own or its enclosing runner scope's kind: ``F``, ``B``, ``I``, ``W``, ``wait``, ``optimizer``."""

    @property
    def end(self) -> float:
        return self.start + self.duration

    @property
    def self_us(self) -> float:
        return max(self.duration - self.children_us, 0.0)


def _scope_kind(name: str) -> str | None:
    """The summary's kind of a runner scope name; ``None`` for other names."""
    if name.startswith("wait "):
        return "wait"
    if name.startswith("optimizer step"):
        return "optimizer"
    try:
        return Action.parse(name).kind.value
    except ValueError:
        return None


def _nest(events: Iterable[dict[str, Any]]) -> list[_Node]:
    """The nesting events of one thread as nodes, each with its children's time and its scope's kind."""
    nodes = [
        _Node(e["name"], e["cat"], float(e["ts"]), float(e.get("dur", 0.0)))
        for e in events
        if e.get("ph") == "X" and e.get("cat") in _NESTING_CATEGORIES
    ]
    nodes.sort(key=lambda node: (node.start, -node.duration))
    stack: list[_Node] = []
    for node in nodes:
        while stack and node.end > stack[-1].end + _EPSILON_US:
            stack.pop()
        parent = stack[-1] if stack else None
        if parent is not None:
            parent.children_us += node.duration
        own_kind = _scope_kind(node.name) if node.category == "user_annotation" else None
        node.kind = own_kind or (parent.kind if parent is not None else None)
        stack.append(node)
    return nodes


def _step_window_us(events: Sequence[dict[str, Any]]) -> float:
    """From the first pipetrain span's start to the last one's end, over all workers."""
    spans = [e for e in events if e.get("ph") == "X" and e.get("cat") in _PIPELINE_CATEGORIES]
    if not spans:
        return 0.0
    return max(e["ts"] + e["dur"] for e in spans) - min(e["ts"] for e in spans)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows of text in aligned columns (the first left-aligned, the others right-aligned), indented."""
    widths = [max(len(row[col]) for row in [header, *rows]) for col in range(len(header))]
    return ["  " + "  ".join(_aligned(row, widths)) for row in [header, *rows]]


def _aligned(row: Sequence[str], widths: Sequence[int]) -> list[str]:
    return [row[0].ljust(widths[0])] + [
        cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
    ]


def _ms(us: float) -> str:
    return f"{us / 1e3:.2f}"


def _covered_us(spans: Iterable[tuple[float, float]]) -> float:
    """Time covered by ``(start, duration)`` spans, overlaps counted once."""
    covered, reach = 0.0, float("-inf")
    for start, duration in sorted(spans):
        end = start + duration
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


def _kind_rows(nodes: Sequence[_Node], recvs: Sequence[dict[str, Any]], window_us: float) -> list[str]:
    """The per-kind table of one worker: time in F, B (I, W), waits, optimizer steps, and recvs."""
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    op_self: dict[str, float] = defaultdict(float)
    for node in nodes:
        scope = _scope_kind(node.name) if node.category == "user_annotation" else None
        if scope is not None:
            spans[scope].append((node.start, node.duration))
        elif node.category == "cpu_op" and node.kind is not None:
            op_self[node.kind] += node.self_us
    spans["recv"] = [(float(event["ts"]), float(event["dur"])) for event in recvs]
    rows = []
    for kind in ("F", "B", "I", "W", "wait", "optimizer", "recv"):
        if spans.get(kind):
            total, count = sum(duration for _, duration in spans[kind]), len(spans[kind])
            share = f"{100 * _covered_us(spans[kind]) / window_us:.1f}%" if window_us > 0 else "-"
            self_ms = _ms(op_self[kind]) if kind != "recv" else "-"
            rows.append([kind, str(count), _ms(total), _ms(total / count), share, self_ms])
    return _table(["kind", "count", "total ms", "mean ms", "% of step", "op self ms"], rows)


def _operator_rows(nodes: Sequence[_Node], top: int) -> list[str]:
    """The top ``top`` operators of one worker by self CPU time, split by the kind of scope they ran in."""
    by_name: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    calls: dict[str, int] = defaultdict(int)
    for node in nodes:
        if node.category == "cpu_op":
            calls[node.name] += 1
            by_name[node.name][node.kind if node.kind in ("F", "B") else "other"] += node.self_us
    total_self = sum(sum(split.values()) for split in by_name.values())
    rows = []
    for name in sorted(by_name, key=lambda name: -sum(by_name[name].values()))[:top]:
        split = by_name[name]
        self_us = sum(split.values())
        share = f"{100 * self_us / total_self:.1f}%" if total_self > 0 else "-"
        rows.append(
            [
                name,
                str(calls[name]),
                _ms(self_us),
                share,
                _ms(split["F"]),
                _ms(split["B"]),
                _ms(split["other"]),
            ]
        )
    return _table(["operator", "calls", "self ms", "self %", "in F ms", "in B ms", "other ms"], rows)


def summarize(document: Mapping[str, Any], top: int = 10) -> str:
    """Per worker of a merged trace: time per action kind (with recvs), and the top operators by self CPU.

    ``% of step`` is the share of the step's window (first action to last optimizer step, all workers)
    that a kind's spans cover, overlaps counted once (recvs of several inputs can be in flight at once);
    ``op self ms`` is the operators' self CPU time inside that kind's scopes. An operator's self time is
    its duration minus that of the operators and scopes nested in it.
    """
    events = document["traceEvents"]
    step = document.get("otherData", {}).get("step", "?")
    window_us = _step_window_us(events)
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    lines = [
        f"profile of step {step}: {window_us / 1e3:.2f} ms from the first action to the last optimizer step"
    ]
    for pid in sorted({e["pid"] for e in events if isinstance(e.get("pid"), int)}):
        mine = [e for e in events if e.get("pid") == pid]
        threads: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for event in mine:
            threads[event.get("tid")].append(event)
        nodes = [node for lane in threads.values() for node in _nest(lane)]
        recvs = [e for e in mine if e.get("ph") == "X" and e.get("cat") == _RECV_CATEGORY]
        lines.append(f"{names.get(pid, f'worker {pid}')}:")
        lines += _kind_rows(nodes, recvs, window_us)
        lines.append(f"  top {top} operators by self CPU time:")
        lines += _operator_rows(nodes, top)
    return "\n".join(lines)


def write_profile(traces_dir: Path | str, step: int, document: Mapping[str, Any], summary: str) -> Path:
    """Write ``profile_step<step>.json`` (the merged trace) and ``.txt`` (the summary); the JSON's path."""
    traces_dir = Path(traces_dir)
    path = traces_dir / f"profile_step{step}.json"
    write_trace_document(path, document)
    path.with_suffix(".txt").write_text(summary + "\n", encoding="utf-8")
    return path
