"""Deferred batch norm: BatchNorm's outputs per micro-batch, running statistics of the whole batch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import make_config, train_pipelined, train_unsplit
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision import models as tvm

from pipetrain.batchnorm import DeferredBatchNorm, commit_deferred_batchnorm, convert_deferred_batchnorm
from pipetrain.build import (
    _commit_batchnorm_on_step,
    build_dataset,
    build_model,
)
from pipetrain.data import BatchOrder
from pipetrain.driver import split_microbatches
from pipetrain.losses import get_loss
from pipetrain.models.resnet import resnet18
from pipetrain.preflight import preflight
from pipetrain.targets import call_target

BATCHNORMS = {
    "1d": (lambda: nn.BatchNorm1d(3), (16, 3)),
    "1d_sequence": (lambda: nn.BatchNorm1d(3), (16, 3, 5)),
    "2d": (lambda: nn.BatchNorm2d(3), (16, 3, 4, 4)),
    "3d": (lambda: nn.BatchNorm3d(3), (16, 3, 2, 3, 3)),
}


def _with_random_state(batchnorm: nn.Module) -> nn.Module:
    """``batchnorm`` with non-default weights and running statistics, as after some training."""
    with torch.no_grad():
        batchnorm.weight.uniform_(0.5, 1.5)
        batchnorm.bias.uniform_(-0.5, 0.5)
        batchnorm.running_mean.uniform_(-1.0, 1.0)
        batchnorm.running_var.uniform_(0.5, 2.0)
        batchnorm.num_batches_tracked.fill_(7)
    return batchnorm


def _pair(kind: str, momentum: float | None = 0.1) -> tuple[nn.Module, DeferredBatchNorm, tuple[int, ...]]:
    """A BatchNorm and a DeferredBatchNorm converted from an identical copy, and an input shape."""
    factory, shape = BATCHNORMS[kind]
    torch.manual_seed(0)
    batchnorm = _with_random_state(factory())
    batchnorm.momentum = momentum
    twin = factory()
    twin.load_state_dict(batchnorm.state_dict())
    twin.momentum = momentum
    deferred = convert_deferred_batchnorm(twin)
    assert isinstance(deferred, DeferredBatchNorm)
    return batchnorm, deferred, shape


def _small_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        _with_random_state(nn.BatchNorm2d(4)),
        nn.ReLU(),
        nn.Flatten(1),
        nn.Linear(4 * 4 * 4, 6),
        _with_random_state(nn.BatchNorm1d(6)),
    )


# ------------------------------------------------------------------------------------------------- the module


def test_conversion_keeps_state_dict_keys_values_and_tensors():
    model = _small_model()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    weight = model[1].weight
    converted = convert_deferred_batchnorm(model)
    assert converted is model
    assert isinstance(model[1], DeferredBatchNorm) and isinstance(model[5], DeferredBatchNorm)
    assert model[1].weight is weight, "the replaced module's parameters are kept, not copied"
    after = model.state_dict()
    assert list(after) == list(before)
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0)


def test_converted_resnet_loads_torchvision_state_dicts_both_ways():
    converted = convert_deferred_batchnorm(resnet18(num_classes=10))
    assert any(isinstance(module, DeferredBatchNorm) for module in converted.modules())
    assert not any(type(module) is nn.BatchNorm2d for module in converted.modules())
    converted.load_state_dict(tvm.resnet18(weights=None, num_classes=10).state_dict())
    tvm.resnet18(weights=None, num_classes=10).load_state_dict(converted.state_dict())


def test_conversion_leaves_subclasses_and_untracked_batchnorms_alone():
    model = nn.Sequential(nn.SyncBatchNorm(3), nn.BatchNorm2d(3, track_running_stats=False))
    convert_deferred_batchnorm(model)
    assert type(model[0]) is nn.SyncBatchNorm and type(model[1]) is nn.BatchNorm2d


@pytest.mark.parametrize("kind", sorted(BATCHNORMS))
def test_training_output_and_gradients_equal_batchnorm(kind):
    batchnorm, deferred, shape = _pair(kind)
    inputs = torch.randn(shape) * 3 + 1
    x_plain = inputs.clone().requires_grad_(True)
    x_deferred = inputs.clone().requires_grad_(True)
    out_plain, out_deferred = batchnorm(x_plain), deferred(x_deferred)
    torch.testing.assert_close(out_deferred, out_plain)
    grad = torch.randn_like(out_plain)
    out_plain.backward(grad)
    out_deferred.backward(grad)
    torch.testing.assert_close(x_deferred.grad, x_plain.grad)
    torch.testing.assert_close(deferred.weight.grad, batchnorm.weight.grad)
    torch.testing.assert_close(deferred.bias.grad, batchnorm.bias.grad)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kind", sorted(BATCHNORMS))
def test_commit_after_microbatches_equals_batchnorm_on_the_whole_batch(kind, momentum):
    batchnorm, deferred, shape = _pair(kind, momentum)
    tracked = int(batchnorm.num_batches_tracked)
    for step in range(2):
        batch = torch.randn(shape) * (step + 2) + step
        batchnorm(batch)
        for micro_batch in batch.chunk(4):
            deferred(micro_batch)
        torch.testing.assert_close(deferred.num_batches_tracked, torch.tensor(tracked + step))
        assert deferred.pending_count == batch.numel() // batch.shape[1]
        deferred.commit()
        assert deferred.pending_count == 0
        torch.testing.assert_close(deferred.running_mean, batchnorm.running_mean)
        torch.testing.assert_close(deferred.running_var, batchnorm.running_var)
        torch.testing.assert_close(deferred.num_batches_tracked, batchnorm.num_batches_tracked)
    assert int(deferred.num_batches_tracked) == tracked + 2


@pytest.mark.parametrize("kind", sorted(BATCHNORMS))
def test_eval_mode_equals_batchnorm_and_gathers_nothing(kind):
    batchnorm, deferred, shape = _pair(kind)
    batchnorm.eval()
    deferred.eval()
    inputs = torch.randn(shape)
    torch.testing.assert_close(deferred(inputs), batchnorm(inputs), rtol=0, atol=0)
    before = {name: value.clone() for name, value in deferred.state_dict().items()}
    deferred.commit()
    assert deferred.pending_count == 0
    for name, value in deferred.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_wrong_input_rank_is_refused_like_batchnorm():
    _, deferred, _ = _pair("2d")
    with pytest.raises(ValueError, match="expected 4D input"):
        deferred(torch.randn(4, 3))


def test_recomputed_forward_is_gathered_once():
    """Activation checkpointing runs the forward again during backward; it must not count twice."""
    _, deferred, shape = _pair("2d")
    inputs = torch.randn(shape, requires_grad=True)
    checkpoint(deferred, inputs, use_reentrant=False).sum().backward()
    assert deferred.pending_count == inputs.numel() // inputs.shape[1]


def test_commit_deferred_batchnorm_commits_every_layer_once():
    model = convert_deferred_batchnorm(_small_model())
    model(torch.randn(8, 3, 6, 6))
    commit_deferred_batchnorm(model)
    assert int(model[1].num_batches_tracked) == 8 and int(model[5].num_batches_tracked) == 8
    assert model[1].pending_count == 0 and model[5].pending_count == 0


def test_a_stage_without_an_optimizer_commits_after_its_step():
    model = convert_deferred_batchnorm(_small_model())
    stage = SimpleNamespace(module=model, optimizer=None, step=lambda: "report")
    _commit_batchnorm_on_step(stage)
    model(torch.randn(8, 3, 6, 6))
    assert stage.step() == "report"
    assert int(model[1].num_batches_tracked) == 8 and model[1].pending_count == 0


# ---------------------------------------------------------------------------------------------- in a pipeline


def _resnet_config(schedule: str = "gpipe", steps: int = 3, deferred: bool = True):
    """ResNet-18 on 3x16x16 images in 2 stages, batch 8 in 2 micro-batches, SGD with momentum."""
    cfg = make_config("mlp", 2, schedule, num_microbatches=2, batch_size=8, steps=steps, lr=0.05)
    cfg.model = {"_target_": "pipetrain.models.resnet.resnet18", "num_classes": 10}
    cfg.data = {
        "_target_": "pipetrain.data.synthetic_images",
        "num_samples": 64,
        "image_size": 16,
        "num_classes": 10,
    }
    cfg.pipeline.balance = [5, 6]
    cfg.pipeline.deferred_batchnorm = deferred
    return cfg


def _train_accumulated(cfg):
    """The reference in one process: the same model, gradients accumulated over the same micro-batches."""
    model = build_model(cfg)
    optimizer = call_target(cfg.optim, "optim")(model.parameters())
    loss_fn = get_loss(cfg.train.loss)
    batches = BatchOrder(build_dataset(cfg), cfg.train.batch_size, cfg.seed)
    scale = 1.0 / cfg.pipeline.num_microbatches
    losses = []
    for step in range(cfg.train.steps):
        inputs, targets = batches.batch(step)
        optimizer.zero_grad()
        loss = 0.0
        micro_inputs, micro_targets = split_microbatches(inputs, targets, cfg.pipeline.num_microbatches)
        for micro_input, micro_target in zip(micro_inputs, micro_targets, strict=True):
            micro_loss = loss_fn(model(micro_input), micro_target) * scale
            micro_loss.backward()
            loss += micro_loss.item()
        optimizer.step()
        commit_deferred_batchnorm(model)
        losses.append(loss)
    return losses, model.state_dict()


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipelined_resnet_with_deferred_batchnorm_equals_accumulated_reference(schedule):
    cfg = _resnet_config(schedule)
    reference_losses, reference_state = _train_accumulated(cfg)
    losses, state = train_pipelined(cfg)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-5, atol=1e-5)
    assert state.keys() == reference_state.keys()
    for name, value in reference_state.items():
        torch.testing.assert_close(
            state[name], value, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert int(state["bn1.num_batches_tracked"]) == cfg.train.steps


def _first_batchnorm_after_one_step(deferred: bool) -> tuple[dict, dict]:
    """``bn1``'s buffers after one pipelined step, and after one step of the unsplit, unconverted model."""
    cfg = _resnet_config(steps=1, deferred=deferred)
    _, state = train_pipelined(cfg)
    cfg.pipeline.deferred_batchnorm = False
    _, whole_batch = train_unsplit(cfg)
    names = ("bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked")
    return {n: state[n] for n in names}, {n: whole_batch[n] for n in names}


def test_deferred_batchnorm_running_statistics_are_the_whole_batchs():
    pipelined, whole_batch = _first_batchnorm_after_one_step(deferred=True)
    for name, value in whole_batch.items():
        torch.testing.assert_close(
            pipelined[name], value, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_plain_batchnorm_running_statistics_are_per_microbatch():
    pipelined, whole_batch = _first_batchnorm_after_one_step(deferred=False)
    assert int(pipelined["bn1.num_batches_tracked"]) == 2
    assert not torch.allclose(pipelined["bn1.running_var"], whole_batch["bn1.running_var"], rtol=1e-3)


# -------------------------------------------------------------------------------------------------- preflight


def test_preflight_refuses_a_microbatch_of_one_sample_with_batchnorm():
    cfg = _resnet_config(deferred=False)
    cfg.train.batch_size = 2
    with pytest.raises(
        ValueError, match=r"pipeline\.num_microbatches.*train\.batch_size=2.*1 sample.*BatchNorm"
    ):
        preflight(cfg, check_data=False)


def test_preflight_accepts_a_microbatch_of_one_sample_without_batchnorm():
    cfg = make_config("mlp", 2, num_microbatches=4, batch_size=4)
    preflight(cfg, check_data=False)


def test_preflight_accepts_batchnorm_with_two_samples_per_microbatch():
    cfg = _resnet_config()
    cfg.train.batch_size = 4
    preflight(cfg)
