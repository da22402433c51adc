"""Checkpoints: resume equals the uninterrupted run, any split resumes, merged state loads unsplit."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import Launched, make_config, run_command, tagged_pids

from pipetrain.build import build_dataset, build_model, build_stages
from pipetrain.checkpoint import MANIFEST, find_checkpoint, merged_model_state, read_manifest
from pipetrain.data import BatchOrder
from pipetrain.driver import Driver
from pipetrain.preflight import preflight
from pipetrain.transport import LocalStageHandle


def train_in_process(cfg, run_dir: Path) -> list[float]:
    """Train (or resume) in one process with checkpoints into ``run_dir``; return the losses run."""
    plan, stages = build_stages(cfg)
    batches = BatchOrder(build_dataset(cfg), cfg.train.batch_size, cfg.seed)
    driver = Driver(
        cfg, [LocalStageHandle(s) for s in stages], plan, batches, run_dir, print_fn=lambda _: None
    )
    start = read_manifest(find_checkpoint(cfg.checkpoint.resume))["step"] if cfg.checkpoint.resume else 0
    return driver.train(start_step=start)


def adamw_config(balance: list[int], steps: int = 10):
    cfg = make_config("mlp", len(balance), "1f1b", steps=steps)
    cfg.pipeline.balance = balance
    cfg.optim = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.01, "weight_decay": 0.01}
    cfg.checkpoint.every = 5
    return cfg


def test_resume_continues_exactly_like_the_uninterrupted_run(tmp_path):
    full = train_in_process(adamw_config([3, 3]), tmp_path / "full")
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["step_10", "step_5"]
    cfg = adamw_config([3, 3])
    cfg.checkpoint.resume = str(tmp_path / "full" / "checkpoints" / "step_5")
    resumed = train_in_process(cfg, tmp_path / "resumed")
    assert resumed == full[5:]  # bit-for-bit on CPU
    final = merged_model_state(tmp_path / "full" / "checkpoints" / "step_10")
    again = merged_model_state(tmp_path / "resumed" / "checkpoints" / "step_10")
    for name, value in final.items():
        assert torch.equal(again[name], value), name


@pytest.mark.parametrize("new_balance", [[2, 4], [2, 2, 2], [6]])
def test_resume_under_a_different_split(tmp_path, new_balance):
    full = train_in_process(adamw_config([3, 3]), tmp_path / "full")
    cfg = adamw_config(new_balance)
    cfg.checkpoint.resume = str(tmp_path / "full" / "checkpoints")  # the directory: latest step is 10
    cfg.train.steps = 12
    preflight(cfg)
    step_5 = adamw_config(new_balance)
    step_5.checkpoint.resume = str(tmp_path / "full" / "checkpoints" / "step_5")
    resumed = train_in_process(step_5, tmp_path / "resumed")
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[5:]), rtol=1e-6, atol=1e-6)


def test_merged_checkpoint_loads_into_the_unsplit_model_and_as_model_init(tmp_path):
    cfg = adamw_config([2, 2, 2], steps=5)
    train_in_process(cfg, tmp_path / "run")
    out = tmp_path / "merged.pt"
    step_dir = tmp_path / "run" / "checkpoints" / "step_5"
    result = run_command([sys.executable, "-m", "pipetrain.checkpoint", "merge", str(step_dir), str(out)], 60)
    assert result.returncode == 0, result.output
    state = torch.load(out, weights_only=True)
    unsplit = build_model(cfg)
    unsplit.load_state_dict(state, strict=True)
    assert not all(torch.equal(state[k], v) for k, v in build_model(cfg).state_dict().items())
    init_cfg = dataclasses.replace(cfg, model={**cfg.model, "init": str(out)})
    for name, value in build_model(init_cfg).state_dict().items():
        assert torch.equal(value, state[name]), name


def test_checkpoint_is_written_atomically_with_a_manifest(tmp_path):
    train_in_process(adamw_config([3, 3]), tmp_path)
    step_dir = tmp_path / "checkpoints" / "step_10"
    manifest = json.loads((step_dir / MANIFEST).read_text())
    assert manifest["step"] == 10 and manifest["num_stages"] == 2
    assert manifest["stages"] == [["layers.0", "layers.1", "layers.2"], ["layers.3", "layers.4", "head"]]
    assert sorted(p.name for p in step_dir.iterdir()) == [MANIFEST, "stage0.pt", "stage1.pt"]
    assert not list((tmp_path / "checkpoints").glob("*.partial"))


@pytest.mark.parametrize(
    "resume,message",
    [
        (
            "/nonexistent/checkpoints",
            r"checkpoint.resume: '/nonexistent/checkpoints' holds no complete checkpoint",
        ),
        ("{run}/checkpoints/step_10", r"checkpoint.resume: the checkpoint is at step 10 and train.steps=10"),
    ],
)
def test_bad_resume_is_refused_before_start(tmp_path, resume, message):
    train_in_process(adamw_config([3, 3]), tmp_path)
    cfg = adamw_config([3, 3])
    cfg.checkpoint.resume = resume.format(run=tmp_path)
    with pytest.raises(ValueError, match=message):
        preflight(cfg)


def test_resume_of_another_model_is_refused(tmp_path):
    train_in_process(adamw_config([3, 3]), tmp_path)
    cfg = adamw_config([3, 2])
    cfg.model["depth"] = 3
    cfg.checkpoint.resume = str(tmp_path / "checkpoints")
    cfg.train.steps = 20
    with pytest.raises(ValueError, match=r"checkpoint.resume: .* was saved from a model with units"):
        preflight(cfg)


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_killed_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    args = [
        sys.executable,
        "-m",
        "pipetrain.train",
        f"hydra.run.dir={tmp_path}",
        "model.hidden=1536",
        "train.steps=1000",
        "train.log_every=1000",
        "checkpoint.every=1",
        "train.batch_size=8",
    ]
    run = Launched(args, cwd=tmp_path)
    checkpoints = tmp_path / "checkpoints"
    deadline = time.monotonic() + 90
    victim = None
    while victim is None and time.monotonic() < deadline:
        assert run.process.poll() is None, run.process.stdout.read()[-3000:]
        partial = (
            [p for p in checkpoints.glob("step_*.partial") if p.is_dir()] if checkpoints.exists() else []
        )
        committed = (
            [p for p in checkpoints.glob("step_*") if not p.name.endswith(".partial")] if partial else []
        )
        if partial and committed and list(partial[0].glob("stage0.pt*")):
            victim = partial[0]
        else:
            time.sleep(0.002)
    assert victim is not None, "never caught a checkpoint being written"
    stage1_pid = _pid_of_rank(run.tag, 2)
    os.kill(stage1_pid, signal.SIGKILL)
    result = run.finish(timeout=60)
    assert result.returncode != 0
    latest = find_checkpoint(checkpoints)
    assert not latest.name.endswith(".partial")
    state = merged_model_state(latest)
    cfg = make_config("mlp")
    cfg.model.update({"in_features": 32, "hidden": 1536, "num_classes": 10})
    build_model(cfg).load_state_dict(state, strict=True)


def _pid_of_rank(tag: str, rank: int) -> int:
    for pid in tagged_pids(tag):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK" in b"".join(environ):
            return pid
    raise AssertionError(f"no process of rank {rank}")
