"""The product end to end: ``python -m pipetrain.train`` -> torchrun -> real RPC stage workers on CPU."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import STEP_TAGS, assert_run_equals_unsplit, run_command, worker_tags
from slow_parts import slow_model_overrides
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

SMALL = [
    "model.hidden=32",
    "train.batch_size=16",
    "train.steps=10",
    "train.log_every=1",
    "optim=sgd",
    "optim.lr=0.1",
    "optim.momentum=0.9",
    "pipeline.num_microbatches=4",
]


def train(run_dir: Path, *overrides: str, timeout: float = 180, env: dict[str, str] | None = None):
    """``python -m pipetrain.train`` into ``run_dir``, from a scratch working directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "pipetrain.train", f"hydra.run.dir={run_dir}", *overrides]
    return run_command(args, timeout, cwd=run_dir, env=env)


def logged_steps(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scalars(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir / "tb"))
    accumulator.Reload()
    return accumulator


def test_default_example_trains_through_torchrun(tmp_path):
    result = train(tmp_path)
    assert result.returncode == 0, result.output[-4000:]
    assert "step  100/100" in result.output
    events = scalars(tmp_path)
    tags = events.Tags()["scalars"]
    for tag in STEP_TAGS + worker_tags(2):
        assert tag in tags, tag
    losses = [event.value for event in events.Scalars("train/loss")]
    assert len(losses) == 10
    # Every process's CPU time in the step: the driver's and each worker's, which add up to the total.
    last = logged_steps(tmp_path)[-1]
    processes = ["perf/driver_cpu_s", "worker0/cpu_s", "worker1/cpu_s"]
    assert all(last[tag] > 0 for tag in processes), last
    assert last["perf/cpu_s"] == pytest.approx(sum(last[tag] for tag in processes))
    # Each worker's host memory: a process with torch loaded holds well over 50 MiB.
    assert all(50 < last[f"worker{k}/host_memory_mib"] < 8192 for k in range(2)), last
    assert losses[-1] < 0.75 * losses[0], losses
    assert (tmp_path / "config.yaml").is_file()
    assert list((tmp_path / "traces").glob("*.json"))
    assert (tmp_path / "checkpoints" / "step_100" / "manifest.json").is_file()
    starts = [
        plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
        for tag, content in events.PluginTagToContent("hparams").items()
        if tag.endswith("session_start_info")
    ]
    assert len(starts) == 1, "no hparams entry"
    hparams = starts[0].hparams  # a single run's columns: its schedule, split and micro-batches
    assert sorted(hparams) == ["balance", "num_microbatches", "schedule", "status"]
    assert [hparams[name].string_value for name in ("schedule", "balance", "status")] == [
        "gpipe",
        "[3,3]",
        "ok",
    ]
    assert hparams["num_microbatches"].number_value == 4


@pytest.mark.parametrize(("balance", "schedule"), [("[3,3]", "gpipe"), ("[2,2,2]", "1f1b")])
def test_rpc_training_equals_unsplit(tmp_path, schedule, balance):
    overrides = [*SMALL, f"schedule={schedule}", f"pipeline.balance={balance}"]
    result = train(tmp_path, *overrides)
    assert result.returncode == 0, result.output[-4000:]
    assert_run_equals_unsplit(tmp_path, overrides)


def test_many_microbatches_run_on_the_default_thread_pool(tmp_path):
    result = train(
        tmp_path,
        "train.batch_size=64",
        "train.steps=2",
        "train.log_every=1",
        "pipeline.num_microbatches=64",
        "schedule=1f1b",
        "pipeline.balance=[2,2,2]",
        timeout=120,
    )
    assert result.returncode == 0, result.output[-4000:]
    assert len(logged_steps(tmp_path)) == 2


@pytest.mark.parametrize("driver_start_delay_s", [0.0, 3.0])
def test_world_size_mismatch_is_a_clear_error_on_every_rank(tmp_path, driver_start_delay_s):
    """Also when rank 0 starts late: the worker finds the error first and exits, torchrun stops rank 0.

    The delay is a ``sitecustomize`` that sleeps in rank 0 before anything of pipetrain is imported.
    """
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        f"import os, time\nif os.environ.get('RANK') == '0':\n    time.sleep({driver_start_delay_s})\n"
    )
    python_path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path}
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        "--master-port=0",
        "-m",
        "pipetrain.worker",
        f"run_dir={tmp_path}",
    ]
    result = run_command(args, 120, cwd=tmp_path, env=env)
    assert result.returncode != 0
    for rank in (0, 1):
        assert (
            f"pipetrain [rank {rank}]: configuration error: pipeline: 2 stages on 2 workers need 3 processes"
            in result.output
        )
    assert "torchrun --nproc-per-node=3" in result.output


def test_a_stage_steps_its_optimizer_as_soon_as_its_own_actions_are_done(tmp_path):
    """Under fill-drain the last stage finishes first: its optimizer step overlaps the first stage's drain.

    The units sleep 50 ms in forward and backward (``tests/slow_parts.py``), so the order is deterministic.
    """
    overrides = [
        *slow_model_overrides(delay_s=0.05),
        "optim=sgd",
        "pipeline.balance=[3,3]",
        "pipeline.num_microbatches=4",
        "schedule=gpipe",
        "train.batch_size=16",
        "train.steps=2",
        "log.trace_every=1",
    ]
    result = train(tmp_path, *overrides, env={"PYTHONPATH": str(Path(__file__).resolve().parent)})
    assert result.returncode == 0, result.output[-4000:]
    events = json.loads((tmp_path / "traces" / "step000002.json").read_text())["traceEvents"]
    spans = [event for event in events if event["ph"] == "X"]
    last_stage_step = next(s for s in spans if s["pid"] == 1 and s["cat"] == "optimizer")
    first_stage_compute_end = max(
        s["ts"] + s["dur"] for s in spans if s["pid"] == 0 and s["cat"] == "compute"
    )
    assert last_stage_step["ts"] < first_stage_compute_end - 50_000, (
        last_stage_step,
        first_stage_compute_end,
    )
