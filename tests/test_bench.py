"""``scripts/bench.py``: every method runs in ``--quick`` and the JSON / CSV outputs hold sane figures.

The end-to-end run takes two schedules (one stage per worker, and interleaved); the others differ only in
the ``schedule=`` they pass.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from conftest import run_command

REPO = Path(__file__).resolve().parent.parent
SCHEDULE_NAMES = ("gpipe", "interleaved")
METHODS = {"single-1t", "single-2t"} | {
    f"{framework}-{schedule}" for framework in ("pipetrain", "pipelining") for schedule in SCHEDULE_NAMES
}
BUBBLES = ("bubble", "pred_unit", "pred_measured")


@pytest.fixture
def bench_settings(monkeypatch):
    """``scripts/bench_settings.py``, imported as ``scripts/bench.py`` imports it."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import bench_settings

    return bench_settings


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_quick_bench_measures_every_method(tmp_path):
    out = tmp_path / "bench"
    command = [sys.executable, "scripts/bench.py", "--quick", "--schedules", "gpipe,interleaved_1f1b"]
    result = run_command([*command, "--out", str(out)], 280, cwd=REPO)
    assert result.returncode == 0, result.output[-4000:]
    assert "pipetrain-interleaved" in result.output  # the printed table

    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert {row["method"] for row in rows} == METHODS
    for row in rows:
        assert row["runs_ok"] == 1, row
        assert row["step_time_s"] > 0 and row["samples_per_sec"] > 0, row
    pipeline_rows = [row for row in rows if not row["method"].startswith("single-")]
    assert {row["m"] for row in pipeline_rows} == {4}
    for row in pipeline_rows:
        for key in BUBBLES:
            assert 0.0 <= row[key] <= 1.0, (key, row)
        assert len(row["peak_activation_mib"]) == 2 and min(row["peak_activation_mib"]) > 0, row
        assert row["e_mb"] > 0 and row["workers"] == 2, row
        assert row["p"] == (4 if row["method"].endswith("-interleaved") else 2), row
        if row["method"].startswith("pipetrain-"):
            assert row["vs_pp"] > 0, row
        assert row["runtime_ms_per_action"] >= 0, row  # both frameworks log their critical path
    interleaved = next(row for row in rows if row["method"] == "pipetrain-interleaved")
    assert interleaved["pred_unit"] == pytest.approx(1 / 9)  # (W-1)/(v*m+W-1), W=2, v=2, m=4
    # Every method trains the same model from the same weights on the same first batch.
    first_losses = [row["loss_step1"] for row in rows]
    assert max(first_losses) - min(first_losses) < 1e-3, first_losses

    with out.with_suffix(".csv").open() as handle:
        csv_rows = list(csv.DictReader(handle))
    assert {row["method"] for row in csv_rows} == METHODS
    assert all(float(row["step_time_s"]) > 0 for row in csv_rows)
    for row in csv_rows:
        if not row["method"].startswith("single-"):
            assert all(0.0 <= float(row[key]) <= 1.0 for key in BUBBLES), row


def test_interleaved_rows_skip_refused_microbatch_counts(bench_settings):
    """m = 5 on 2 workers: two rounds cannot split it, so both interleaved rows are n/a, the rest runs."""
    args = bench_settings.parse_args(["--quick", "--batch-size", "40", "--microbatches", "5"])
    settings = bench_settings.settings_from_args(args)
    reasons = {
        config.name: bench_settings.unsupported(settings, config)
        for config in bench_settings.configurations(settings)
    }
    assert "pipeline.num_microbatches=5" in reasons["pipetrain-interleaved"]
    assert reasons["pipelining-interleaved"] == reasons["pipetrain-interleaved"]
    assert {name for name, reason in reasons.items() if reason} == {
        "pipetrain-interleaved",
        "pipelining-interleaved",
    }


def test_interleaved_rows_cut_the_same_model_into_more_stages(bench_settings):
    """The interleaved runs split the model's 6 units into 4 stages, 2 per worker; the others into 2."""
    settings = bench_settings.settings_from_args(bench_settings.parse_args(["--quick"]))
    by_name = {config.name: config for config in bench_settings.configurations(settings)}
    interleaved = bench_settings.run_overrides(settings, by_name["pipelining-interleaved"])
    assert "pipeline.balance=[2,1,1,2]" in interleaved
    assert "pipeline.stages_per_worker=2" in interleaved and "schedule=interleaved_1f1b" in interleaved
    assert "pipeline.balance=[3,3]" in bench_settings.run_overrides(settings, by_name["pipetrain-1f1b"])


def test_zero_bubble_rows_run_the_same_split_as_pytorchs(bench_settings):
    """zb_h1 runs the p-stage split; zb_v cuts the model into 2p stages, two per worker; the PyTorch rows
    get the same overrides (they build the same stages and placement from them)."""
    args = bench_settings.parse_args(["--quick", "--schedules", "1f1b,zb_h1,zb_v", "--microbatches", "4"])
    settings = bench_settings.settings_from_args(args)
    by_name = {config.name: config for config in bench_settings.configurations(settings)}
    assert {"pipetrain-zb_h1", "pipetrain-zb_v", "pipelining-zb_h1", "pipelining-zb_v"} <= by_name.keys()
    zb_v = bench_settings.run_overrides(settings, by_name["pipelining-zb_v"])
    assert "pipeline.balance=[2,1,1,2]" in zb_v and "pipeline.stages_per_worker=2" in zb_v
    assert bench_settings.schedule_of(settings, by_name["pipetrain-zb_v"]).placement == (0, 1, 1, 0)
    zb_h1 = bench_settings.run_overrides(settings, by_name["pipetrain-zb_h1"])
    assert "pipeline.balance=[3,3]" in zb_h1 and "schedule=zb_h1" in zb_h1
    assert not any(bench_settings.unsupported(settings, config) for config in by_name.values())


def test_data_plane_rows_train_over_c10d_and_compare_with_the_same_pytorch_schedule(
    bench_settings, monkeypatch
):
    """``--data-planes auto,c10d``: one set of pipetrain rows per data plane, each compared with PyTorch's."""
    import bench_report
    import bench_runs

    args = bench_settings.parse_args(["--quick", "--schedules", "1f1b", "--data-planes", "auto,c10d"])
    settings = bench_settings.settings_from_args(args)
    by_name = {config.name: config for config in bench_settings.configurations(settings)}
    assert {"pipetrain-1f1b", "pipetrain+c10d-1f1b", "pipelining-1f1b"} <= by_name.keys()
    command = bench_runs.pipetrain_command(settings, by_name["pipetrain+c10d-1f1b"], Path("run"))
    assert "rpc.data_plane=c10d" in command
    step_times = {"pipetrain-1f1b": 0.2, "pipetrain+c10d-1f1b": 0.1, "pipelining-1f1b": 0.4}
    results = {
        by_name[name]: [{"step_time_s": seconds, "loss_step1": 2.3}] for name, seconds in step_times.items()
    }
    rows = {row["method"]: row for row in bench_report.build_rows(settings, results)}
    assert rows["pipetrain-1f1b"]["vs_pp"] == pytest.approx(2.0)
    assert rows["pipetrain+c10d-1f1b"]["vs_pp"] == pytest.approx(4.0)
