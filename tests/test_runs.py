"""A run is what its config.yaml says, owns its run directory, and stops cleanly when interrupted.

Every test drives the real launcher (``python -m pipetrain.train`` -> torchrun -> RPC workers on CPU).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import Launched, run_command
from slow_parts import slow_model_overrides

from pipetrain.build import build_model
from pipetrain.checkpoint import find_checkpoint, merged_model_state, read_manifest
from pipetrain.compose import load_run_config, to_train_config
from pipetrain.run_dir import RunLock

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

TESTS_DIR = Path(__file__).resolve().parent
QUICK = ["model.hidden=32", "train.batch_size=16", "train.log_every=1", "optim=sgd", "optim.lr=0.1"]
SLOW = [
    *slow_model_overrides(delay_s=0.05),
    "optim=sgd",
    "pipeline.balance=[3,3]",
    "train.batch_size=16",
    "train.steps=1000",
    "train.log_every=1",
]
_NOISE = ("ChildFailedError", "torch/distributed/elastic", "Traceback (most recent call last)", "UserWarning")


def pipetrain_train(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipetrain.train", *args]


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_user_config_dir_reaches_every_process(tmp_path):
    """``--config-dir`` / ``--config-name`` and a group option of the user's own: what every rank trains."""
    conf = tmp_path / "my_conf"
    (conf / "model").mkdir(parents=True)
    (conf / "quick.yaml").write_text("defaults:\n  - train\n  - _self_\ntrain:\n  steps: 3\n  log_every: 1\n")
    (conf / "model" / "narrow.yaml").write_text(
        "_target_: pipetrain.models.mlp.mlp\nin_features: 32\nhidden: 24\ndepth: 4\nnum_classes: 10\n"
    )
    run_dir = tmp_path / "run"
    args = pipetrain_train(
        "--config-dir", str(conf), "--config-name", "quick", "model=narrow", f"run_dir={run_dir}"
    )
    result = run_command(args, 180, cwd=tmp_path)
    assert result.returncode == 0, result.output[-4000:]
    assert logged_steps(run_dir) == [1, 2, 3]
    cfg = to_train_config(load_run_config(run_dir / "config.yaml"))
    assert cfg.train.steps == 3 and cfg.model["hidden"] == 24
    weights = merged_model_state(run_dir / "checkpoints" / "step_3")
    assert weights["layers.0.0.weight"].shape == (24, 32)
    build_model(cfg).load_state_dict(weights)


def test_runs_started_together_get_their_own_directories(tmp_path):
    runs = [Launched(pipetrain_train(*QUICK, "train.steps=2"), cwd=tmp_path) for _ in range(2)]
    results = [run.finish(timeout=180) for run in runs]
    for result in results:
        assert result.returncode == 0, result.output[-4000:]
    run_dirs = sorted(path.parent for path in (tmp_path / "runs").glob("*/*/config.yaml"))
    assert len(run_dirs) == 2, run_dirs
    for run_dir in run_dirs:
        assert logged_steps(run_dir) == [1, 2]
        assert read_manifest(find_checkpoint(run_dir / "checkpoints"))["step"] == 2


def test_a_run_directory_held_by_a_live_run_is_refused(tmp_path):
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    with RunLock(run_dir):
        result = run_command(
            pipetrain_train(*QUICK, "train.steps=2", f"run_dir={run_dir}"), 120, cwd=tmp_path
        )
    assert result.returncode == 2
    assert re.search(
        rf"run_dir: '{re.escape(str(run_dir))}' is in use by a live run \(pid {os.getpid()}\)", result.output
    )
    assert not (run_dir / "metrics.jsonl").exists()


def test_a_given_run_dir_leaves_nothing_in_runs(tmp_path):
    run_dir = tmp_path / "elsewhere"
    result = run_command(pipetrain_train(*QUICK, "train.steps=1", f"run_dir={run_dir}"), 120, cwd=tmp_path)
    assert result.returncode == 0, result.output[-4000:]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "train.log").read_text().strip()
    assert not (tmp_path / "runs").exists()


def test_an_unwritable_run_dir_is_refused_before_launch(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_command(pipetrain_train(*QUICK, f"run_dir={blocker}/run"), 60, cwd=tmp_path)
    assert result.returncode == 2
    assert f"pipetrain: configuration error: run_dir: cannot write to '{blocker}/run'" in result.output
    assert "Traceback" not in result.output


def _launch_slow(run_dir: Path, *overrides: str) -> Launched:
    markers = run_dir.parent / "markers"
    markers.mkdir(exist_ok=True)
    env = {
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
        "PIPETRAIN_TEST_MARKERS": str(markers),
    }
    return Launched(pipetrain_train(*SLOW, f"run_dir={run_dir}", *overrides), cwd=run_dir.parent, env=env)


def _wait_for_steps(run: Launched, run_dir: Path, count: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert run.process.poll() is None, f"the run ended early:\n{run.process.stdout.read()[-4000:]}"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {count} logged steps within {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_finishes_the_step_and_saves_a_checkpoint(tmp_path, sig):
    run_dir = tmp_path / "run"
    run = _launch_slow(run_dir)
    _wait_for_steps(run, run_dir, 2)
    os.kill(run.process.pid, sig)  # the launcher only, as a terminal's Ctrl-C reaches it
    result = run.finish(timeout=90)
    assert result.returncode == 130, result.output[-4000:]
    stopped_after = logged_steps(run_dir)[-1]
    assert f"pipetrain: run interrupted after step {stopped_after}" in result.output
    assert "failed during" not in result.output
    checkpoint = find_checkpoint(run_dir / "checkpoints")
    assert checkpoint.name == f"step_{stopped_after}"
    cfg = to_train_config(load_run_config(run_dir / "config.yaml"))
    build_model(cfg).load_state_dict(merged_model_state(checkpoint))
    assert not any(noise in result.output for noise in _NOISE), result.output[-4000:]


def test_a_second_interrupt_stops_at_once(tmp_path):
    run_dir = tmp_path / "run"
    run = _launch_slow(run_dir, "optim._target_=slow_parts.SlowSGD", "+optim.delay_s=60")
    marker = tmp_path / "markers" / "rank1"
    deadline = time.monotonic() + 90
    while not (marker.exists() and marker.read_text().startswith("step ")):  # stage 0 is in a 60 s step
        assert run.process.poll() is None and time.monotonic() < deadline, "stage 0 never reached its step"
        time.sleep(0.05)
    os.kill(run.process.pid, signal.SIGINT)
    time.sleep(0.5)
    os.kill(run.process.pid, signal.SIGINT)
    interrupted_at = time.monotonic()
    result = run.finish(timeout=60)
    assert time.monotonic() - interrupted_at < 10
    assert result.returncode == 130, result.output[-4000:]
    assert "stopping every process of the run now" in result.output


def test_a_stage_failure_prints_one_line_and_the_traceback_once(tmp_path):
    run_dir = tmp_path / "run"
    result = run_command(
        pipetrain_train(*QUICK, "train.steps=3", "data.num_classes=20", f"run_dir={run_dir}"),
        120,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    lines = result.output.splitlines()
    stopped = [line for line in lines if line.startswith("pipetrain: run stopped")]
    assert len(stopped) == 1, result.output
    expected = "in step 1: worker 1 (rank 2) failed during action 1F0 (stage 1): ValueError: train.loss="
    assert expected in stopped[0]
    assert result.output.count("--- traceback on worker 1 (rank 2) ---") == 1
    assert "ChildFailedError" not in result.output and "torch/distributed/elastic" not in result.output
    assert f"the output of every process of the run is in {run_dir / 'logs'}" in result.output
    assert list((run_dir / "logs").rglob("stderr.log"))


def test_a_run_prints_no_warnings(tmp_path):
    result = run_command(
        pipetrain_train(*QUICK, "train.steps=2", f"run_dir={tmp_path / 'run'}"), 120, cwd=tmp_path
    )
    assert result.returncode == 0, result.output[-4000:]
    assert [line for line in result.output.splitlines() if not line.startswith(("pipetrain:", "step "))] == []
    assert torch.tensor(logged_steps(tmp_path / "run")).tolist() == [1, 2]
