"""Replicas over real processes: torchrun, RPC between the workers of a replica, gloo process groups
between the copies of a worker; resume under another replica count and split; a killed worker of a
replica named; one run across two torchrun nodes (c10d rendezvous on loopback)."""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    Launched,
    assert_run_equals_unsplit,
    launch_with_markers,
    run_command,
    signal_inside_phase,
    train_unsplit,
)
from slow_parts import slow_model_overrides

from pipetrain.compose import compose_config, to_train_config
from pipetrain.launch import free_loopback_port

pytestmark = [pytest.mark.distributed]

SMALL = [
    "model.hidden=32",
    "train.batch_size=32",
    "train.steps=8",
    "train.log_every=1",
    "optim=sgd",
    "optim.lr=0.1",
    "optim.momentum=0.9",
    "pipeline.num_microbatches=4",
]


def logged_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train/loss"] for line in lines]


def assert_close_lists(actual, expected) -> None:
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(300)
def test_two_replicas_over_rpc_equal_the_unsplit_model_and_resume_under_one(tmp_path):
    """Interleaved 1F1B on 2 replicas x 2 workers (5 processes), then resumed at step 4 as 1 replica of
    another schedule and split: both equal the unsplit model trained on the whole batch."""
    replicated = [
        *SMALL,
        "schedule=interleaved_1f1b",
        "pipeline.balance=[2,1,2,1]",
        "pipeline.replicas=2",
        "checkpoint.every=4",
    ]
    first = tmp_path / "replicated"
    args = [sys.executable, "-m", "pipetrain.train", f"run_dir={first}", *replicated]
    result = run_command(args, 200, cwd=tmp_path)
    assert result.returncode == 0, result.output[-4000:]
    assert "x 2 replicas" in result.output
    logged = assert_run_equals_unsplit(first, replicated)[-1]
    assert logged["replica1/worker1/busy_s"] > 0 and "worker0/allreduce_exposed_s" in logged
    saved = sorted(path.name for path in (first / "checkpoints" / "step_8").iterdir())
    assert saved == ["manifest.json", "stage0.pt", "stage1.pt", "stage2.pt", "stage3.pt"]  # once per stage

    resumed = tmp_path / "resumed"
    args = [
        sys.executable,
        "-m",
        "pipetrain.train",
        f"run_dir={resumed}",
        *SMALL,
        "schedule=1f1b",
        "pipeline.balance=[2,4]",
        f"checkpoint.resume={first / 'checkpoints' / 'step_4'}",
    ]
    result = run_command(args, 200, cwd=tmp_path)
    assert result.returncode == 0, result.output[-4000:]
    assert_close_lists(logged_losses(resumed), logged_losses(first)[4:])


@pytest.mark.timeout(120)
def test_a_killed_worker_of_a_replica_is_named_and_nothing_hangs_in_the_all_reduce(tmp_path):
    """Replica 1's last worker dies mid-backward while replica 0's waits in the gradient all-reduce."""
    markers = tmp_path / "markers"
    args = [
        sys.executable,
        "-m",
        "pipetrain.train",
        f"run_dir={tmp_path / 'run'}",
        *slow_model_overrides(delay_s=0.05),
        "optim=sgd",
        "schedule=1f1b",
        "pipeline.balance=[3,3]",
        "pipeline.replicas=2",
        "train.batch_size=16",
        "pipeline.num_microbatches=2",
        "train.steps=1000",
        "train.log_every=1000",
    ]
    run = launch_with_markers(args, tmp_path, markers)
    # replica 1, worker 1
    _, killed_at = signal_inside_phase(run, markers, rank=4, phase="backward", signum=signal.SIGKILL)
    result = run.finish(timeout=60)
    assert time.monotonic() - killed_at < 10
    assert result.returncode != 0
    pattern = r"run stopped in step \d+: replica 1 worker 1 \(rank 4\) failed during action 1B\d+ \(stage 1\)"
    assert re.search(pattern, result.output), result.output[-3000:]


@pytest.mark.timeout(240)
def test_two_replicas_across_two_torchrun_nodes(tmp_path):
    """The same run launched as two torchrun nodes (3 + 2 processes) meeting at a c10d rendezvous."""
    overrides = [*SMALL, "schedule=1f1b", "pipeline.replicas=2", "train.steps=4"]
    port = free_loopback_port()
    nodes = [
        Launched(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--nproc-per-node={processes}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=two-nodes",
                "-m",
                "pipetrain.worker",
                f"run_dir={tmp_path / 'run'}",
                *overrides,
            ],
            cwd=tmp_path,
            env={"OMP_NUM_THREADS": "1"},
        )
        for processes in (3, 2)
    ]
    results = [node.finish(timeout=200) for node in nodes]
    output = "\n".join(result.output for result in results)
    assert [result.returncode for result in results] == [0, 0], output[-4000:]
    assert "pipetrain: done" in output
    reference_losses, _ = train_unsplit(to_train_config(compose_config(overrides)))
    assert_close_lists(logged_losses(tmp_path / "run"), reference_losses)
