"""The training loop's options: learning-rate schedules, global gradient-norm clipping, evaluation.

Each is checked against the unsplit model doing the same thing (``conftest.train_unsplit``), in-process
and over RPC, and through checkpoints and resume.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys

import pytest
import torch
from conftest import assert_same_training, make_config, run_command, train_pipelined, train_unsplit

from pipetrain.build import build_datasets, build_eval_batches, build_model, build_schedule_for, build_stages
from pipetrain.checkpoint import merged_model_state
from pipetrain.compose import compose_config, to_train_config
from pipetrain.driver import run_step
from pipetrain.grad_clip import clip_by_global_norm
from pipetrain.losses import get_loss
from pipetrain.preflight import check_settings, preflight
from pipetrain.transport import local_workers

pytestmark = pytest.mark.timeout(120)

WARMUP_COSINE = {
    "_target_": "pipetrain.lr_schedules.warmup_cosine",
    "_partial_": True,
    "warmup_steps": 2,
    "total_steps": 6,
}


def loop_config(schedule: str = "1f1b", clip: float | None = 0.2, steps: int = 6):
    """The MLP on 2 stages with a warm-up + cosine schedule and clipping that bites in most steps."""
    cfg = make_config("mlp", 2, schedule, num_microbatches=4, steps=steps, lr=0.5)
    cfg.lr_scheduler = dict(WARMUP_COSINE, total_steps=steps)
    cfg.train.clip_grad_norm = clip
    return cfg


def train_over_rpc(run_dir, overrides: list[str], timeout_s: float) -> None:
    """Train ``overrides`` with ``python -m pipetrain.train`` (torchrun, real workers) into ``run_dir``."""
    command = [sys.executable, "-m", "pipetrain.train", f"run_dir={run_dir}", *overrides]
    result = run_command(command, timeout_s, cwd=run_dir)
    assert result.returncode == 0, result.output[-4000:]


def logged(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "schedule,balance,stages_per_worker",
    [("gpipe", [3, 3], 1), ("1f1b", [3, 3], 1), ("interleaved_1f1b", [2, 1, 2, 1], 2)],
)
def test_schedule_and_clipping_equal_the_unsplit_model(tmp_path, schedule, balance, stages_per_worker):
    cfg = loop_config(schedule)
    cfg.pipeline.balance = balance
    cfg.pipeline.stages_per_worker = stages_per_worker
    reference: dict[str, list[float]] = {}
    reference_losses, reference_state = train_unsplit(cfg, reference)
    assert max(reference["grad_norm"]) > cfg.train.clip_grad_norm, "clipping must bite to be tested"

    losses, state = train_pipelined(cfg, tmp_path)

    assert_same_training(losses, state, reference_losses, reference_state)
    entries = logged(tmp_path)
    torch.testing.assert_close(
        torch.tensor([entry["train/grad_norm"] for entry in entries]),
        torch.tensor(reference["grad_norm"]),
        rtol=1e-6,
        atol=0.0,
    )
    assert [entry["train/lr"] for entry in entries] == pytest.approx(reference["lr"], rel=1e-12)
    assert reference["lr"][0] == pytest.approx(0.25) and reference["lr"][1] == pytest.approx(0.5)


def test_a_resumed_run_continues_the_learning_rate_schedule_exactly(tmp_path):
    def config():
        cfg = loop_config("1f1b", clip=None)
        cfg.optim = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.01}
        cfg.checkpoint.every = 3
        return cfg

    full_losses, full_state = train_pipelined(config(), tmp_path / "full")
    resumed = config()
    resumed.checkpoint.resume = str(tmp_path / "full" / "checkpoints" / "step_3")
    losses, _ = train_pipelined(resumed, tmp_path / "resumed", start_step=3)

    assert losses == full_losses[3:]
    assert [e["train/lr"] for e in logged(tmp_path / "resumed")] == [
        e["train/lr"] for e in logged(tmp_path / "full")[3:]
    ]
    final = merged_model_state(tmp_path / "resumed" / "checkpoints" / "step_6")
    for name, value in full_state.items():
        assert torch.equal(final[name], value), name


def test_a_changed_schedule_on_resume_is_named(tmp_path):
    cfg = loop_config("gpipe", clip=None)
    cfg.checkpoint.every = 3
    train_pipelined(cfg, tmp_path / "first")
    resumed = loop_config("gpipe", clip=None)
    resumed.lr_scheduler = {}
    resumed.checkpoint.resume = str(tmp_path / "first" / "checkpoints" / "step_3")
    lines: list[str] = []
    train_pipelined(resumed, tmp_path / "second", start_step=3, print_fn=lines.append)
    notice = next(line for line in lines if "resuming from" in line)
    assert "lr_scheduler warmup_cosine(warmup_steps=2, total_steps=6) -> none" in notice
    assert {e["train/lr"] for e in logged(tmp_path / "second")} == {0.5}


def test_non_finite_gradients_skip_the_step_on_every_stage():
    cfg = loop_config("1f1b", clip=1.0, steps=2)
    cfg.train.stop_on_nan = False
    plan, stages = build_stages(cfg)
    schedule = build_schedule_for(cfg, plan.num_stages)
    handles = local_workers(stages, schedule)
    before = {n: value.clone() for stage in stages for n, value in stage.module.full_state_dict().items()}
    shape = (cfg.train.batch_size, cfg.model["in_features"])
    inputs = torch.randn(shape)
    inputs[5, 3] = float("nan")  # one sample of one micro-batch: its loss, then every gradient, is NaN
    targets = torch.zeros(cfg.train.batch_size, dtype=torch.long)

    result = run_step(handles, schedule, inputs, targets, 4, timeout_s=30, clip_grad_norm=1.0)

    assert result.clipped is not None and not result.clipped.finite
    for stage in stages:
        for name, value in stage.module.full_state_dict().items():
            assert torch.equal(value, before[name]), f"{name} changed in a skipped step"
        assert all(p.grad is None for p in stage.module.parameters())
        assert stage.optimizer.param_groups[0]["lr"] == pytest.approx(0.5)  # the schedule still advanced
    finite = run_step(handles, schedule, torch.randn(shape), targets, 4, timeout_s=30)
    assert finite.clipped is None
    assert any(not torch.equal(v, before[n]) for s in stages for n, v in s.module.full_state_dict().items())


def test_the_global_norm_is_that_of_all_gradients_together():
    gradients = [torch.randn(5, 3), torch.randn(7), torch.randn(2, 2)]
    norms = [float(torch.linalg.vector_norm(g)) for g in gradients]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in gradients]))
    clipped = clip_by_global_norm(norms, max_norm=1.0)
    assert clipped.total_norm == pytest.approx(float(expected), rel=1e-6)
    assert clipped.grad_scale == pytest.approx(1.0 / (float(expected) + 1e-6), rel=1e-6)
    assert clip_by_global_norm(norms, max_norm=1e9).grad_scale == 1.0
    assert not clip_by_global_norm([1.0, float("inf")], 1.0).finite


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.clip_grad_norm=0"], "train.clip_grad_norm: 0"),
        (["lr_scheduler=cosine", "lr_scheduler._partial_=false"], "lr_scheduler._partial_: must be true"),
        (["lr_scheduler=cosine", "+lr_scheduler.warmup=3"], "lr_scheduler.warmup: "),
        (["lr_scheduler=warmup_cosine", "lr_scheduler.warmup_steps=500"], "lr_scheduler: "),
    ],
)
def test_bad_loop_settings_name_their_key(overrides, message):
    cfg = to_train_config(compose_config(overrides))
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        check_settings(cfg)


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_rpc_run_with_schedule_clipping_and_evaluation_equals_unsplit(tmp_path):
    overrides = [
        "model.hidden=32",
        "train.batch_size=16",
        "train.steps=5",
        "train.log_every=1",
        "optim=sgd",
        "optim.lr=0.5",
        "schedule=1f1b",
        "lr_scheduler=warmup_cosine",
        "lr_scheduler.warmup_steps=2",
        "train.clip_grad_norm=0.2",
        "data.eval_split=0.25",
        "eval.every=2",
        "eval.batches=4",
        "pipeline.activation_checkpointing=except_last",
    ]
    train_over_rpc(tmp_path, overrides, timeout_s=180)
    reference: dict[str, list[float]] = {}
    reference_losses, reference_state = train_unsplit(to_train_config(compose_config(overrides)), reference)
    assert max(reference["grad_norm"]) > 0.2
    entries = logged(tmp_path)
    torch.testing.assert_close(
        torch.tensor([e["train/loss"] for e in entries]), torch.tensor(reference_losses), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        torch.tensor([e["train/grad_norm"] for e in entries]),
        torch.tensor(reference["grad_norm"]),
        rtol=1e-6,
        atol=0.0,
    )
    assert [e["train/lr"] for e in entries] == pytest.approx(reference["lr"], rel=1e-12)
    weights = merged_model_state(tmp_path / "checkpoints" / "step_5")
    for name, value in reference_state.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-5, msg=name)
    evaluated = {e["step"]: (e["eval/loss"], e["eval/accuracy"]) for e in entries if "eval/loss" in e}
    assert sorted(evaluated) == [2, 4, 5]
    cfg = to_train_config(compose_config(overrides))
    for step, (loss, accuracy) in evaluated.items():
        reference_loss, reference_accuracy = unsplit_evaluation(cfg, step)
        assert loss == pytest.approx(reference_loss, rel=1e-5, abs=1e-6)
        assert accuracy == pytest.approx(reference_accuracy, abs=1e-9)


def unsplit_evaluation(cfg, steps: int) -> tuple[float, float]:
    """The unsplit model after ``steps`` training steps, evaluated on the held-out batches."""
    trained = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    model = build_model(cfg)
    model.load_state_dict(train_unsplit(trained)[1])
    model.eval()
    batches = build_eval_batches(cfg, build_datasets(cfg)[1])
    loss_fn = get_loss(cfg.train.loss)
    losses, correct, count = [], 0, 0
    with torch.no_grad():
        for index in range(len(batches)):
            inputs, targets = batches.batch(index)
            logits = model(inputs)
            losses.append(loss_fn(logits, targets).item())
            correct += int((logits.argmax(-1) == targets).sum())
            count += targets.numel()
    return sum(losses) / len(losses), correct / count


def eval_config(schedule: str, balance: list[int], stages_per_worker: int = 1):
    cfg = make_config("mlp", 2, schedule, num_microbatches=4, steps=4, lr=0.5)
    cfg.pipeline.balance = balance
    cfg.pipeline.stages_per_worker = stages_per_worker
    cfg.data = dict(cfg.data, eval_split=0.25)
    cfg.eval.every = 3  # after step 3, and after the last step (4)
    cfg.train.log_every = 2
    return cfg


@pytest.mark.parametrize(
    "schedule,balance,stages_per_worker", [("1f1b", [3, 3], 1), ("interleaved_1f1b", [2, 1, 2, 1], 2)]
)
def test_evaluation_equals_the_unsplit_model_in_eval_mode(tmp_path, schedule, balance, stages_per_worker):
    cfg = eval_config(schedule, balance, stages_per_worker)
    lines: list[str] = []
    losses, state = train_pipelined(cfg, tmp_path, print_fn=lines.append)

    reference_losses, reference_state = train_unsplit(cfg)
    assert_same_training(losses, state, reference_losses, reference_state)  # evaluation changes nothing
    entries = {entry["step"]: entry for entry in logged(tmp_path)}
    assert sorted(entries) == [2, 3, 4]
    assert "eval/loss" not in entries[2]
    for step in (3, 4):
        loss, accuracy = unsplit_evaluation(cfg, step)
        assert entries[step]["eval/loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
        assert entries[step]["eval/accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert any("eval loss" in line and "accuracy" in line for line in lines)
    held_out = len(build_datasets(cfg)[1])
    assert held_out == 64 and len(build_datasets(cfg)[0]) == 256 - held_out


@pytest.mark.parametrize(
    "change,message",
    [
        ({"every": 2}, "eval.every: 2 needs an evaluation set"),
        ({"every": 2, "eval_split": 1.0}, "data.eval_split: 1.0 of 256 samples"),
        ({"every": 2, "eval_split": 0.25, "batches": 9}, "eval.batches: 9 batches of 16"),
    ],
)
def test_bad_evaluation_settings_name_their_key(change, message):
    cfg = make_config("mlp", 2)
    cfg.eval.every = change["every"]
    cfg.eval.batches = change.get("batches", 0)
    if "eval_split" in change:
        cfg.data = dict(cfg.data, eval_split=change["eval_split"])
    with pytest.raises(ValueError, match=re.escape(message)):
        preflight(cfg)


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_the_digits_experiment_reaches_95_percent_eval_accuracy(tmp_path):
    train_over_rpc(tmp_path, ["experiment=digits"], timeout_s=220)
    evaluated = [e for e in logged(tmp_path) if "eval/accuracy" in e]
    assert [e["step"] for e in evaluated] == [100, 200, 300]
    assert evaluated[-1]["eval/accuracy"] >= 0.95, evaluated


def test_digits_without_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as if scikit-learn were not installed
    cfg = to_train_config(compose_config(["experiment=digits"]))
    with pytest.raises(ValueError, match=re.escape("pip install 'pipetrain[digits]'")):
        preflight(cfg)


@pytest.mark.parametrize("schedule", ["1f1b", "zb_h1"])
@pytest.mark.parametrize("model", ["mlp", "gpt"])
@pytest.mark.parametrize("mode", ["except_last", "always"])
def test_activation_checkpointing_is_exact_and_holds_less(tmp_path, model, mode, schedule):
    def run(checkpointing: str, run_dir):
        cfg = make_config(model, 2, schedule, num_microbatches=4, steps=3)
        cfg.pipeline.activation_checkpointing = checkpointing
        return train_pipelined(cfg, run_dir), logged(run_dir)

    (losses, state), entries = run(mode, tmp_path / mode)
    (reference_losses, reference_state), reference_entries = run("never", tmp_path / "never")

    assert_same_training(losses, state, reference_losses, reference_state)
    # except_last keeps the last micro-batch whole: the last stage, one micro-batch at a time, gains nothing.
    # Under zb_h1 the last stage's peak comes after I, which keeps a recomputed graph whole for W (it must
    # not read recomputed tensors ahead of autograd), where a graph not recomputed keeps only what W needs.
    for worker in (0, 1) if mode == "always" else (0,):
        held = entries[-1][f"worker{worker}/peak_activation_mib"]
        kept = reference_entries[-1][f"worker{worker}/peak_activation_mib"]
        bound = 1.0 if schedule == "zb_h1" and worker == 1 else 0.5 if mode == "always" else 0.8
        assert held < bound * kept, (worker, held, kept)


def test_activation_checkpointing_refuses_batchnorm_and_unknown_modes():
    cfg = to_train_config(compose_config(["experiment=resnet18", "pipeline.activation_checkpointing=always"]))
    with pytest.raises(
        ValueError, match="pipeline.activation_checkpointing: always would run the model's Batch"
    ):
        preflight(cfg, check_data=False)
    cfg = make_config("mlp", 2)
    cfg.pipeline.activation_checkpointing = "sometimes"
    with pytest.raises(ValueError, match="pipeline.activation_checkpointing: 'sometimes' is not one of"):
        check_settings(cfg)


def test_bf16_keeps_float32_weights_halves_the_bytes_sent_and_tracks_fp32(tmp_path):
    def run(precision: str):
        cfg = make_config("gpt", 2, "1f1b", num_microbatches=4, steps=4, lr=0.05)
        cfg.precision = precision
        return train_pipelined(cfg, tmp_path / precision), logged(tmp_path / precision)

    (losses, state), entries = run("bf16")
    (reference_losses, _), reference_entries = run("fp32")

    assert all(value.dtype == torch.float32 for value in state.values() if value.is_floating_point())
    assert losses != reference_losses  # the forward really ran in bfloat16
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=2e-2, atol=0.0)
    for worker in (0, 1):
        sent, sent_fp32 = (
            entries[-1][f"worker{worker}/sent_mib"],
            reference_entries[-1][f"worker{worker}/sent_mib"],
        )
        assert sent_fp32 > 0 and sent == pytest.approx(sent_fp32 / 2), worker


@pytest.mark.timeout(900)
def test_compiled_stages_train_like_the_unsplit_model(tmp_path):
    cfg = make_config("mlp", 2, "1f1b", num_microbatches=2, steps=3)
    cfg.train.compile = True
    losses, state = train_pipelined(cfg, tmp_path)
    reference_losses, reference_state = train_unsplit(cfg)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-4, atol=1e-4)
    for name, value in reference_state.items():
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-4, msg=name)
    plan, stages = build_stages(cfg)
    assert all(stage.module._compiled_call_impl is not None for stage in stages)


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_rpc_bf16_sends_activations_and_gradients_in_two_bytes(tmp_path):
    overrides = [
        "model.hidden=64",
        "train.batch_size=16",
        "train.steps=3",
        "train.log_every=1",
        "precision=bf16",
    ]
    train_over_rpc(tmp_path, overrides, timeout_s=180)
    entries = logged(tmp_path)
    # Per step, worker 0 sends 16 samples x 64 activations and worker 1 their gradients, 2 bytes each.
    for entry in entries:
        assert entry["worker0/sent_mib"] * 2**20 == 16 * 64 * 2
        assert entry["worker1/sent_mib"] * 2**20 == 16 * 64 * 2
    assert entries[-1]["train/loss"] < entries[0]["train/loss"] * 1.5


def test_compile_is_refused_under_a_split_backward_schedule():
    cfg = to_train_config(compose_config(["schedule=zb_h1", "train.compile=true"]))
    with pytest.raises(ValueError, match="train.compile: schedule=zb_h1 splits each backward"):
        preflight(cfg, check_data=False)


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_rpc_compiled_stages_train_like_the_unsplit_model(tmp_path):
    overrides = [
        "model.hidden=32",
        "train.batch_size=16",
        "train.steps=3",
        "train.log_every=1",
        "train.compile=true",
    ]
    train_over_rpc(tmp_path, overrides, timeout_s=560)
    reference_losses, reference_state = train_unsplit(to_train_config(compose_config(overrides)))
    losses = [entry["train/loss"] for entry in logged(tmp_path)]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-4, atol=1e-4)
    weights = merged_model_state(tmp_path / "checkpoints" / "step_3")
    for name, value in reference_state.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize(
    "schedule,balance,stages_per_worker", [("zb_h1", [3, 3], 1), ("zb_v", [2, 1, 2, 1], 2)]
)
def test_activation_checkpointing_under_split_backward_is_exact(schedule, balance, stages_per_worker):
    cfg = make_config("mlp", 2, schedule, num_microbatches=4, steps=3)
    cfg.pipeline.balance = balance
    cfg.pipeline.stages_per_worker = stages_per_worker
    cfg.pipeline.activation_checkpointing = "always"
    assert_same_training(*train_pipelined(cfg), *train_unsplit(cfg))
