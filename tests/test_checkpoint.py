"""Checkpoints: resume equals the uninterrupted run, any split resumes, merged state loads unsplit."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import Launched, make_config, run_command, tagged_pids

import pipetrain.checkpoint as checkpoint_module
from pipetrain.build import build_dataset, build_model, build_schedule_for, build_stages
from pipetrain.checkpoint import (
    MANIFEST,
    check_run_dir_checkpoints,
    find_checkpoint,
    merged_model_state,
    prune_checkpoints,
    read_manifest,
    written_bytes,
)
from pipetrain.data import BatchOrder
from pipetrain.driver import Driver
from pipetrain.executor import StageFailure, wait_all
from pipetrain.preflight import preflight
from pipetrain.targets import call_target
from pipetrain.transport import LocalWorkerHandle, local_workers


def train_in_process(cfg, run_dir: Path, printed: list[str] | None = None, stages=None) -> list[float]:
    """Train (or resume) in one process with checkpoints into ``run_dir``; return the losses run.

    ``printed`` collects the driver's lines; ``stages``, a list, receives the stages trained.
    """
    plan, built = build_stages(cfg)
    if stages is not None:
        stages.extend(built)
    batches = BatchOrder(build_dataset(cfg), cfg.train.batch_size, cfg.seed)
    print_fn = printed.append if printed is not None else (lambda _: None)
    driver = Driver(
        cfg,
        local_workers(built, build_schedule_for(cfg, plan.num_stages)),
        plan,
        batches,
        run_dir,
        print_fn=print_fn,
    )
    start = read_manifest(find_checkpoint(cfg.checkpoint.resume))["step"] if cfg.checkpoint.resume else 0
    return driver.train(start_step=start)


def train_switching_at(cfg, switch_step: int, switch, cfg_after=None) -> list[float]:
    """Train ``cfg`` without checkpoints, call ``switch(stage)`` on every stage after ``switch_step``
    steps, continue under ``cfg_after``; return the losses after the switch."""
    plan, stages = build_stages(cfg)
    handles = local_workers(stages, build_schedule_for(cfg, plan.num_stages))
    batches = BatchOrder(build_dataset(cfg), cfg.train.batch_size, cfg.seed)
    before = copy.deepcopy(cfg)
    before.train.steps = switch_step
    Driver(before, handles, plan, batches, print_fn=lambda _: None).train()
    for stage in stages:
        switch(stage)
    after = cfg_after or cfg
    return Driver(after, handles, plan, batches, print_fn=lambda _: None).train(start_step=switch_step)


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory) -> Path:
    """A finished AdamW run of 10 steps with checkpoints at steps 5 and 10 (read it, do not change it)."""
    run_dir = tmp_path_factory.mktemp("adamw_run")
    losses = train_in_process(adamw_config([3, 3]), run_dir)
    (run_dir / "losses.json").write_text(json.dumps(losses))
    return run_dir


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


# Resume obeys the config: per-parameter optimizer state from the checkpoint, the rest from the config.


def test_resume_uses_the_configured_learning_rate(adamw_run):
    cfg = adamw_config([3, 3])
    cfg.optim["lr"] = 0.05
    cfg.checkpoint.resume = str(adamw_run / "checkpoints" / "step_5")
    printed, stages = [], []
    resumed = train_in_process(cfg, adamw_run.parent / "resumed_lr", printed, stages)
    assert [group["lr"] for stage in stages for group in stage.optimizer.param_groups] == [0.05, 0.05]
    assert (
        f"pipetrain: resuming from {adamw_run / 'checkpoints' / 'step_5'}: optim.lr 0.01 -> 0.05" in printed
    )
    switched = train_switching_at(adamw_config([3, 3]), 5, _set_lr(0.05))
    assert resumed == switched  # bit-for-bit on CPU: the moments carried over, the new lr applied
    assert resumed != json.loads((adamw_run / "losses.json").read_text())[5:]


def test_resume_with_another_optimizer_starts_its_state_fresh(adamw_run):
    sgd = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05, "momentum": 0.9}
    cfg = adamw_config([3, 3])
    cfg.optim = dict(sgd)
    cfg.checkpoint.resume = str(adamw_run / "checkpoints" / "step_5")
    printed, stages = [], []
    resumed = train_in_process(cfg, adamw_run.parent / "resumed_sgd", printed, stages)
    assert all(isinstance(stage.optimizer, torch.optim.SGD) for stage in stages)
    notice = next(line for line in printed if line.startswith("pipetrain: resuming from"))
    assert "optimizer AdamW -> SGD: its state starts fresh" in notice
    assert "optim.lr 0.01 -> 0.05" in notice and "optim.momentum (default) -> 0.9" in notice

    def fresh_sgd(stage):
        stage.optimizer = call_target(sgd, "optim")(stage.module.parameters())

    assert resumed == train_switching_at(adamw_config([3, 3]), 5, fresh_sgd, cfg_after=cfg)
    assert read_manifest(adamw_run / "checkpoints" / "step_5")["optimizer_class"] == "torch.optim.adamw.AdamW"
    stage_file = torch.load(adamw_run / "checkpoints" / "step_5" / "stage0.pt", weights_only=False)
    assert stage_file["optimizer"]["class"] == "torch.optim.adamw.AdamW"


def test_a_checkpoint_without_its_optimizer_class_restores_only_state_that_fits(adamw_run, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(adamw_run, run)
    step_5 = run / "checkpoints" / "step_5"
    manifest = read_manifest(step_5)
    del manifest["optimizer_class"], manifest["optim"]
    (step_5 / MANIFEST).write_text(json.dumps(manifest))
    for path in step_5.glob("stage*.pt"):
        payload = torch.load(path, weights_only=False)
        del payload["optimizer"]["class"]
        torch.save(payload, path)
    cfg = adamw_config([3, 3])
    cfg.checkpoint.resume = str(step_5)
    printed = []
    resumed = train_in_process(cfg, tmp_path / "same", printed)
    assert resumed == json.loads((adamw_run / "losses.json").read_text())[5:]
    assert (
        f"pipetrain: resuming from {step_5}: the checkpoint does not name its optimizer; its state "
        "(exp_avg, exp_avg_sq, step) fits AdamW: restored" in printed
    )
    cfg.optim = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.01, "momentum": 0.9}
    printed.clear()
    train_in_process(cfg, tmp_path / "sgd", printed)
    assert "does not fit SGD: its state starts fresh" in "\n".join(printed)


def _set_lr(lr: float):
    def switch(stage):
        for group in stage.optimizer.param_groups:
            group["lr"] = lr

    return switch


# Saves are bounded by their own progress, not by the no-progress watchdog.


class _ThreadedSaves(LocalWorkerHandle):
    """An in-process handle whose whole-stage requests (checkpoint saves) run on their own thread, as a
    worker process runs them while the driver waits."""

    def __init__(self, handle: LocalWorkerHandle) -> None:
        super().__init__(handle.runner)
        self.threads: list[threading.Thread] = []

    def call_each_stage(self, fn, *args):
        future = torch.futures.Future()

        def run():
            try:
                future.set_result(self.runner.each_stage(fn, *args))
            except Exception as error:  # noqa: BLE001 - reported through the future
                future.set_exception(error)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)
        return future


def _slow_atomic_save(chunks: int, pause_s: float, write: bool):
    real_save = checkpoint_module._atomic_save

    def save(obj, path):
        with open(path.with_name(path.name + ".tmp"), "wb") as handle:
            for _ in range(chunks):
                if write:
                    handle.write(b"x" * 4096)
                    handle.flush()
                time.sleep(pause_s)
        real_save(obj, path)

    return save


@pytest.mark.parametrize("keeps_writing", [True, False])
def test_a_save_longer_than_the_timeout_completes_while_it_writes(tmp_path, monkeypatch, keeps_writing):
    cfg = adamw_config([3, 3], steps=1)
    cfg.rpc.timeout_s = 0.5
    monkeypatch.setattr(checkpoint_module, "_atomic_save", _slow_atomic_save(8, 0.15, keeps_writing))
    plan, stages = build_stages(cfg)
    handles = [
        _ThreadedSaves(handle) for handle in local_workers(stages, build_schedule_for(cfg, plan.num_stages))
    ]
    batches = BatchOrder(build_dataset(cfg), cfg.train.batch_size, cfg.seed)
    driver = Driver(cfg, handles, plan, batches, tmp_path, print_fn=lambda _: None)
    started = time.monotonic()
    try:
        if keeps_writing:  # 1.2 s of writing per stage, with rpc.timeout_s=0.5
            driver.train()
            assert time.monotonic() - started > 1.2
            assert (tmp_path / "checkpoints" / "step_1" / MANIFEST).is_file()
        else:
            with pytest.raises(StageFailure, match=r"checkpoint save.*no progress for 0.5 s"):
                driver.train()
            assert not (tmp_path / "checkpoints" / "step_1").exists()
    finally:
        for handle in handles:
            for thread in handle.threads:
                thread.join()


def test_wait_all_counts_a_changing_progress_probe_as_progress(tmp_path):
    def late(after_s: float) -> torch.futures.Future:
        future = torch.futures.Future()
        threading.Timer(after_s, future.set_result, args=("done",)).start()
        return future

    path = tmp_path / "stage0.pt.tmp"
    path.write_bytes(b"")
    writer = threading.Thread(target=_grow, args=(path, 10, 0.1))
    writer.start()
    pending = [("stage 0", "checkpoint save", late(1.2))]
    assert wait_all(pending, timeout_s=0.4, progress=lambda: written_bytes(tmp_path)) == ["done"]
    writer.join()
    with pytest.raises(StageFailure, match=r"stage 0 failed during checkpoint save: no progress for 0.4 s"):
        wait_all([("stage 0", "checkpoint save", late(1.2))], 0.4, progress=lambda: written_bytes(tmp_path))


def _grow(path: Path, chunks: int, pause_s: float) -> None:
    with open(path, "ab") as handle:
        for _ in range(chunks):
            handle.write(b"x" * 1024)
            handle.flush()
            time.sleep(pause_s)


# keep_last, stale partials, and existing checkpoints that are never replaced.


def test_keep_last_prunes_older_checkpoints(tmp_path):
    cfg = adamw_config([3, 3])
    cfg.checkpoint.every = 2
    cfg.checkpoint.keep_last = 2
    train_in_process(cfg, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_10", "step_8"]
    for step in (1, 2, 3):
        (tmp_path / "checkpoints" / f"step_{step}").mkdir()
        (tmp_path / "checkpoints" / f"step_{step}" / MANIFEST).write_text("{}")
    (tmp_path / "checkpoints" / "step_4.partial").mkdir()
    removed = prune_checkpoints(tmp_path / "checkpoints", 1)
    assert sorted(p.name for p in removed) == ["step_1", "step_2", "step_3", "step_8"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_10", "step_4.partial"]


def test_stale_partial_checkpoints_are_removed_when_a_run_starts(tmp_path):
    stale = tmp_path / "checkpoints" / "step_3.partial"
    stale.mkdir(parents=True)
    (stale / "stage0.pt.tmp").write_bytes(b"half")
    cfg = adamw_config([3, 3], steps=2)
    printed = []
    train_in_process(cfg, tmp_path, printed)
    assert not stale.exists()
    assert f"pipetrain: removed {stale}, left unfinished by an earlier run" in printed
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2"]


def test_an_existing_checkpoint_is_never_replaced(adamw_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(adamw_run, run)
    before = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
    with pytest.raises(
        FileExistsError, match=r"checkpoint: .*step_5 already exists and a checkpoint is never"
    ):
        train_in_process(adamw_config([3, 3]), run)
    assert {p: p.read_bytes() for p in before} == before
    with pytest.raises(
        ValueError, match=r"run_dir: .* already holds checkpoints \(step_5, step_10\) of step >= 0"
    ):
        check_run_dir_checkpoints(run, 0)
    check_run_dir_checkpoints(run, 10, resume=str(run / "checkpoints"))  # its own latest: fine
    with pytest.raises(ValueError, match=r"run_dir: .*\(step_10\) of step >= 5.*choose a new run_dir"):
        check_run_dir_checkpoints(run, 5, resume=str(run / "checkpoints" / "step_5"))
    with pytest.raises(ValueError, match=r"\(step_10\) of step >= 10"):
        check_run_dir_checkpoints(run, 10, resume=str(adamw_run / "checkpoints"))  # another run's step 10


# Clear errors before launch.


def test_a_damaged_checkpoint_file_is_named_with_the_previous_checkpoint(adamw_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(adamw_run, run)
    damaged = run / "checkpoints" / "step_10" / "stage1.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    cfg = adamw_config([3, 3])
    cfg.train.steps = 20
    cfg.checkpoint.resume = str(run / "checkpoints")
    step_5 = run / "checkpoints" / "step_5"
    with pytest.raises(ValueError) as error:
        preflight(cfg)
    assert str(error.value) == (
        f"checkpoint.resume: {damaged} cannot be read (not a whole torch.save archive: cut short or "
        f"overwritten); the checkpoint is damaged: resume from the previous complete checkpoint: "
        f"checkpoint.resume={step_5}"
    )
    (step_5 / "stage0.pt").unlink()
    with pytest.raises(ValueError, match=r"stage0.pt cannot be read \(the file is missing\)"):
        cfg.checkpoint.resume = str(step_5)
        preflight(cfg)
    cfg.checkpoint.resume = str(run / "checkpoints")
    with pytest.raises(
        ValueError, match=r"holds no earlier complete checkpoint; start without checkpoint.resume"
    ):
        preflight(cfg)


def test_resume_of_another_size_names_the_tensor_and_the_model_argument(adamw_run):
    cfg = adamw_config([3, 3])
    cfg.model["hidden"] = 64
    cfg.checkpoint.resume = str(adamw_run / "checkpoints" / "step_5")
    with pytest.raises(ValueError) as error:
        preflight(cfg)
    stage0 = adamw_run / "checkpoints" / "step_5" / "stage0.pt"
    assert str(error.value) == (
        f"checkpoint.resume: layers.0.0.weight is [32, 8] in {str(stage0)!r} but [64, 8] in the model "
        "(and 10 more: layers.0.0.bias, layers.1.0.weight, layers.1.0.bias (+7 more)); set "
        "model.hidden=32 to build the model the checkpoint was saved from, or resume a checkpoint of this "
        "model"
    )


def _state_of(**changes):
    cfg = adamw_config([3, 3])
    cfg.model.update(changes)
    return build_model(cfg).state_dict()


@pytest.mark.parametrize(
    "make,message",
    [
        (
            lambda p: torch.save(_state_of(num_classes=1000), p),
            r"model.init: head.weight is \[1000, 32\] in '{p}' but \[5, 32\] in the model \(and 1 more: "
            r"head.bias\); set model.num_classes=1000 to build the model the file was saved from, or give a "
            r"state dict of this model",
        ),
        (
            lambda p: torch.save(_state_of(hidden=64), p),
            r"model.init: layers.0.0.weight is \[64, 8\] .* set model.hidden=64 to build the model",
        ),
        (
            lambda p: torch.save(_state_of(depth=5), p),
            r"model.init: '{p}' does not fit the model: it holds layers.5.0.weight, layers.5.0.bias that the "
            r"model has not; set the model.\* arguments it was saved with",
        ),
        (
            lambda p: torch.save({"module." + k: v for k, v in _state_of().items()}, p),
            r"model.init: '{p}' does not fit the model: the model's layers.0.0.weight, layers.0.0.bias, "
            r"layers.1.0.weight \(\+9 more\) are not in it; .* its names carry the prefix 'module.'",
        ),
        (
            lambda p: torch.save(build_model(adamw_config([3, 3])), p),
            r"model.init: '{p}' holds a whole pickled module \(pipetrain.models.mlp.MLP\), not a state dict; "
            r"save its weights instead: torch.save\(model.state_dict\(\), path\)",
        ),
        (
            lambda p: torch.save([1, 2], p),
            r"model.init: '{p}' holds a list, not a state dict \(a mapping from parameter names to "
            r"tensors\); give one written by torch.save\(model.state_dict\(\), path\), or merge a "
            r"pipetrain checkpoint: python -m pipetrain.checkpoint merge <checkpoints/step_N> model.pt",
        ),
        (
            lambda p: torch.save({"model": _state_of(), "epoch": 3}, p),
            r"model.init: '{p}' holds a dict with entries model, epoch, not a state dict; its weights look "
            r"to be under 'model': save them alone",
        ),
        (
            lambda p: p.write_text("layers.0.0.weight: 1.0\n"),
            r"model.init: '{p}' is not a file torch.load can read \(it was not written by torch.save, or cut "
            r"short\); give a state dict written by torch.save\(model.state_dict\(\), path\)",
        ),
        (lambda p: None, r"model.init: '{p}' is not a file \(nothing is there\)"),
    ],
)
def test_a_model_init_that_is_not_this_models_state_dict_is_refused(tmp_path, make, message):
    path = tmp_path / "init.pt"
    make(path)
    cfg = adamw_config([3, 3])
    cfg.model["init"] = str(path)
    with pytest.raises(ValueError, match=message.format(p=re.escape(str(path)))):
        preflight(cfg)


def test_a_model_argument_left_at_its_default_is_offered_with_a_plus(tmp_path):
    path = tmp_path / "init.pt"
    torch.save(_state_of(num_classes=1000), path)
    cfg = adamw_config([3, 3])
    del cfg.model["num_classes"]
    cfg.data["num_classes"] = 10  # mlp's default
    cfg.model["init"] = str(path)
    with pytest.raises(ValueError, match=r"set \+model.num_classes=1000 to build the model"):
        preflight(cfg)


def test_a_checkpoint_as_model_init_says_how_to_merge_it(adamw_run):
    cfg = adamw_config([3, 3])
    step_5 = adamw_run / "checkpoints" / "step_5"
    cfg.model["init"] = str(adamw_run / "checkpoints")
    with pytest.raises(ValueError) as error:
        preflight(cfg)
    assert str(error.value) == (
        f"model.init: '{adamw_run / 'checkpoints'}' is a pipetrain checkpoint directory, not a state dict "
        f"file; merge it into one: python -m pipetrain.checkpoint merge "
        f"{adamw_run / 'checkpoints' / 'step_10'} model.pt, then set model.init=model.pt (or continue its "
        f"run with checkpoint.resume={adamw_run / 'checkpoints'})"
    )
    cfg.model["init"] = str(step_5 / "stage0.pt")
    with pytest.raises(ValueError, match=r"is one stage file of a pipetrain checkpoint, not the whole model"):
        preflight(cfg)
