"""``scripts/bench.py --quick``: every method runs and the JSON / CSV outputs hold sane figures."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from conftest import run_command

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parent.parent
METHODS = {"single-1t", "single-2t"} | {
    f"{framework}-{schedule}" for framework in ("pipetrain", "pipelining") for schedule in ("gpipe", "1f1b")
}
BUBBLES = ("bubble", "pred_unit", "pred_measured")


def test_quick_bench_measures_every_method(tmp_path):
    out = tmp_path / "bench"
    result = run_command([sys.executable, "scripts/bench.py", "--quick", "--out", str(out)], 280, cwd=REPO)
    assert result.returncode == 0, result.output[-4000:]
    assert "pipetrain-1f1b" in result.output  # the printed table

    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert {row["method"] for row in rows} == METHODS
    for row in rows:
        assert row["runs_ok"] == 1, row
        assert row["step_time_s"] > 0 and row["samples_per_sec"] > 0, row
    pipetrain_rows = [row for row in rows if row["method"].startswith("pipetrain-")]
    assert {row["m"] for row in pipetrain_rows} == {2, 4}
    for row in pipetrain_rows:
        for key in BUBBLES:
            assert 0.0 <= row[key] <= 1.0, (key, row)
        assert len(row["peak_activation_mib"]) == 2 and min(row["peak_activation_mib"]) > 0, row
        assert row["vs_pp"] > 0 and row["e_mb"] > 0, row
    # Every method trains the same model from the same weights on the same first batch.
    first_losses = [row["loss_step1"] for row in rows]
    assert max(first_losses) - min(first_losses) < 1e-3, first_losses

    with out.with_suffix(".csv").open() as handle:
        csv_rows = list(csv.DictReader(handle))
    assert {row["method"] for row in csv_rows} == METHODS
    assert all(float(row["step_time_s"]) > 0 for row in csv_rows)
    for row in csv_rows:
        if row["method"].startswith("pipetrain-"):
            assert all(0.0 <= float(row[key]) <= 1.0 for key in BUBBLES), row
