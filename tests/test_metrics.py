"""Tests for pipetrain.metrics and pipetrain.trace (no worker processes)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
from conftest import STEP_TAGS, worker_tags
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipetrain.critical_path import CriticalPath
from pipetrain.metrics import (
    MetricsLogger,
    StepMetrics,
    WorkerFigures,
    format_progress,
    log_failed_run,
    measured_bubble_fraction,
    measured_costs,
    step_metrics,
    worker_figures,
)
from pipetrain.schedule import Action, ActionKind, StageCosts, build_schedule, simulate
from pipetrain.timings import Span, SpanCategory, StageReport
from pipetrain.trace import CATEGORY_TIDS, write_chrome_trace

C, W, T, OPT = SpanCategory.COMPUTE, SpanCategory.WAIT, SpanCategory.TRANSFER, SpanCategory.OPTIMIZER


def _report(stage: int, *spans: tuple[SpanCategory, str, float, float]) -> StageReport:
    return StageReport(stage, tuple(Span(stage, cat, name, start, end) for cat, name, start, end in spans))


def _hand_reports() -> list[StageReport]:
    # Given out of order on purpose: results must be ordered by stage index.
    stage1 = _report(
        1,
        (W, "1F0", 100.0, 101.0),
        (T, "1F0", 101.0, 101.5),
        (C, "1F0", 101.5, 103.5),
        (C, "1B0", 103.5, 107.5),
        (OPT, "step", 107.5, 108.0),
    )
    stage0 = _report(
        0,
        (C, "0F0", 100.0, 101.0),
        (W, "0B0", 101.0, 107.5),
        (T, "0B0", 107.5, 107.75),
        (C, "0B0", 107.75, 110.0),
        (OPT, "step", 110.0, 110.5),
    )
    return [stage1, stage0]


def _metrics(step: int = 3, num_stages: int = 2) -> StepMetrics:
    stages = tuple(
        WorkerFigures(busy_s=1.0 + k, idle_s=0.5 * k, transfer_s=0.25 + k) for k in range(num_stages)
    )
    return StepMetrics(
        step=step,
        loss=1.2345678,
        samples_per_sec=1234.56,
        step_time_s=0.5,
        bubble_fraction=0.2125,
        bubble_fraction_predicted=0.2,
        bubble_fraction_predicted_measured_costs=0.25,
        workers=stages,
        window_s=0.45,
        window_predicted_measured_costs_s=0.4,
        critical_path=CriticalPath(
            compute_s=0.4,
            transfer_s=0.05,
            overhead_s=0.03,
            start_s=0.02,
            transfers=2,
            actions=(Action(0, ActionKind.FORWARD, 0), Action(1, ActionKind.FORWARD, 0)),
        ),
    )


# -- figures and bubble ---------------------------------------------------------------------


def test_worker_figures_hand_made() -> None:
    figures = worker_figures(_hand_reports(), 10.0, (0, 1))
    assert len(figures) == 2
    assert figures[0] == pytest.approx(
        WorkerFigures(busy_s=3.25, idle_s=6.75, transfer_s=0.25, busy_f_s=1.0, busy_b_s=2.25)
    )
    assert figures[0].busy_s == pytest.approx(3.25)
    assert figures[0].idle_s == pytest.approx(6.75)
    assert figures[0].transfer_s == pytest.approx(0.25)
    assert figures[1].busy_s == pytest.approx(6.0)
    assert figures[1].idle_s == pytest.approx(4.0)
    assert figures[1].transfer_s == pytest.approx(0.5)


def test_worker_figures_idle_clamped_at_zero() -> None:
    (figures,) = worker_figures([_report(0, (C, "0F0", 0.0, 5.0))], 4.0, (0,))
    assert figures.busy_s == 5.0
    assert figures.idle_s == 0.0


def test_worker_figures_add_up_the_stages_a_worker_hosts() -> None:
    (figures,) = worker_figures(_hand_reports(), 10.0, (0, 0))
    assert figures.busy_s == pytest.approx(3.25 + 6.0)
    assert figures.idle_s == pytest.approx(0.75)
    assert figures.transfer_s == pytest.approx(0.75)


def test_measured_bubble_fraction() -> None:
    figures = worker_figures(_hand_reports(), 10.0, (0, 1))
    # idle 6.75 + 4.0 over (6.75 + 3.25) + (4.0 + 6.0)
    assert measured_bubble_fraction(figures) == pytest.approx(10.75 / 20.0)
    assert measured_bubble_fraction([WorkerFigures(1.0, 3.0, 0.0), WorkerFigures(2.0, 2.0, 1.0)]) == 0.625
    assert measured_bubble_fraction([]) == 0.0
    assert measured_bubble_fraction([WorkerFigures(0.0, 0.0, 0.0)]) == 0.0


def test_measured_costs_hand_made() -> None:
    reports = [
        _report(
            1,
            (C, "1F0", 0.0, 2.0),
            (C, "1F1", 2.0, 6.0),
            (W, "1B0", 6.0, 7.0),  # not COMPUTE: ignored
            (C, "1B0", 7.0, 8.0),
            (C, "1B1", 8.0, 11.0),
            (OPT, "step", 11.0, 12.0),
        ),
        _report(0, (C, "0F0", 0.0, 1.0), (C, "0F1", 1.0, 2.0), (C, "0B0", 3.0, 5.5)),
    ]
    costs = measured_costs(reports)
    assert costs.forward == pytest.approx((1.0, 3.0))
    assert costs.backward == pytest.approx((2.5, 2.0))


def _split_reports() -> list[StageReport]:
    return [
        _report(0, (C, "0F0", 0.0, 1.0), (C, "0I0", 4.0, 4.5), (C, "0W0", 4.5, 6.5)),
        _report(1, (C, "1F0", 1.0, 2.0), (W, "1I0", 2.0, 2.5), (C, "1I0", 2.5, 4.0), (C, "1W0", 4.0, 5.0)),
    ]


def test_split_backward_costs_and_busy_by_kind() -> None:
    reports = _split_reports()
    costs = measured_costs(reports)
    assert costs.forward == pytest.approx((1.0, 1.0))
    assert costs.input_grad == pytest.approx((0.5, 1.5))
    assert costs.weight_grad == pytest.approx((2.0, 1.0))
    assert costs.backward == pytest.approx((2.5, 2.5))  # no B ran: I + W
    figures = worker_figures(reports, 7.0, (0, 1))
    assert (figures[1].busy_f_s, figures[1].busy_i_s, figures[1].busy_w_s, figures[1].busy_b_s) == (
        pytest.approx(1.0),
        pytest.approx(1.5),
        pytest.approx(1.0),
        0.0,
    )
    assert figures[1].busy_s == pytest.approx(3.5)
    scalars = StepMetrics(
        step=1,
        loss=0.0,
        samples_per_sec=1.0,
        step_time_s=1.0,
        bubble_fraction=0.0,
        bubble_fraction_predicted=0.0,
        bubble_fraction_predicted_measured_costs=0.0,
        workers=figures,
    ).scalars()
    assert scalars["worker0/busy_w_s"] == pytest.approx(2.0)
    assert scalars["worker0/busy_i_s"] == pytest.approx(0.5)
    assert scalars["worker0/busy_s"] == pytest.approx(3.5)


def test_trace_colours_split_backward_kinds(tmp_path) -> None:
    path = tmp_path / "trace.json"
    write_chrome_trace(path, _split_reports())
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    colours = {e["name"]: e.get("cname") for e in events if e["cat"] == "compute"}
    assert colours["0F0"] == colours["1F0"]
    assert len({colours["0F0"], colours["0I0"], colours["0W0"]}) == 3
    assert colours["1I0"] == colours["0I0"] and colours["1W0"] == colours["0W0"]
    assert {e["args"]["kind"] for e in events if e["cat"] == "compute"} == {"F", "I", "W"}
    assert all("cname" not in e for e in events if e["cat"] != "compute")


def test_measured_costs_missing_kind_is_zero() -> None:
    costs = measured_costs([_report(0, (C, "0F0", 0.0, 1.5))])
    assert costs.forward == (1.5,)
    assert costs.backward == (0.0,)


def _timeline_reports(schedule, t0: float = 1_700_000_000.0, scale: float = 0.01) -> tuple[list, float]:
    timeline = simulate(schedule)
    reports = [
        StageReport(
            s,
            tuple(
                Span(s, C, str(t.action), t0 + t.start * scale, t0 + t.end * scale)
                for t in timeline.entries[s]
            ),
        )
        for s in sorted(timeline.entries)
    ]
    return reports, timeline.makespan * scale


def test_step_metrics_perfect_gpipe_timeline() -> None:
    schedule = build_schedule("gpipe", 2, 4)
    reports, window = _timeline_reports(schedule)
    metrics = step_metrics(
        step=7, loss=0.75, batch_size=64, step_time_s=0.2, window_s=window, reports=reports, schedule=schedule
    )
    assert metrics.step == 7
    assert metrics.loss == 0.75
    assert metrics.samples_per_sec == pytest.approx(320.0)
    assert metrics.step_time_s == 0.2
    assert metrics.bubble_fraction_predicted == pytest.approx(1 / 5)
    # Wall-clock epoch times carry ~1e-7 s of float rounding.
    assert metrics.bubble_fraction == pytest.approx(metrics.bubble_fraction_predicted, abs=1e-5)
    # Measured costs are uniform (every action lasts 0.01 s), so the shape of the timeline is unchanged.
    assert metrics.bubble_fraction_predicted_measured_costs == pytest.approx(1 / 5, abs=1e-5)
    assert len(metrics.workers) == 2
    for figures in metrics.workers:
        assert figures.busy_s == pytest.approx(0.08, abs=1e-5)
        assert figures.idle_s == pytest.approx(0.02, abs=1e-5)
        assert figures.transfer_s == 0.0


def test_step_metrics_uses_measured_costs() -> None:
    # Stage 1 twice as slow as stage 0: the prediction with measured costs differs from unit costs.
    schedule = build_schedule("gpipe", 2, 4)
    reports = [
        _report(
            0,
            *[(C, f"0F{m}", m, m + 1.0) for m in range(4)],
            *[(C, f"0B{m}", 10 + m, 11.0 + m) for m in range(4)],
        ),
        _report(
            1,
            *[(C, f"1F{m}", m, m + 2.0) for m in range(4)],
            *[(C, f"1B{m}", 10 + m, 12.0 + m) for m in range(4)],
        ),
    ]
    metrics = step_metrics(1, 1.0, 8, 1.0, 20.0, reports, schedule)
    expected = simulate(schedule, StageCosts((1.0, 2.0), (1.0, 2.0))).bubble_fraction
    assert metrics.bubble_fraction_predicted_measured_costs == pytest.approx(expected)
    unit = metrics.bubble_fraction_predicted
    assert metrics.bubble_fraction_predicted_measured_costs != pytest.approx(unit)
    assert metrics.window_predicted_measured_costs_s == pytest.approx(
        simulate(schedule, StageCosts((1.0, 2.0), (1.0, 2.0))).makespan
    )
    path = metrics.critical_path
    assert path is not None and str(path.actions[-1]) == "1B3"  # the action that ends last, at 15
    assert path.start_s + path.compute_s + path.overhead_s + path.transfer_s == pytest.approx(20.0)


def test_scalars_tags() -> None:
    scalars = _metrics(num_stages=3).scalars()
    assert set(scalars) == {*STEP_TAGS, *worker_tags(3)}
    assert scalars["train/loss"] == pytest.approx(1.2345678)
    assert scalars["pipeline/bubble_fraction_predicted_measured_costs"] == 0.25
    assert scalars["pipeline/critical_path/transfer_s"] == 0.05
    assert scalars["pipeline/critical_path/transfers"] == 2
    assert scalars["pipeline/critical_path/actions"] == 2
    assert scalars["worker2/busy_s"] == 3.0
    assert scalars["worker2/idle_s"] == 1.0
    assert scalars["worker2/transfer_s"] == 2.25
    assert all(isinstance(v, float) for v in scalars.values())


def test_cpu_figures_add_up_the_processes_and_stay_out_without_them() -> None:
    schedule = build_schedule("interleaved_1f1b", 4, 4, 2)
    reports = [
        dataclasses.replace(_report(s, (C, f"{s}F0", 0.0, 1.0)), process_cpu_s=0.25 + (s % 2))
        for s in range(4)
    ]
    metrics = step_metrics(1, 1.0, 8, 1.0, 2.0, reports, schedule, driver_cpu_s=0.125)
    assert [figures.cpu_s for figures in metrics.workers] == [0.25, 1.25]  # once per worker, not per stage
    scalars = metrics.scalars()
    assert scalars["perf/cpu_s"] == 0.125 + 0.25 + 1.25
    assert (scalars["perf/driver_cpu_s"], scalars["worker0/cpu_s"], scalars["worker1/cpu_s"]) == (
        0.125,
        0.25,
        1.25,
    )
    # In-process workers share the driver's process: no per-process figures at all.
    in_process = step_metrics(
        1, 1.0, 8, 1.0, 2.0, [dataclasses.replace(r, process_cpu_s=None) for r in reports], schedule
    )
    assert not any("cpu" in tag or "host_memory" in tag for tag in in_process.scalars())


def test_each_workers_host_memory_is_logged_once_in_mib() -> None:
    schedule = build_schedule("interleaved_1f1b", 4, 4, 2)
    reports = [
        dataclasses.replace(
            _report(s, (C, f"{s}F0", 0.0, 1.0)), process_resident_bytes=(300 + 100 * (s % 2)) << 20
        )
        for s in range(4)
    ]
    metrics = step_metrics(1, 1.0, 8, 1.0, 2.0, reports, schedule)
    assert [figures.resident_bytes for figures in metrics.workers] == [300 << 20, 400 << 20]
    scalars = metrics.scalars()
    assert (scalars["worker0/host_memory_mib"], scalars["worker1/host_memory_mib"]) == (300.0, 400.0)


def test_each_workers_peak_device_memory_is_logged_only_where_a_stage_is_on_cuda() -> None:
    schedule = build_schedule("interleaved_1f1b", 4, 4, 2)
    on_cpu = [_report(s, (C, f"{s}F0", 0.0, 1.0)) for s in range(4)]
    scalars = step_metrics(1, 1.0, 8, 1.0, 2.0, on_cpu, schedule).scalars()
    assert not any("device_memory" in tag for tag in scalars)
    # Each stage reads its process's peak since the previous read: a worker's peak is the largest.
    on_cuda = [dataclasses.replace(r, peak_memory_bytes=(100 * (s + 1)) << 20) for s, r in enumerate(on_cpu)]
    scalars = step_metrics(1, 1.0, 8, 1.0, 2.0, on_cuda, schedule).scalars()
    assert (scalars["worker0/device_memory_mib"], scalars["worker1/device_memory_mib"]) == (300.0, 400.0)


def test_format_progress() -> None:
    line = format_progress(_metrics(step=10), total_steps=100)
    assert "\n" not in line
    assert "10/100" in line
    assert "loss 1.2346" in line
    assert "1234.6 samples/s" in line
    assert "bubble 0.21" in line
    assert "predicted 0.20" in line
    assert line == "step   10/100  loss 1.2346  1234.6 samples/s  bubble 0.21 (predicted 0.20)"


# -- logger ---------------------------------------------------------------------------------


def _event_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("events.out.tfevents.*") if p.is_file())


def test_metrics_logger_writes_tensorboard_and_jsonl(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    steps = [_metrics(step=s) for s in (1, 2, 5)]
    with MetricsLogger(run_dir) as logger:
        for m in steps:
            logger.log_step(m)

    tb_dir = run_dir / "tb"
    assert _event_files(tb_dir)
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    medians = {
        f"{tag}_median" for tag in ("perf/samples_per_sec", "perf/step_time_s", "pipeline/bubble_fraction")
    }
    assert set(acc.Tags()["scalars"]) == set(steps[0].scalars()) | medians
    tags = set(steps[0].scalars())
    for tag in tags:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 5]
        for event, m in zip(events, steps, strict=True):
            assert event.value == pytest.approx(m.scalars()[tag], rel=1e-6)

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    for line, m in zip(lines, steps, strict=True):
        record = json.loads(line)
        assert set(record) == tags | medians | {"step"}
        assert record["step"] == m.step
        for tag, value in m.scalars().items():
            assert record[tag] == value


def test_medians_skip_the_first_logged_step_once_there_is_a_second(tmp_path: Path) -> None:
    speeds, bubbles = [500.0, 100.0, 300.0, 200.0], [0.9, 0.3, 0.2, 0.25]
    with MetricsLogger(tmp_path) as logger:
        for step, (speed, bubble) in enumerate(zip(speeds, bubbles, strict=True), 1):
            metrics = _metrics(step=step)
            logger.log_step(
                dataclasses.replace(
                    metrics, samples_per_sec=speed, step_time_s=64 / speed, bubble_fraction=bubble
                )
            )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["perf/samples_per_sec_median"] for r in records] == [500.0, 100.0, 200.0, 200.0]
    assert [r["perf/step_time_s_median"] for r in records] == pytest.approx(
        [0.128, 0.64, (0.64 + 64 / 300) / 2, 0.32]
    )
    assert [r["pipeline/bubble_fraction_median"] for r in records] == [0.9, 0.3, 0.25, 0.25]
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("perf/samples_per_sec_median")] == [500.0, 100.0, 200.0, 200.0]


def test_metrics_logger_appends_jsonl(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as logger:
        logger.log_step(_metrics(step=1))
    with MetricsLogger(tmp_path) as logger:
        logger.log_step(_metrics(step=2))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]


def test_metrics_logger_close_is_idempotent(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path)
    logger.close()
    logger.close()
    with pytest.raises(RuntimeError):
        logger.log_step(_metrics())


def _hparams_records(tb_dir: Path) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    records = {}
    for data in acc.PluginTagToContent("hparams").values():
        parsed = plugin_data_pb2.HParamsPluginData.FromString(data)
        records[parsed.WhichOneof("data")] = parsed
    return records


def test_metrics_logger_hparams(tmp_path: Path) -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import api_pb2

    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir) as logger:
        logger.log_step(_metrics(step=1))
        logger.log_hparams(
            {"lr": 0.01, "num_stages": 2, "schedule": "gpipe", "amp": False, "dims": [4, 8], "none": None}
        )

    tb_dir = run_dir / "tb"
    files = _event_files(run_dir)
    assert files
    # Everything, hparams included, lies directly in run_dir/tb (no per-run subdirectory).
    assert all(p.parent.resolve() == tb_dir.resolve() for p in files)
    assert [p for p in tb_dir.iterdir() if p.is_dir()] == []

    records = _hparams_records(tb_dir)
    hp = records["session_start_info"].session_start_info.hparams
    assert hp["lr"].number_value == pytest.approx(0.01)
    assert hp["num_stages"].number_value == 2
    assert hp["schedule"].string_value == "gpipe"
    assert hp["amp"].bool_value is False
    assert hp["dims"].string_value == "[4, 8]"
    assert hp["none"].string_value == "None"
    assert hp["status"].string_value == "ok"
    assert records["session_end_info"].session_end_info.status == api_pb2.STATUS_SUCCESS
    experiment = records["experiment"].experiment
    assert sorted(info.name for info in experiment.hparam_infos) == sorted([*hp])
    # The table's figures are step scalars (their last values): no single-point hparam/* scalars.
    assert [(info.name.tag, info.display_name) for info in experiment.metric_infos] == [
        ("perf/samples_per_sec_median", "samples/s"),
        ("perf/step_time_s_median", "step time (s)"),
        ("pipeline/bubble_fraction_median", "bubble"),
        ("pipeline/bubble_fraction_predicted", "bubble predicted"),
        ("train/loss", "loss"),
    ]
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert not [tag for tag in acc.Tags()["scalars"] if tag.startswith("hparam")]
    assert [e.step for e in acc.Scalars("train/loss")] == [1]
    layout = layout_pb2.Layout.FromString(
        acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    )
    titles = [chart.title for category in layout.category for chart in category.chart]
    assert "bubble fraction: measured vs predicted" in titles


def test_a_failed_run_is_a_row_with_status_failed(tmp_path: Path) -> None:
    from tensorboard.plugins.hparams import api_pb2

    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir) as logger:
        logger.log_step(_metrics(step=1))
    log_failed_run(run_dir, {"schedule": "1f1b", "balance": "[2,4]"})
    records = _hparams_records(run_dir / "tb")
    hp = records["session_start_info"].session_start_info.hparams
    assert {name: value.string_value for name, value in hp.items()} == {
        "schedule": "1f1b",
        "balance": "[2,4]",
        "status": "failed",
    }
    assert records["session_end_info"].session_end_info.status == api_pb2.STATUS_FAILURE
    assert sorted(info.name for info in records["experiment"].experiment.hparam_infos) == [
        "balance",
        "schedule",
        "status",
    ]


# -- chrome trace ---------------------------------------------------------------------------


def test_chrome_trace(tmp_path: Path) -> None:
    reports = _hand_reports()
    path = tmp_path / "trace.json"
    write_chrome_trace(path, reports)
    doc = json.loads(path.read_text())
    assert doc["displayTimeUnit"] == "ms"
    events = doc["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    meta = [e for e in events if e["ph"] == "M"]
    assert len(spans) == sum(len(r.spans) for r in reports) == 10

    process_names = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    assert process_names == {0: "worker 0 (stages [0])", 1: "worker 1 (stages [1])"}
    thread_names = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    for pid in (0, 1):
        for category, tid in CATEGORY_TIDS.items():
            assert thread_names[(pid, tid)] == category.value
    assert len(set(CATEGORY_TIDS.values())) == len(SpanCategory)

    by_key = {(e["pid"], e["cat"], e["name"]): e for e in spans}
    # Origin defaults to the earliest span start (100.0 s); times are microseconds.
    first = by_key[(0, "compute", "0F0")]
    assert first["ts"] == pytest.approx(0.0)
    assert first["dur"] == pytest.approx(1_000_000.0)
    transfer = by_key[(0, "transfer", "0B0")]
    assert transfer["ts"] == pytest.approx(7_500_000.0)
    assert transfer["dur"] == pytest.approx(250_000.0)
    assert transfer["tid"] == CATEGORY_TIDS[SpanCategory.TRANSFER]
    opt = by_key[(1, "optimizer", "step")]
    assert opt["ts"] == pytest.approx(7_500_000.0)
    assert opt["dur"] == pytest.approx(500_000.0)
    for e in spans:
        assert e["tid"] == CATEGORY_TIDS[SpanCategory(e["cat"])]
        assert e["ts"] >= 0 and e["dur"] >= 0
    # No temporary files left behind.
    assert sorted(os.listdir(tmp_path)) == ["trace.json"]


def test_chrome_trace_explicit_origin_and_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "trace.json"
    write_chrome_trace(path, [_report(0, (C, "0F0", 0.0, 1.0))])
    write_chrome_trace(path, _hand_reports(), origin=99.0)
    spans = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == 10
    first = next(e for e in spans if e["name"] == "0F0")
    assert first["ts"] == pytest.approx(1_000_000.0)
    assert not math.isnan(first["dur"])


def test_chrome_trace_empty(tmp_path: Path) -> None:
    path = tmp_path / "one_worker.json"
    write_chrome_trace(path, _hand_reports(), placement=(0, 0))
    doc = json.loads(path.read_text())
    assert {e["pid"] for e in doc["traceEvents"]} == {0}
    names = [e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"]
    assert names == ["worker 0 (stages [0, 1])"]

    path = tmp_path / "empty.json"
    write_chrome_trace(path, [])
    assert json.loads(path.read_text()) == {"traceEvents": [], "displayTimeUnit": "ms"}


def test_logger_write_trace(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as logger:
        explicit = logger.write_trace(4, _hand_reports(), path=tmp_path / "t.json")
        default = logger.write_trace(5, _hand_reports())
    assert explicit == tmp_path / "t.json"
    assert default.parent == tmp_path / "traces"
    for path, step in ((explicit, 4), (default, 5)):
        doc = json.loads(path.read_text())
        assert doc["otherData"] == {"step": step}
        assert sum(e["ph"] == "X" for e in doc["traceEvents"]) == 10
