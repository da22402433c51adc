"""Automatic balancing: the exact split search on synthetic costs, the profiler and the command line.

The search is checked against hand-computed optima and against trying every split; the command line runs
in-process on a tiny model (profiling for real) and its YAML is composed back by Hydra.
"""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import pytest
from conftest import run_command
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from pipetrain.balance import UnitCost, predict_split, search_split
from pipetrain.balance.__main__ import main as balance_main
from pipetrain.compose import CONF_DIR, compose_config, load_run_config, to_train_config
from pipetrain.partition import plan_stages
from pipetrain.preflight import check_settings
from pipetrain.schedule import build_schedule, simulate

QUICK = ["train.batch_size=16", "autobalance.warmup=1", "autobalance.repeats=2"]
TINY = ["model.hidden=16", *QUICK]


def _units(forward, backward=None, static=None, activation=None) -> list[UnitCost]:
    backward = backward or [2 * f for f in forward]
    static = static or [0] * len(forward)
    activation = activation or [0] * len(forward)
    return [
        UnitCost(f"u{i}", f, b, activation_bytes=a, static_bytes=s)
        for i, (f, b, s, a) in enumerate(zip(forward, backward, static, activation, strict=True))
    ]


def _splits(num_units: int, num_stages: int):
    for cuts in itertools.combinations(range(1, num_units), num_stages - 1):
        bounds = [0, *cuts, num_units]
        yield tuple(b - a for a, b in zip(bounds, bounds[1:], strict=False))


def test_the_search_finds_the_known_optimum():
    """Units 1,1,1,1,4 (backward twice the forward) on 2 gpipe stages of m=4: [4, 1] gives equal stages,
    a step of (m + S - 1) * (f + b) = 5 * (4 + 8) = 60. The uniform [3, 2]: stage 0's first forward (3),
    stage 1's 4 forwards and backwards (4 x 15), stage 0's last backward (6)."""
    units = _units([1, 1, 1, 1, 4])
    found = search_split(units, "gpipe", 2, 4)
    assert found.best.balance == (4, 1)
    assert found.best.step_time_s == pytest.approx(60.0)
    uniform = predict_split(units, (3, 2), found.schedule)
    assert uniform.step_time_s == pytest.approx(3 + 4 * 15 + 6)
    assert found.best.bubble_fraction == pytest.approx(simulate(found.schedule).bubble_fraction)


def test_a_memory_cap_that_rules_out_the_fastest_split():
    """Static 10 bytes on each of the first four units: [4, 1] needs 40 on worker 0; a cap of 35 leaves
    [3, 2] (30 / 10 + 0) as the fastest that fits. Activations count per micro-batch in flight."""
    units = _units([1, 1, 1, 1, 4], static=[10, 10, 10, 10, 0], activation=[0, 0, 0, 0, 1])
    assert search_split(units, "gpipe", 2, 4).best.balance == (4, 1)
    capped = search_split(units, "gpipe", 2, 4, max_memory_bytes=35)
    assert capped.best.balance == (3, 2)
    # gpipe holds all 4 micro-batches' activations: worker 1 has 10 static + 4 x 1
    assert capped.best.worker_memory_bytes == (30, 14)
    schedule = build_schedule("1f1b", 2, 4)
    # 1f1b's last stage holds one micro-batch in flight
    assert predict_split(units, (3, 2), schedule).worker_memory_bytes == (30, 11)


def test_no_split_under_the_cap_names_the_key():
    units = _units([1, 1, 1], static=[10, 10, 10])
    with pytest.raises(ValueError, match=r"autobalance\.max_memory_mib: no split .* smallest peak") as error:
        search_split(units, "1f1b", 2, 4, max_memory_bytes=15)
    assert "--max-memory-mib" in str(error.value)
    with pytest.raises(ValueError, match=r"pipeline\.num_stages: 4 stages for a model of 3 units"):
        search_split(units, "1f1b", 4, 4)


@pytest.mark.parametrize(
    ("schedule_name", "stages_per_worker"), [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)]
)
def test_the_search_equals_trying_every_split(schedule_name, stages_per_worker):
    """Random costs and caps: the bounded search returns the best step time of all splits that fit."""
    rng = random.Random(7)
    for _ in range(12):
        num_units = rng.randint(4, 8)
        num_stages = 4 if stages_per_worker == 2 else rng.randint(2, 4)
        m = rng.choice([2, 4, 8]) if stages_per_worker == 1 else 4
        units = [
            UnitCost(
                f"u{i}",
                rng.random(),
                2 * rng.random(),
                0.1 * rng.random(),
                rng.randint(0, 9),
                rng.randint(0, 99),
            )
            for i in range(num_units)
        ]
        cap = rng.choice([None, 200, 300])
        schedule = build_schedule(schedule_name, num_stages, m, stages_per_worker)
        fits = [
            p
            for p in (predict_split(units, split, schedule) for split in _splits(num_units, num_stages))
            if cap is None or p.peak_memory_bytes <= cap
        ]
        if not fits:
            with pytest.raises(ValueError, match="autobalance.max_memory_mib"):
                search_split(units, schedule_name, num_stages, m, stages_per_worker, cap)
            continue
        found = search_split(units, schedule_name, num_stages, m, stages_per_worker, cap)
        assert found.best.step_time_s == pytest.approx(min(p.step_time_s for p in fits), rel=1e-12)
        assert found.best.peak_memory_bytes <= (cap or float("inf"))


def test_the_command_line_writes_a_pipeline_that_composes(tmp_path, monkeypatch, capsys):
    """Profile the default MLP for real, print the table, write conf/pipeline/NAME.yaml; Hydra composes it."""
    monkeypatch.chdir(tmp_path)
    assert balance_main([*TINY, "--out", "tiny_balanced"]) == 0
    out = capsys.readouterr().out
    names = ["layers.0", "layers.1", "layers.2", "layers.3", "layers.4", "head"]
    assert out.splitlines()[1].split() == ["unit", "fwd_ms", "bwd_ms", "opt_ms", "act_MiB", "static_MiB"]
    unit_rows = [line.split() for line in out.splitlines()[2:8]]
    assert [row[0] for row in unit_rows] == names
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in unit_rows)
    rows = {
        line.split()[0]: line
        for line in out.splitlines()
        if line.strip().startswith(("chosen", "uniform", "configured"))
    }
    assert set(rows) == {"chosen", "uniform", "configured"}
    assert "--config-dir conf pipeline=tiny_balanced" in out
    written = tmp_path / "conf" / "pipeline" / "tiny_balanced.yaml"
    (tmp_path / "conf" / "mine.yaml").write_text(
        f"defaults:\n  - train\n  - _self_\nhydra:\n  searchpath:\n    - file://{CONF_DIR}\n"
    )
    cfg = to_train_config(compose_config([*TINY, "pipeline=tiny_balanced"], "mine", tmp_path / "conf"))
    chosen = rows["chosen"].split("[")[1].split("]")[0]
    assert cfg.pipeline.balance == [int(n) for n in chosen.split(",")]
    assert cfg.pipeline.stages is None and cfg.pipeline.num_stages == 2
    assert "predicted step" in written.read_text()


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["model=no_such_model"], "model/no_such_model"),
        (["model._target_=no_such_pkg.make_model"], "model._target_"),
        (
            [
                "model._target_=balance_parts.numpy_middle",
                "model.in_features=32",
                "model.num_classes=10",
                "pipeline.balance=[2,1]",
            ],
            "model: unit '1'",
        ),
        (["--max-memory-mib", "0.001"], "autobalance.max_memory_mib: no split"),
        (["pipeline.balance=auto"], "pipeline.num_stages"),
        (["pipeline.balance=three"], "pipeline.balance"),
    ],
)
def test_bad_input_is_one_error_naming_the_key(args, key, capsys):
    assert balance_main([*QUICK, *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    error_lines = captured.err.strip().splitlines()
    assert len(error_lines) == 1 and error_lines[0].startswith("pipetrain: configuration error:"), (
        captured.err
    )
    assert key in error_lines[0]


def test_auto_is_resolved_before_launch():
    """The workers never see auto: a plan from it is refused with the fix; num_stages must fit a split."""
    with pytest.raises(ValueError, match=r"pipeline\.balance: auto is chosen by python -m pipetrain\.train"):
        plan_stages(["a", "b", "c"], balance="auto")
    cfg = to_train_config(compose_config(["pipeline.num_stages=3"]))
    with pytest.raises(ValueError, match=r"pipeline\.num_stages: 3 but the configured split has 2 stages"):
        check_settings(cfg)
    check_settings(to_train_config(compose_config(["pipeline.balance=auto", "pipeline.num_stages=3"])))


def test_a_written_yaml_sits_where_hydra_finds_it(tmp_path, monkeypatch):
    from pipetrain.balance.report import output_path

    monkeypatch.chdir(tmp_path)
    assert output_path("fast") == (Path("conf/pipeline/fast.yaml"), "--config-dir conf pipeline=fast")
    assert output_path("my/pipeline/fast.yaml")[1] == "--config-dir my pipeline=fast"
    with pytest.raises(
        ValueError, match="--out: 'elsewhere/fast.yaml' is not in a directory named pipeline/"
    ):
        output_path("elsewhere/fast.yaml")


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_auto_balance_in_a_real_sweep(tmp_path):
    """``pipeline.balance=auto`` in a 2-job multirun: profiled once (the second job reuses it), the chosen
    split is what every process trained, and it is recorded in config.yaml and the TensorBoard hparams."""
    args = [
        sys.executable,
        "-m",
        "pipetrain.train",
        "-m",
        f"hydra.sweep.dir={tmp_path}",
        *TINY,
        "pipeline.balance=auto",
        "pipeline.num_stages=2",
        "schedule=gpipe,1f1b",
        "train.steps=2",
        "train.log_every=1",
        "checkpoint.at_end=false",
    ]
    result = run_command(args, 200, cwd=tmp_path)
    assert result.returncode == 0, result.output[-4000:]
    chosen = [line for line in result.output.splitlines() if "pipeline.balance=auto -> " in line]
    assert len(chosen) == 2 and "profile reused" not in chosen[0] and "profile reused" in chosen[1], chosen
    for index, schedule in enumerate(("gpipe", "1f1b")):
        job_dir = tmp_path / f"schedule={schedule}"  # jobs are named by what the sweep varies
        cfg = to_train_config(load_run_config(job_dir / "config.yaml"))
        record = cfg.autobalance.result
        assert cfg.pipeline.balance == record["balance"] and sum(record["balance"]) == 6
        assert cfg.pipeline.stages is None and cfg.pipeline.num_stages == 2
        assert f"auto -> {record['balance']}" in chosen[index]
        assert record["predicted_step_time_s"] > 0 and record["uniform_balance"] == [3, 3]
        assert len((job_dir / "metrics.jsonl").read_text().splitlines()) == 2
        hparams = _session_hparams(job_dir / "tb")
        assert hparams["balance"].string_value == "auto [" + ",".join(map(str, record["balance"])) + "]"
        assert hparams["balance_predicted_step_time_s"].number_value == pytest.approx(
            record["predicted_step_time_s"]
        )


def _session_hparams(tb_dir: Path):
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    for data in events.PluginTagToContent("hparams").values():
        parsed = plugin_data_pb2.HParamsPluginData.FromString(data)
        if parsed.WhichOneof("data") == "session_start_info":
            return parsed.session_start_info.hparams
    raise AssertionError(f"no hparams session in {tb_dir}")
