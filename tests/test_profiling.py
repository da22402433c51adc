"""torch.profiler on every worker, merged with pipetrain's own timeline (``log.profile_steps``).

Fast tests of the merge and the summary on hand-made profiles; in-process runs of the runner's hooks;
and one real run through ``python -m pipetrain.train`` whose merged trace is checked end to end.
"""

from __future__ import annotations

import json
import sys

import pytest
from conftest import make_config, run_command

import pipetrain.profiling as profiling
from pipetrain.build import build_dataset, build_schedule_for, build_stages
from pipetrain.data import BatchOrder
from pipetrain.driver import Driver, run_step
from pipetrain.failures import StageFailure
from pipetrain.preflight import check_settings
from pipetrain.profiling import Recv, WorkerProfile, clock_offset, merge_trace, on_wall_clock, summarize
from pipetrain.timings import Span, SpanCategory, StageReport
from pipetrain.transport import local_workers

pytestmark = pytest.mark.timeout(120)

ORIGIN = 1_000.0
"""The driver's wall clock at the start of the hand-made step (seconds)."""


def kineto_events(os_pid: int, thread: int, spans: list[tuple[str, str, float, float]]) -> list[dict]:
    """Events as ``export_chrome_trace`` writes them: metadata, bookkeeping, ``(cat, name, ts, dur)``."""
    events = [
        {"ph": "M", "name": "process_name", "pid": os_pid, "tid": 0, "ts": 0.0, "args": {"name": "python"}},
        {
            "ph": "M",
            "name": "thread_name",
            "pid": os_pid,
            "tid": thread,
            "ts": 0.0,
            "args": {"name": "compute"},
        },
        {
            "ph": "X",
            "cat": "Trace",
            "name": "PyTorch Profiler (0)",
            "pid": "Spans",
            "tid": "x",
            "ts": 0,
            "dur": 1,
        },
    ]
    for cat, name, ts, dur in spans:
        events.append(
            {"ph": "X", "cat": cat, "name": name, "pid": os_pid, "tid": thread, "ts": ts, "dur": dur}
        )
    events.append(
        {"ph": "s", "id": 7, "pid": os_pid, "tid": thread, "ts": 10.0, "cat": "fwdbwd", "name": "fwdbwd"}
    )
    return events


def two_worker_step() -> tuple[list[StageReport], list[WorkerProfile]]:
    """Stage 0 on worker 0 (its clock 2 s ahead of the driver's), stage 1 on worker 1 (the driver's clock).

    Worker 0 starts profiling at driver time 1000.000 s: its 0F0 runs from +100 to +1100 us and holds an
    addmm (+200..+900 us) which holds a copy (+300..+400 us); its 0B0 runs from +5000 to +7000 us and holds
    an mm (+5100..+6100 us). Worker 1 starts profiling at 1000.001 s; its 1F0 runs at +2000..+2500 us of
    its profile and the activation flew from 1000.0012 (worker 0's clock, less 2 s) to 1000.0028.
    """
    reports = [
        StageReport(0, (Span(0, SpanCategory.COMPUTE, "0F0", 1002.0001, 1002.0011),)),
        StageReport(1, (Span(1, SpanCategory.COMPUTE, "1F0", 1000.003, 1000.0035),)),
    ]
    worker0 = WorkerProfile(
        worker_idx=0,
        started_at=1002.0,
        events=kineto_events(
            4242,
            17,
            [
                ("user_annotation", "0F0", 100.0, 1000.0),
                ("cpu_op", "aten::addmm", 200.0, 700.0),
                ("cpu_op", "aten::copy_", 300.0, 100.0),
                ("user_annotation", "wait 0B0 <- worker 1", 3000.0, 2000.0),
                ("user_annotation", "0B0", 5000.0, 2000.0),
                ("cpu_op", "aten::mm", 5100.0, 1000.0),
                ("user_annotation", "optimizer step (stage 0)", 7100.0, 300.0),
                ("cpu_op", "aten::_fused_adamw_", 7150.0, 200.0),
            ],
        ),
        recvs=[Recv("recv 0B0 <- worker 1", 1, 1000.0045, 1002.0049)],
        clock_offset_s=2.0,
    )
    worker1 = WorkerProfile(
        worker_idx=1,
        started_at=1000.001,
        events=kineto_events(
            5353,
            18,
            [
                ("user_annotation", "wait 1F0 <- worker 0", 500.0, 1500.0),
                ("user_annotation", "1F0", 2000.0, 500.0),
                ("cpu_op", "aten::addmm", 2100.0, 300.0),
            ],
        ),
        recvs=[
            Recv("recv 1F0 <- worker 0", 0, 1002.0012, 1000.0028),
            Recv("recv 1F1 <- worker 0", 0, 1002.0013, 1000.0029),
        ],
    )
    return reports, [worker0, worker1]


def x_events(document: dict, name: str | None = None, pid: int | None = None) -> list[dict]:
    return [
        e
        for e in document["traceEvents"]
        if e["ph"] == "X" and (name is None or e["name"] == name) and (pid is None or e["pid"] == pid)
    ]


def lane_names(document: dict, pid: int) -> dict[int, str]:
    return {
        e["tid"]: e["args"]["name"]
        for e in document["traceEvents"]
        if e["ph"] == "M" and e["name"] == "thread_name" and e["pid"] == pid
    }


def test_a_profile_is_tied_to_the_wall_clock_by_its_most_tightly_read_marker():
    """A thread switch between the readings around a marker widens them; that marker is not used."""
    mark = {"name": "pipetrain clock", "ph": "X", "dur": 1.0}
    events = [
        {**mark, "ts": 100.0},
        {**mark, "ts": 300.0},
        {**mark, "ts": 200.0},
        {"name": "aten::mm", "ph": "X", "ts": 250.0, "dur": 10.0},
        {"name": "thread_name", "ph": "M", "args": {"name": "compute"}},
    ]
    readings = [(10.0, 10.0009), (10.0001, 10.00011), (10.0002, 10.0005)]  # in the order entered

    started_at, shifted = on_wall_clock(events, readings)

    assert started_at == pytest.approx(10.000105, abs=1e-9)
    assert shifted == [
        {"name": "aten::mm", "ph": "X", "ts": 50.0, "dur": 10.0},
        {"name": "thread_name", "ph": "M", "args": {"name": "compute"}},
    ]
    with pytest.raises(RuntimeError, match="2 clock markers for 3 readings"):
        on_wall_clock(events[1:], readings)


def test_clock_offset_is_zero_on_one_clock_and_bounded_by_the_round_trip_otherwise():
    assert clock_offset(sent_at=10.0, answered_at=10.4, received_at=11.0) == 0.0
    assert clock_offset(sent_at=10.0, answered_at=15.4, received_at=11.0) == pytest.approx(4.4)
    assert clock_offset(sent_at=10.0, answered_at=5.4, received_at=11.0) == pytest.approx(-4.6)


def test_merge_places_every_worker_on_the_drivers_clock():
    reports, profiles = two_worker_step()
    document = merge_trace(reports, [0, 1], profiles, ORIGIN, step=3)
    json.dumps(document)  # valid JSON as it stands
    assert document["otherData"]["step"] == 3
    assert {e["pid"] for e in document["traceEvents"]} == {0, 1}
    # Worker 0's events: its clock is 2 s ahead, so its profile starts at driver time 0 us.
    profiled = next(e for e in x_events(document, "0F0", 0) if e["cat"] == "user_annotation")
    own = next(e for e in x_events(document, "0F0", 0) if e["cat"] == "compute")
    assert profiled["ts"] == pytest.approx(100.0) and own["ts"] == pytest.approx(100.0, abs=1e-3)
    assert own["dur"] == pytest.approx(1000.0, abs=1e-3)
    assert x_events(document, "aten::mm", 0)[0]["ts"] == pytest.approx(5100.0)
    # Worker 1's: the driver's clock, profile started 1 ms into the step.
    assert x_events(document, "aten::addmm", 1)[0]["ts"] == pytest.approx(3100.0)
    own = next(e for e in x_events(document, "1F0", 1) if e["cat"] == "compute")
    assert own["ts"] == pytest.approx(3000.0, abs=1e-3)


def test_recvs_span_from_the_producers_clock_to_the_consumers_in_lanes_of_their_own():
    reports, profiles = two_worker_step()
    document = merge_trace(reports, [0, 1], profiles, ORIGIN, step=3)
    (first,) = x_events(document, "recv 1F0 <- worker 0", 1)
    (second,) = x_events(document, "recv 1F1 <- worker 0", 1)
    assert first["ts"] == pytest.approx(1200.0, abs=1e-3) and first["dur"] == pytest.approx(1600.0, abs=1e-3)
    assert first["tid"] != second["tid"], "recvs in flight together share a lane"
    names = lane_names(document, 1)
    assert names[first["tid"]] == "recv" and names[second["tid"]] == "recv 2"
    (backward,) = x_events(document, "recv 0B0 <- worker 1", 0)  # worker 1's clock to worker 0's
    assert backward["ts"] == pytest.approx(4500.0, abs=1e-3)
    assert backward["dur"] == pytest.approx(400.0, abs=1e-3)


def test_merge_gives_profiler_threads_lanes_of_their_own_and_keeps_flows_apart():
    reports, profiles = two_worker_step()
    document = merge_trace(reports, [0, 1], profiles, ORIGIN, step=3)
    for pid in (0, 1):
        names = lane_names(document, pid)
        assert names[0] == "compute"  # pipetrain's own lanes first
        profiler_lanes = [tid for tid, name in names.items() if name.startswith("torch.profiler")]
        assert profiler_lanes == [max(names)], names
        assert len(set(names)) == len(names)
    assert not [e for e in document["traceEvents"] if not isinstance(e["pid"], int)], "bookkeeping kept"
    flows = [e["id"] for e in document["traceEvents"] if e["ph"] == "s"]
    assert len(flows) == len(set(flows)) == 2


def test_summary_splits_time_by_action_kind_and_ranks_operators_by_self_time():
    reports, profiles = two_worker_step()
    summary = summarize(merge_trace(reports, [0, 1], profiles, ORIGIN, step=3))
    lines = summary.splitlines()
    assert lines[0].startswith("profile of step 3:")
    worker0 = lines[lines.index("worker 0 (stages [0]):") : lines.index("worker 1 (stages [1]):")]
    rows = {line.split()[0]: line.split() for line in worker0 if line.startswith("  ")}
    assert rows["F"][1:4] == ["1", "1.00", "1.00"] and rows["F"][5] == "0.70"  # addmm 0.6 + copy 0.1
    assert rows["B"][1:3] == ["1", "2.00"] and rows["B"][5] == "1.00"
    assert rows["wait"][1:3] == ["1", "2.00"] and rows["wait"][5] == "0.00"
    assert rows["optimizer"][1:3] == ["1", "0.30"] and rows["optimizer"][5] == "0.20"
    assert rows["recv"][1:3] == ["1", "0.40"]
    operators = [line.split() for line in worker0 if line.startswith("  aten::")]
    assert [op[0] for op in operators] == ["aten::mm", "aten::addmm", "aten::_fused_adamw_", "aten::copy_"]
    assert operators[1][2:7] == ["0.60", "31.6%", "0.60", "0.00", "0.00"]  # self 0.6 of 1.9 ms, all in F


def test_summary_counts_overlapping_recvs_once_in_the_share_of_the_step():
    reports, profiles = two_worker_step()
    summary = summarize(merge_trace(reports, [0, 1], profiles, ORIGIN, step=3))
    worker1 = summary.split("worker 1 (stages [1]):")[1]
    recv = next(line.split() for line in worker1.splitlines() if line.startswith("  recv"))
    window_us = 3500.0 - 100.0  # pipetrain's spans: 0F0 from 100 us, 1F0 until 3500 us
    assert recv[1:3] == ["2", "3.20"]  # 1.6 ms each
    assert recv[4] == f"{100 * 1700.0 / window_us:.1f}%"  # together in flight from 1200 to 2900 us


def test_profile_steps_must_be_steps_the_run_takes():
    cfg = make_config(steps=5)
    cfg.log.profile_steps = [1, 5]
    check_settings(cfg)
    for bad in (0, 6, "2"):
        cfg.log.profile_steps = [bad]
        with pytest.raises(ValueError, match=r"log.profile_steps: step .* is not within 1..train.steps=5"):
            check_settings(cfg)


class CountingRecordFunction:
    """Stands in for ``torch.profiler.record_function``, counting the scopes the runner opens."""

    names: list[str] = []

    def __init__(self, name: str) -> None:
        CountingRecordFunction.names.append(name)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def one_worker_run(num_stages: int = 1):
    cfg = make_config("mlp", num_stages, "gpipe", num_microbatches=2, batch_size=8, steps=2)
    plan, stages = build_stages(cfg)
    schedule = build_schedule_for(cfg, plan.num_stages)
    return cfg, plan, schedule, local_workers(stages, schedule)


def test_a_step_not_profiled_opens_no_profiler_scope(monkeypatch):
    monkeypatch.setattr(profiling, "record_function", CountingRecordFunction)
    CountingRecordFunction.names = []
    cfg, _, schedule, handles = one_worker_run()
    inputs, targets = BatchOrder(build_dataset(cfg), cfg.train.batch_size, cfg.seed).batch(0)
    run_step(handles, schedule, inputs, targets, 2)
    assert CountingRecordFunction.names == []
    run_step(handles, schedule, inputs, targets, 2, profile=True)
    actions = [str(action) for action in schedule[0]]
    assert CountingRecordFunction.names == [
        *["pipetrain clock"] * profiling._CLOCK_READINGS,
        *actions,
        "optimizer step (stage 0)",
    ]


def test_in_process_driver_writes_the_profile_of_its_step(tmp_path):
    cfg, plan, _, handles = one_worker_run()
    cfg.log.profile_steps = [2]
    printed: list[str] = []
    batches = BatchOrder(build_dataset(cfg), cfg.train.batch_size, cfg.seed)
    Driver(cfg, handles, plan, batches, tmp_path, print_fn=printed.append).train()
    document = json.loads((tmp_path / "traces" / "profile_step2.json").read_text())
    forward = next(e for e in x_events(document, "0F0") if e["cat"] == "user_annotation")
    inside = [e for e in x_events(document, pid=0) if e["name"].startswith("aten::") and contains(forward, e)]
    assert inside, "no operator inside 0F0"
    summary = (tmp_path / "traces" / "profile_step2.txt").read_text()
    assert "top 10 operators by self CPU time" in summary and summary.strip() in "\n".join(printed)
    with pytest.raises(RuntimeError, match="no profiled step to collect"):
        handles[0].runner.collect_profile()  # handed out once


def test_in_process_workers_share_one_profiler_so_profiling_several_fails_clearly():
    cfg, _, schedule, handles = one_worker_run(num_stages=2)
    inputs, targets = BatchOrder(build_dataset(cfg), cfg.train.batch_size, cfg.seed).batch(0)
    with pytest.raises(StageFailure, match="profiles one worker per process"):
        run_step(handles, schedule, inputs, targets, 2, timeout_s=30, profile=True)
    for handle in handles:  # both workers are done with the failed step (and the profiler)
        assert isinstance(handle.optimizer_step().wait(), BaseException)
    _, _, schedule, (single,) = one_worker_run()
    run_step([single], schedule, inputs, targets, 2, timeout_s=30, profile=True)
    profile = single.collect_profile().wait()
    assert profile.worker_idx == 0 and "0B1" in {e.get("name") for e in profile.events}


def contains(outer: dict, inner: dict, slack_us: float = 0.0) -> bool:
    """Whether ``inner`` lies within ``outer`` in time."""
    return (
        outer["ts"] - slack_us <= inner["ts"]
        and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"] + slack_us
    )


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_profiled_step_of_a_real_run_merges_every_worker_on_one_timeline(tmp_path):
    args = [
        sys.executable,
        "-m",
        "pipetrain.train",
        f"run_dir={tmp_path}",
        "train.steps=3",
        "train.log_every=1",
        "log.profile_steps=[2]",
    ]
    result = run_command(args, 200, cwd=tmp_path)
    assert result.returncode == 0, result.output[-4000:]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    document = json.loads((tmp_path / "traces" / "profile_step2.json").read_text())
    assert document["otherData"]["step"] == 2
    assert not (tmp_path / "traces" / "profile_step3.json").exists()
    events = document["traceEvents"]
    processes = {
        e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"
    }
    assert processes == {0: "worker 0 (stages [0])", 1: "worker 1 (stages [1])"}

    schedule_actions = [f"{stage}{kind}{mb}" for stage in (0, 1) for kind in "FB" for mb in range(4)]
    for name in schedule_actions:
        worker = int(name[0])
        scope = next(e for e in x_events(document, name, worker) if e["cat"] == "user_annotation")
        own = next(e for e in x_events(document, name, worker) if e["cat"] == "compute")
        operators = [e for e in x_events(document, pid=worker) if e["name"].startswith("aten::")]
        assert any(contains(scope, op) for op in operators), f"no operator inside {name}"
        # The profile is mapped onto the wall clock once, around a marker slice; on a loaded machine a
        # thread switch there can shift it by a fraction of a millisecond, operators and scopes alike.
        assert any(contains(own, op, slack_us=1000.0) for op in operators), f"{name}: operators off its span"
        assert contains(scope, own, slack_us=1000.0), (scope, own)

    def start(name: str, worker: int, category: str = "compute") -> dict:
        return next(e for e in x_events(document, name, worker) if e["cat"] == category)

    for mb in range(4):
        producer, consumer = start(f"0F{mb}", 0), start(f"1F{mb}", 1)
        (recv,) = x_events(document, f"recv 1F{mb} <- worker 0", 1)
        assert consumer["ts"] > producer["ts"]
        assert producer["ts"] + producer["dur"] <= recv["ts"] + 1.0, (producer, recv)
        assert recv["ts"] + recv["dur"] <= consumer["ts"] + 1.0, (recv, consumer)
        assert x_events(document, f"recv 0B{mb} <- worker 1", 0)
        assert x_events(document, f"wait 1F{mb} <- worker 0", 1)
    assert "optimizer step (stage 1)" in {e["name"] for e in x_events(document, pid=1)}

    summary = (tmp_path / "traces" / "profile_step2.txt").read_text()
    assert "worker 0 (stages [0]):" in summary and "worker 1 (stages [1]):" in summary
    assert "aten::" in summary
    assert summary.splitlines()[0] in result.output  # printed in the driver's log too
