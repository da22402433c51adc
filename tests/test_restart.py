"""Automatic restart: torchrun restarts a run whose worker was killed; it resumes from its newest checkpoint.

The distributed tests kill a real worker process at a known point (``tests/slow_parts.py`` records each
process's phase) and compare the restarted run with an uninterrupted one, step by step, exactly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import Launched, make_config
from slow_parts import slow_model_overrides
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipetrain.checkpoint import commit_checkpoint, merged_model_state, partial_dir
from pipetrain.launch import torchrun_command
from pipetrain.metrics import Evaluation, MetricsLogger, StepMetrics
from pipetrain.preflight import check_settings
from pipetrain.rendezvous import INIT_METHOD
from pipetrain.restart import driver_exit_status, resume_on_restart, resume_point
from pipetrain.run_dir import RunLock

TESTS_DIR = Path(__file__).resolve().parent
RUN = [
    *slow_model_overrides(delay_s=0.02),
    "optim=sgd",
    "optim._target_=slow_parts.SlowSGD",
    "+optim.delay_s=0.2",
    "pipeline.balance=[3,3]",
    "pipeline.num_microbatches=2",
    "train.batch_size=8",
    "train.steps=4",
    "train.log_every=1",
    "checkpoint.every=2",
]
"""4 steps of about half a second on 2 workers, a checkpoint after steps 2 and 4."""


def _commit(run_dir: Path, step: int) -> Path:
    directory = partial_dir(run_dir / "checkpoints", step)
    directory.mkdir(parents=True)
    return commit_checkpoint(directory, {"step": step, "num_stages": 0})


def test_restart_resumes_from_the_newest_checkpoint_the_run_wrote(tmp_path):
    run_dir = tmp_path / "run"
    assert resume_point(run_dir, None) is None  # nothing written yet: from the start
    _commit(run_dir, 2)
    newest = _commit(run_dir, 4)
    partial_dir(run_dir / "checkpoints", 6).mkdir()  # a save the failed attempt did not finish
    assert resume_point(run_dir, None) == newest


def test_restart_before_the_first_checkpoint_resumes_where_the_run_started(tmp_path):
    earlier = _commit(tmp_path / "earlier", 10)
    run_dir = tmp_path / "run"
    _commit(run_dir, 5)  # an older run's checkpoint in the same directory: not this run's
    assert resume_point(run_dir, str(earlier)) == earlier
    assert resume_point(run_dir, str(earlier.parent)) == earlier
    own = _commit(run_dir, 12)
    assert resume_point(run_dir, str(earlier)) == own


def test_resume_on_restart_says_which_step(tmp_path, monkeypatch):
    cfg = make_config()
    cfg.run_dir = str(tmp_path)
    lines: list[str] = []
    assert resume_on_restart(cfg, lines.append) is cfg and not lines  # the first attempt: as configured
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    assert resume_on_restart(cfg, lines.append).checkpoint.resume is None
    step_4 = _commit(tmp_path, 4)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    resumed = resume_on_restart(cfg, lines.append)
    assert resumed.checkpoint.resume == str(step_4)
    assert cfg.checkpoint.resume is None
    assert lines == [
        "pipetrain: restart 1 of 3 (torchrun): no checkpoint yet: starting over from step 0",
        "pipetrain: restart 2 of 3 (torchrun): resuming from step 4 (checkpoints/step_4)",
    ]


def test_max_restarts_is_checked_and_passed_to_torchrun(tmp_path):
    cfg = make_config()
    cfg.train.max_restarts = -1
    with pytest.raises(ValueError, match=r"train\.max_restarts: -1 must be an integer >= 0"):
        check_settings(cfg)
    assert "--max-restarts=3" in torchrun_command(3, ["--config", "c.yaml"], 29500, tmp_path, max_restarts=3)
    assert "--max-restarts=0" in torchrun_command(3, ["--config", "c.yaml"], 29500, tmp_path)


def test_an_interrupt_is_no_failure_to_restart_from(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert driver_exit_status(130) == 0  # torchrun would restart the run the user stopped
    assert driver_exit_status(1) == 1
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert driver_exit_status(130) == 130  # no restart left: the usual status


def test_a_restarted_driver_waits_for_the_lock_its_predecessor_left(tmp_path):
    """Processes the failed driver forked (its data loader) hold the run directory's lock a moment longer."""
    held = RunLock(tmp_path).acquire()
    with pytest.raises(ValueError, match="is in use by a live run"):
        RunLock(tmp_path).acquire()
    threading.Timer(0.3, held.release).start()
    RunLock(tmp_path).acquire(wait_s=10).release()


def _metrics(step: int, loss: float, evaluation: Evaluation | None = None) -> StepMetrics:
    return StepMetrics(
        step=step,
        loss=loss,
        samples_per_sec=100.0,
        step_time_s=0.1,
        bubble_fraction=0.2,
        bubble_fraction_predicted=0.2,
        bubble_fraction_predicted_measured_costs=0.2,
        workers=(),
        evaluation=evaluation,
    )


def test_a_continued_run_logs_each_step_once(tmp_path):
    with MetricsLogger(tmp_path) as logger:  # an attempt that got to step 5, its checkpoint at step 2
        for step in range(1, 6):
            logger.log_step(_metrics(step, 1.0 + step, Evaluation(0.5, None, 8) if step == 5 else None))
    with open(tmp_path / "metrics.jsonl", "a") as jsonl:
        jsonl.write('{"step": 6, "train/lo')  # killed mid-line
    with MetricsLogger(tmp_path, continue_after=2) as logger:
        for step in (3, 4):
            logger.log_step(_metrics(step, -float(step)))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line["train/loss"]) for line in lines] == [
        (1, 2.0),
        (2, 3.0),
        (3, -3.0),
        (4, -4.0),
    ]
    assert lines[-1]["perf/step_time_s_median"] == 0.1  # the medians go on over the kept steps
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    logged = [(event.step, event.value) for event in events.Scalars("train/loss")]
    assert logged == [(1, 2.0), (2, 3.0), (3, -3.0), (4, -4.0)]
    assert not events.Scalars("eval/loss")  # logged after step 2 by the attempt that stopped, never again


def test_each_attempt_meets_in_its_own_key_space(monkeypatch):
    """torchrun hands a restarted group the store of the failed attempt, keys and all."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = dist.TCPStore("127.0.0.1", port, 1, True, timedelta(seconds=10), wait_for_workers=False)
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first, _, _ = next(dist.rendezvous(INIT_METHOD, rank=0, world_size=1))
    first.set("rank_0", "the failed attempt's address")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second, _, _ = next(dist.rendezvous(INIT_METHOD, rank=0, world_size=1))
    assert not second.check(["rank_0"])
    second.set("rank_0", "the restarted attempt's address")
    assert first.get("rank_0") == b"the failed attempt's address"
    del server


def _launch(args: list[str], cwd: Path, markers: Path) -> Launched:
    markers.mkdir(parents=True)
    env = {
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
        "PIPETRAIN_TEST_MARKERS": str(markers),
        "OMP_NUM_THREADS": "1",
    }
    return Launched(args, cwd=cwd, env=env)


def _train(run_dir: Path, *overrides: str) -> Launched:
    run_dir.mkdir(parents=True)
    args = [sys.executable, "-m", "pipetrain.train", f"hydra.run.dir={run_dir}", *RUN, *overrides]
    return _launch(args, run_dir, run_dir.parent / f"{run_dir.name}-markers")


def _wait_for(condition, run: Launched, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.process.poll() is None, f"the run ended before {what}"
        if found := condition():
            return found
        time.sleep(0.005)
    raise AssertionError(f"never saw {what}")


def _kill_in_forward(run: Launched, markers: Path, rank: int, spared: tuple[int, ...] = ()) -> int:
    """SIGKILL ``rank`` (not one of the ``spared`` pids) in its next forward; return its pid."""

    def forward_pid() -> int | None:
        try:
            phase, pid = (markers / f"rank{rank}").read_text().split()
        except (FileNotFoundError, ValueError):
            return None
        return int(pid) if phase == "forward" and int(pid) not in spared else None

    pid = _wait_for(forward_pid, run, f"rank {rank} in a forward")
    time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    return pid


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(record["step"], record["train/loss"]) for record in map(json.loads, lines)]


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_killed_worker_restarts_and_the_run_ends_as_if_uninterrupted(tmp_path):
    reference_run = _train(tmp_path / "reference", "train.max_restarts=1")  # side by side: CI time
    run_dir = tmp_path / "killed"
    run = _train(run_dir, "train.max_restarts=1")
    _wait_for(lambda: (run_dir / "checkpoints" / "step_2").is_dir(), run, "the checkpoint of step 2")
    _kill_in_forward(run, tmp_path / "killed-markers", rank=2)  # in step 3
    reference = reference_run.finish(timeout=120)
    assert reference.returncode == 0, reference.output[-3000:]
    result = run.finish(timeout=120)
    assert result.returncode == 0, result.output[-3000:]
    # Killed in a forward (or, on a slow machine, just after it): the restart is what this test is about.
    named = r"run stopped in step [34]: worker 1 \(rank 2\) failed during action 1[FB]\d+ \(stage 1\)"
    assert re.search(named, result.output), result.output[-3000:]
    assert "pipetrain: restart 1 of 1 (torchrun): resuming from step 2 (checkpoints/step_2)" in result.output
    expected = _losses(tmp_path / "reference")
    assert [step for step, _ in expected] == [1, 2, 3, 4]
    assert _losses(run_dir) == expected  # exactly, and each step once
    tb_losses = {}
    for name in ("reference", "killed"):
        events = EventAccumulator(str(tmp_path / name / "tb"), size_guidance={"scalars": 0})
        events.Reload()
        tb_losses[name] = [(event.step, event.value) for event in events.Scalars("train/loss")]
    assert tb_losses["killed"] == tb_losses["reference"]
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["step_2", "step_4"]
    final = merged_model_state(tmp_path / "reference" / "checkpoints" / "step_4")
    for name, value in merged_model_state(run_dir / "checkpoints" / "step_4").items():
        assert torch.equal(value, final[name]), name


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_hand_launched_run_restarts_in_its_own_run_dir_then_fails_when_restarts_run_out(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=3"]
    torchrun += ["--master-addr=127.0.0.1", f"--master-port={port}", "--max-restarts=1"]
    markers = tmp_path / "markers"
    run = _launch(
        [*torchrun, "-m", "pipetrain.worker", *RUN], tmp_path, markers
    )  # run_dir: runs/<date>/<time>
    _wait_for(lambda: list(tmp_path.glob("runs/*/*/checkpoints/step_2")), run, "the checkpoint of step 2")
    first = _kill_in_forward(run, markers, rank=2)
    _kill_in_forward(run, markers, rank=2, spared=(first,))  # the restarted worker
    result = run.finish(timeout=90)
    assert result.returncode != 0
    assert len(list(tmp_path.glob("runs/*/*"))) == 1  # the restart took up the run's directory
    assert "pipetrain: restart 1 of 1 (torchrun): resuming from step 2 (checkpoints/step_2)" in result.output
    killed = r"run stopped in step [34]: worker 1 \(rank 2\) failed during action 1[FB]\d+ \(stage 1\)"
    assert len(re.findall(killed, result.output)) == 2, result.output[-3000:]
    assert "lost the connection to it" in result.output


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_an_interrupted_run_stops_instead_of_restarting(tmp_path):
    run_dir = tmp_path / "run"
    run = _train(run_dir, "train.max_restarts=1", "train.steps=1000")
    metrics = run_dir / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, run, "the first logged step")
    os.killpg(run.process.pid, signal.SIGINT)  # Ctrl-C: pipetrain.train passes it on to the driver
    result = run.finish(timeout=60)
    assert result.returncode == 130, result.output[-3000:]
    assert "pipetrain: run interrupted after step" in result.output
    assert "restart 1 of 1" not in result.output
