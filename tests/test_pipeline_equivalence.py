"""In-process pipelined training equals the unsplit model trained in one process (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config

from pipetrain.build import build_dataset, build_model, build_schedule_for, build_stages
from pipetrain.data import BatchOrder
from pipetrain.driver import Driver
from pipetrain.losses import get_loss
from pipetrain.targets import call_target
from pipetrain.transport import LocalStageHandle


def train_unsplit(cfg):
    """The reference: the whole model, one process, one backward per batch."""
    model = build_model(cfg)
    optimizer = call_target(cfg.optim, "optim")(model.parameters())
    loss_fn = get_loss(cfg.train.loss)
    batches = BatchOrder(build_dataset(cfg), cfg.train.batch_size, cfg.seed)
    losses = []
    for step in range(cfg.train.steps):
        inputs, targets = batches.batch(step)
        loss = loss_fn(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, model.state_dict()


def train_pipelined(cfg):
    stages = build_stages(cfg)
    handles = [LocalStageHandle(stage) for stage in stages]
    schedule = build_schedule_for(cfg, len(stages))
    batches = BatchOrder(build_dataset(cfg), cfg.train.batch_size, cfg.seed)
    losses = Driver(cfg, handles, schedule, batches, print_fn=lambda line: None).train()
    weights = {}
    for stage in stages:
        weights.update(stage.module.full_state_dict())
    return losses, weights


@pytest.mark.parametrize("model", ["mlp", "gpt"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("num_stages", [1, 2, 3, 4])
def test_pipelined_training_equals_unsplit(model, schedule, num_stages):
    cfg = make_config(model, num_stages, schedule, num_microbatches=4, steps=10)
    reference_losses, reference_weights = train_unsplit(cfg)
    losses, weights = train_pipelined(cfg)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-5, atol=1e-5)
    assert weights.keys() == reference_weights.keys()
    for name, value in reference_weights.items():
        torch.testing.assert_close(
            weights[name], value, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert losses[-1] < losses[0], "training should make progress on the synthetic task"


def test_logged_run_writes_scalars(tmp_path):
    cfg = make_config("mlp", 2, "1f1b", steps=3)
    stages = build_stages(cfg)
    batches = BatchOrder(build_dataset(cfg), cfg.train.batch_size, cfg.seed)
    lines = []
    Driver(
        cfg,
        [LocalStageHandle(s) for s in stages],
        build_schedule_for(cfg, 2),
        batches,
        tmp_path,
        print_fn=lines.append,
    ).train()
    assert len(lines) == 3 and "bubble" in lines[-1]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3
    assert list((tmp_path / "tb").iterdir())
    assert list((tmp_path / "traces").iterdir())
