"""Sweeps: job directories named by their overrides, summary files, runs that compare in TensorBoard."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import statistics
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_command
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from pipetrain import sweep_naming
from pipetrain.metrics import MetricsLogger, StepMetrics, WorkerFigures
from pipetrain.summary import JobRow, job_row, run_error, sorted_rows, write_summary

# The HPARAMS figures the README documents: the scalars whose last values fill the table.
HPARAM_METRIC_TAGS = [
    "perf/samples_per_sec_median",
    "perf/step_time_s_median",
    "pipeline/bubble_fraction_median",
    "pipeline/bubble_fraction_predicted",
    "train/loss",
]
SWEEP = ["schedule=gpipe,1f1b", "pipeline.balance=[2,4],[3,4]"]
SMALL = [
    "model.hidden=16",
    "train.batch_size=8",
    "train.steps=4",
    "train.log_every=1",
    "pipeline.num_microbatches=2",
    "checkpoint.at_end=false",
]
JOBS = {
    "schedule=gpipe,balance=[2,4]": ("gpipe", "[2,4]", "ok"),
    "schedule=gpipe,balance=[3,4]": ("gpipe", "[3,4]", "failed"),
    "schedule=1f1b,balance=[2,4]": ("1f1b", "[2,4]", "ok"),
    "schedule=1f1b,balance=[3,4]": ("1f1b", "[3,4]", "failed"),
}


@pytest.fixture(autouse=True)
def _no_sweep_state():
    sweep_naming.set_swept_keys(None)
    yield
    sweep_naming.set_swept_keys(None)


# -- naming (no processes) ------------------------------------------------------------------------------


def test_swept_keys_are_the_overrides_with_several_values():
    keys = sweep_naming.swept_keys(
        ["schedule=gpipe,1f1b", "train.steps=6", "seed=range(3)", "+model.width=8,16"],
        {"optim.lr": "0.1,0.01", "seed": "1,2"},
    )
    assert keys == ["schedule", "seed", "model.width", "optim.lr"]


def test_job_names_and_hparams_keep_only_the_varied_overrides():
    sweep_naming.set_swept_keys(["schedule", "pipeline.balance", "optim.lr", "data.root"])
    job = ["schedule=1f1b", "pipeline.balance=[2,4]", "train.steps=6", "optim.lr=0.01", "data.root=/d/x"]
    assert sweep_naming.job_name(job) == "schedule=1f1b,balance=[2,4],lr=0.01,root=/d/x"
    assert sweep_naming.job_hparams(job) == {
        "schedule": "1f1b",
        "balance": "[2,4]",
        "lr": 0.01,
        "root": "/d/x",
    }


def test_keys_sharing_a_last_name_keep_their_full_names():
    sweep_naming.set_swept_keys(["optim.lr", "lr_scheduler.lr"])
    assert sweep_naming.job_name(["optim.lr=0.1", "lr_scheduler.lr=2"]) == "optim.lr=0.1,lr_scheduler.lr=2"


def test_job_directories_are_claimed_unique_and_file_system_safe(tmp_path):
    sweep_naming.set_swept_keys(["data.root", "seed"])
    first = sweep_naming.claim_job_dir(tmp_path, 0, ["data.root=/a/b", "seed=1"])
    assert first == "root=_a_b,seed=1"
    # The same job resolves to the same directory; an identical second job gets a new one.
    assert sweep_naming.claim_job_dir(tmp_path, 0, ["data.root=/a/b", "seed=1"]) == first
    assert sweep_naming.claim_job_dir(tmp_path, 1, ["data.root=/a/b", "seed=1"]) == f"{first}-1"
    long = sweep_naming.claim_job_dir(tmp_path, 2, ["data.root=" + "x" * 400, "seed=1"])
    other = sweep_naming.claim_job_dir(tmp_path, 3, ["data.root=" + "x" * 400, "seed=2"])
    assert len(long.encode()) <= 200 and long != other
    assert sweep_naming.claim_job_dir(tmp_path, 4, []) == "4"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first, f"{first}-1", long, other, "4"])


# -- summary (no processes) -----------------------------------------------------------------------------


def _row(job: int, samples: float | None, status: str = "ok") -> JobRow:
    return JobRow(
        job=job,
        overrides=f"seed={job}",
        split="[3,3]",
        schedule="gpipe",
        m=4,
        samples_per_sec=samples,
        step_time_s=None if samples is None else 64 / samples,
        bubble=0.2,
        bubble_predicted=0.2,
        final_loss=1.0,
        status=status,
    )


def test_rows_sort_fastest_first_then_unfinished_jobs_in_order():
    rows = [
        _row(0, None, "failed (exit 1)"),
        _row(1, 100.0),
        _row(2, 300.0),
        _row(3, 50.0, "failed (exit 1)"),
    ]
    assert [row.job for row in sorted_rows(rows)] == [2, 1, 0, 3]


def test_job_row_has_the_runs_last_medians_and_its_split(tmp_path):
    speeds, bubbles = [500.0, 100.0, 300.0, 200.0], [0.9, 0.3, 0.2, 0.25]
    with MetricsLogger(tmp_path) as logger:
        for step, (speed, bubble) in enumerate(zip(speeds, bubbles, strict=True), 1):
            workers = (WorkerFigures(busy_s=1.0, idle_s=bubble, transfer_s=0.0),)
            logger.log_step(StepMetrics(step, 1.0 / step, speed, 16 / speed, bubble, 0.2, 0.2, workers))
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "train/lo')  # a run killed mid-write
    config = {"pipeline": {"balance": None, "stages": [["a"], ["b", "c"]], "num_microbatches": 4}}
    config["schedule"] = {"name": "1f1b"}
    row = job_row(7, "seed=1", tmp_path, config, "ok")
    assert (row.split, row.schedule, row.m) == ("[1,2]", "1f1b", 4)
    assert row.samples_per_sec == statistics.median(speeds[1:])
    assert row.step_time_s == pytest.approx(statistics.median(16 / speed for speed in speeds[1:]))
    assert row.bubble == statistics.median(bubbles[1:])
    assert row.bubble_predicted == 0.2 and row.final_loss == 0.25


def test_run_error_is_the_last_reason_the_run_gave(tmp_path):
    (tmp_path / "train.log").write_text(
        "[2026-01-01 10:00:00] step 1/4 ...\n"
        "[2026-01-01 10:00:01] pipetrain: run stopped in step 2: worker 1 stage 1: RuntimeError: boom\n"
        "Traceback (most recent call last):\n"
    )
    assert run_error(tmp_path) == "run stopped in step 2: worker 1 stage 1: RuntimeError: boom"
    assert run_error(tmp_path / "missing") == ""


def test_summary_markdown_escapes_cells_and_names_the_best(tmp_path):
    failed = dataclasses.replace(_row(1, None), status="failed (exit 1)", error="a | b")
    write_summary(tmp_path, [failed, _row(0, 80.0)])
    text = (tmp_path / "summary.md").read_text()
    assert "a \\| b" in text
    assert text.strip().splitlines()[-1].startswith("best: job 0 `seed=0`: 80.0 samples/s")


# -- a real sweep -----------------------------------------------------------------------------------------


def _hparams_records(tb_dir: Path) -> dict[str, plugin_data_pb2.HParamsPluginData]:
    events = EventAccumulator(str(tb_dir), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    records = {}
    for content in events.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        records[data.WhichOneof("data")] = data
    return records


def _steady_median(run_dir: Path, key: str) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(record[key] for record in records[1:])


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_a_sweep_with_failing_jobs_names_summarizes_and_records_every_job(tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = [sys.executable, "-m", "pipetrain.train", "-m", f"hydra.sweep.dir={sweep_dir}", *SWEEP, *SMALL]
    result = run_command(args, 280, cwd=tmp_path)

    # The failing jobs do not stop the sweep; the sweep fails.
    assert result.returncode == 1, result.output[-4000:]
    assert "2/4 runs succeeded" in result.output
    assert "pipeline.balance: [3, 4] sums to 7 but the model has 6 units" in result.output

    # Job directories are named by the overrides the sweep varies.
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == sorted(JOBS)
    for name, (schedule, balance, _) in JOBS.items():
        if JOBS[name][2] == "ok":
            config = (sweep_dir / name / "config.yaml").read_text()
            assert f"hparams:\n    schedule: {schedule}\n    balance: '{balance}'" in config, config

    # summary.csv: every job, finished ones fastest first, failed ones after with their error.
    with open(sweep_dir / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    finished, failed = rows[:2], rows[2:]
    assert [row["status"] for row in finished] == ["ok", "ok"]
    speeds = [float(row["samples_per_sec"]) for row in finished]
    assert speeds == sorted(speeds, reverse=True)
    for row in finished:
        schedule, balance, _ = JOBS[row["dir"]]
        assert (row["schedule"], row["split"], row["m"]) == (schedule, balance, "2")
        assert row["overrides"] == f"schedule={schedule} pipeline.balance={balance}"
        run_dir = sweep_dir / row["dir"]
        assert float(row["samples_per_sec"]) == pytest.approx(_steady_median(run_dir, "perf/samples_per_sec"))
        assert float(row["bubble"]) == pytest.approx(_steady_median(run_dir, "pipeline/bubble_fraction"))
        assert float(row["bubble_predicted"]) == pytest.approx(1 / 3)  # (S-1)/(M+S-1), S=2, M=2
        assert float(row["final_loss"]) > 0
    assert [row["dir"] for row in failed] == ["schedule=gpipe,balance=[3,4]", "schedule=1f1b,balance=[3,4]"]
    for row in failed:
        assert row["status"] == "failed (exit 2)"
        assert row["error"].startswith("configuration error: pipeline.balance: [3, 4] sums to 7")
        assert row["samples_per_sec"] == ""

    # summary.md: the same rows in the same order, and the best job, printed with all its overrides.
    table = [line for line in (sweep_dir / "summary.md").read_text().splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[-1].strip(" |`") for line in table[2:]] == [row["dir"] for row in rows]
    best = finished[0]
    assert f"best: job {best['job']} `{best['overrides']}`" in result.output
    job_overrides = yaml.safe_load((sweep_dir / best["dir"] / ".hydra" / "overrides.yaml").read_text())
    assert f"its overrides: {' '.join(job_overrides)}\n" in result.output
    assert len(job_overrides) == len(SWEEP) + len(SMALL)

    # TensorBoard: runs named by their jobs; one table of the varied hparams + status, failed jobs included.
    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(sweep_dir))
    assert sorted(multiplexer.Runs()) == sorted(f"{name}/tb" for name in JOBS)
    for name, (schedule, balance, status) in JOBS.items():
        records = _hparams_records(sweep_dir / name / "tb")
        experiment = records["experiment"].experiment
        assert sorted(info.name for info in experiment.hparam_infos) == ["balance", "schedule", "status"]
        assert [info.name.tag for info in experiment.metric_infos] == HPARAM_METRIC_TAGS
        start = records["session_start_info"].session_start_info.hparams
        assert (start["schedule"].string_value, start["balance"].string_value) == (schedule, balance)
        assert start["status"].string_value == status
        expected_end = api_pb2.STATUS_SUCCESS if status == "ok" else api_pb2.STATUS_FAILURE
        assert records["session_end_info"].session_end_info.status == expected_end

    # Finished runs: no single-point hparam/* charts; measured and predicted bubble share one chart.
    for name in [name for name, job in JOBS.items() if job[2] == "ok"]:
        events = EventAccumulator(str(sweep_dir / name / "tb"), size_guidance={"tensors": 0, "scalars": 0})
        events.Reload()
        scalar_tags = events.Tags()["scalars"]
        assert set(HPARAM_METRIC_TAGS) <= set(scalar_tags)
        assert not [tag for tag in scalar_tags if tag.startswith("hparam/")]
        layout = layout_pb2.Layout.FromString(
            events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
        )
        charts = [list(chart.multiline.tag) for category in layout.category for chart in category.chart]
        # Chart tags are regular expressions: each must pick exactly its own scalar.
        bubble = [chart for chart in charts if any("bubble_fraction" in tag for tag in chart)]
        assert len(bubble) == 1
        assert [[tag for tag in scalar_tags if re.search(pattern, tag)] for pattern in bubble[0]] == [
            ["pipeline/bubble_fraction"],
            ["pipeline/bubble_fraction_predicted"],
        ]


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_a_job_that_raises_leaves_the_other_jobs_in_the_summary_and_fails_the_sweep(tmp_path):
    """Hydra's basic launcher runs every job of the batch, then re-raises the first failure (so no
    ``on_multirun_end``): the summary, rewritten after each job, still holds every job."""
    sweep_dir = tmp_path / "sweep"
    app = Path(__file__).with_name("sweep_parts.py")
    result = run_command([sys.executable, str(app), "-m", f"hydra.sweep.dir={sweep_dir}", "seed=0,1,2"], 100)
    assert result.returncode == 1, result.output[-4000:]
    assert "job 1 raised" in result.output
    with open(sweep_dir / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["dir"], row["status"]) for row in rows] == [
        ("seed=2", "ok"),
        ("seed=0", "ok"),
        ("seed=1", "failed (exception)"),
    ]
    assert rows[2]["error"] == "RuntimeError: job 1 raised"
    start = _hparams_records(sweep_dir / "seed=1" / "tb")["session_start_info"].session_start_info.hparams
    assert (start["seed"].number_value, start["status"].string_value) == (1, "failed")
