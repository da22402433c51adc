"""A run never hangs: real stage processes are killed mid-forward, mid-backward and mid-optimizer-step.

The model and optimizer of these runs (``tests/slow_parts.py``) are ordinary user code that sleeps and
records its phase, so the test can kill a real worker PID at a known point; pipetrain has no fault hooks.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import Launched, launch_with_markers, signal_inside_phase, wait_for_phase
from slow_parts import slow_model_overrides

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

SLOW_RUN = [
    *slow_model_overrides(delay_s=0.1),  # two units a stage: each forward and backward lasts 0.2 s
    "optim=sgd",
    "optim._target_=slow_parts.SlowSGD",
    "+optim.delay_s=1.0",
    "pipeline.balance=[2,2,2]",
    "pipeline.num_microbatches=4",
    "train.batch_size=16",
    "train.steps=1000",
    "train.log_every=1000",
]


def launch(run_dir: Path, *overrides: str) -> tuple[Launched, Path]:
    markers = run_dir / "markers"
    args = [sys.executable, "-m", "pipetrain.train", f"hydra.run.dir={run_dir}", *SLOW_RUN, *overrides]
    return launch_with_markers(args, run_dir, markers), markers


@pytest.mark.parametrize(
    ("phase", "stage_idx"),
    [("forward", 0), ("backward", 1), ("backward", 2), ("step", 2)],
    ids=["forward-first", "backward-middle", "backward-last", "step-last"],
)
def test_killed_stage_ends_the_run_quickly_and_names_it(tmp_path, phase, stage_idx):
    """Every phase, and every position in the pipeline (the last stage computes the loss)."""
    run, markers = launch(tmp_path)
    rank = stage_idx + 1
    _, killed_at = signal_inside_phase(run, markers, rank, phase, signal.SIGKILL)
    result = run.finish(timeout=60)
    stopped_after = time.monotonic() - killed_at
    assert result.returncode != 0
    assert stopped_after < 10, f"took {stopped_after:.1f} s to stop"
    what = {
        "forward": rf"action {stage_idx}F\d+ \(stage {stage_idx}\)",
        "backward": rf"action {stage_idx}B\d+ \(stage {stage_idx}\)",
        "step": "optimizer step",
    }[phase]
    pattern = (
        rf"run stopped in step \d+: worker {stage_idx} \(rank {rank}\) failed during ({what})"
        ".*lost the connection"
    )
    assert re.search(pattern, result.output), _driver_lines(result.output)


def test_a_worker_killed_as_its_optimizer_step_begins_is_named_in_its_optimizer_step(tmp_path):
    """No time for a thread to report after the last action: the count that says every action is done
    is out before the optimizer step begins."""
    run, markers = launch(tmp_path)
    os.kill(wait_for_phase(run, markers, 3, "step"), signal.SIGKILL)
    result = run.finish(timeout=60)
    assert result.returncode != 0
    pattern = (
        r"run stopped in step \d+: worker 2 \(rank 3\) failed during optimizer step"
        r".*lost the connection"
    )
    assert re.search(pattern, result.output), _driver_lines(result.output)


@pytest.mark.parametrize("data_plane", ["c10d", "shm"])
def test_over_a_sending_data_plane_a_killed_worker_is_named_while_its_peers_wait_to_receive(
    tmp_path, data_plane
):
    run, markers = launch(tmp_path, f"rpc.data_plane={data_plane}")
    _, killed_at = signal_inside_phase(run, markers, 2, "backward", signal.SIGKILL)
    result = run.finish(timeout=60)
    assert result.returncode != 0
    assert time.monotonic() - killed_at < 10
    pattern = r"run stopped in step \d+: worker 1 \(rank 2\) failed during action 1B\d+ \(stage 1\)"
    assert re.search(pattern, result.output), _driver_lines(result.output)


def test_stuck_stage_is_named_after_the_timeout_and_the_run_ends(tmp_path):
    run, markers = launch(tmp_path, "rpc.timeout_s=3")
    pid, stopped_at = signal_inside_phase(run, markers, 2, "backward", signal.SIGSTOP)
    try:
        result = run.finish(timeout=60)
        # A stopped process ignores torchrun's SIGTERM; torchrun alone would wait 30 s before its SIGKILL.
        ended_after = time.monotonic() - stopped_at
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert result.returncode != 0
    stuck = r"worker 1 \(rank 2\) failed during action 1B\d+ \(stage 1\): no progress for 3 s"
    assert re.search(stuck, result.output), result.output[-3000:]
    assert "s after the driver exited (stuck?): stopping them" in result.output, result.output[-3000:]
    assert ended_after < 20, f"the run took {ended_after:.1f} s to end"


@pytest.mark.parametrize("data_plane", ["rpc", "c10d", "shm"])
def test_exception_in_a_stage_reaches_the_driver_with_its_traceback(tmp_path, data_plane):
    run, _ = launch(tmp_path, "data.num_classes=20", f"rpc.data_plane={data_plane}")
    result = run.finish(timeout=60)
    assert result.returncode != 0
    expected = (
        "worker 2 (rank 3) failed during action 2F0 (stage 2): ValueError: train.loss=cross_entropy: label"
    )
    assert expected in result.output
    assert "--- traceback on worker 2 (rank 3) ---" in result.output
    assert 'losses.py", line' in result.output


def test_nan_loss_stops_the_run(tmp_path):
    run, _ = launch(tmp_path, "optim.lr=1e30", "train.steps=50")
    result = run.finish(timeout=90)
    assert result.returncode != 0
    assert re.search(
        r"run stopped in step \d+: worker 2 \(rank 3\) failed during action 2F\d+ \(stage 2\): "
        r"FloatingPointError: .*is (nan|inf)",
        result.output,
    )


def test_ctrl_c_stops_every_process(tmp_path):
    run, markers = launch(tmp_path)
    wait_for_phase(run, markers, 3, "backward")
    os.killpg(run.process.pid, signal.SIGINT)
    result = run.finish(timeout=60)
    assert result.returncode != 0


def _driver_lines(output: str) -> str:
    return "\n".join(line for line in output.splitlines() if line.startswith("pipetrain")) or output[-3000:]


def test_a_crashed_driver_has_its_fatal_error_shown(tmp_path):
    """A driver killed by a segmentation fault cannot report it: the launcher shows its Python stack."""
    args = [
        sys.executable,
        "-m",
        "pipetrain.train",
        f"run_dir={tmp_path / 'run'}",
        "data._target_=data_parts.slow_dataset",
        "+data.crash=5",
        "loader.num_workers=0",
        "train.steps=4",
    ]
    result = Launched(args, cwd=tmp_path, env={"PYTHONPATH": str(Path(__file__).parent)}).finish(timeout=90)
    assert result.returncode != 0
    assert "pipetrain: the driver (rank 0) crashed; its error output" in result.output, result.output[-3000:]
    assert "Fatal Python error: Segmentation fault" in result.output
    assert re.search(r'data_parts\.py", line \d+ in __getitem__', result.output), result.output[-3000:]


def test_torchruns_stop_signal_to_the_drivers_process_group_is_reported_not_a_crash(tmp_path):
    """torchrun stops a run by SIGTERM to each process's group, the driver's loader processes included.

    The driver must say the run was stopped; before, the loader's death was raised in the driver's main
    thread and killed it without a word (whenever torchrun saw a dead worker before the driver did).
    """
    run, markers = launch(tmp_path)
    wait_for_phase(run, markers, 1, "forward")
    driver_pid = int((tmp_path / "driver.pid").read_text())
    os.killpg(os.getpgid(driver_pid), signal.SIGTERM)
    result = run.finish(timeout=60)
    assert result.returncode != 0
    assert "pipetrain: run stopped by the launcher (SIGTERM)" in result.output, result.output[-3000:]
    assert "crashed" not in result.output
