"""In-process pipelined training equals the unsplit model trained in one process (fp32, 1e-5)."""

from __future__ import annotations

import pytest
from conftest import assert_same_training, make_config, train_pipelined, train_unsplit

from pipetrain.build import build_dataset, build_schedule_for, build_stages
from pipetrain.compose import compose_config
from pipetrain.data import BatchOrder
from pipetrain.driver import Driver
from pipetrain.transport import local_workers


@pytest.mark.parametrize("model", ["mlp", "gpt"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("num_stages", [1, 2, 3, 4])
def test_pipelined_training_equals_unsplit(model, schedule, num_stages):
    cfg = make_config(model, num_stages, schedule, num_microbatches=4, steps=10)
    losses, weights = train_pipelined(cfg)
    assert_same_training(losses, weights, *train_unsplit(cfg))
    assert losses[-1] < losses[0], "training should make progress on the synthetic task"


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipelined_training_with_the_default_optimizer_equals_unsplit(schedule):
    """The shipped ``optim=adamw`` (fused AdamW) keeps the equivalence."""
    cfg = make_config("mlp", 2, schedule, num_microbatches=4, steps=10)
    cfg.optim = dict(compose_config(["optim=adamw"]).optim)
    assert cfg.optim["fused"] is True
    assert_same_training(*train_pipelined(cfg), *train_unsplit(cfg))


def test_logged_run_writes_scalars(tmp_path):
    cfg = make_config("mlp", 2, "1f1b", steps=3)
    plan, stages = build_stages(cfg)
    batches = BatchOrder(build_dataset(cfg), cfg.train.batch_size, cfg.seed)
    lines = []
    Driver(
        cfg,
        local_workers(stages, build_schedule_for(cfg, plan.num_stages)),
        plan,
        batches,
        tmp_path,
        print_fn=lines.append,
    ).train()
    assert len(lines) == 3 and "bubble" in lines[-1]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3
    assert list((tmp_path / "tb").iterdir())
    assert list((tmp_path / "traces").iterdir())
