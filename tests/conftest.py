"""Shared test helpers: small configs built directly from the typed schema (no Hydra)."""

from __future__ import annotations

import pytest

from pipetrain.config import TrainConfig

MODEL_SPECS = {
    "mlp": {
        "_target_": "pipetrain.models.mlp.mlp",
        "in_features": 8,
        "hidden": 32,
        "depth": 4,
        "num_classes": 5,
    },
    "gpt": {
        "_target_": "pipetrain.models.gpt.gpt",
        "vocab_size": 32,
        "seq_len": 8,
        "d_model": 16,
        "num_heads": 2,
        "num_layers": 4,
    },
}
DATA_SPECS = {
    "mlp": {
        "_target_": "pipetrain.data.synthetic_classification",
        "num_samples": 256,
        "in_features": 8,
        "num_classes": 5,
    },
    "gpt": {
        "_target_": "pipetrain.data.synthetic_tokens",
        "num_samples": 256,
        "seq_len": 8,
        "vocab_size": 32,
    },
}
BALANCES = {
    "mlp": {1: [6], 2: [3, 3], 3: [2, 2, 2], 4: [2, 2, 1, 1]},
    "gpt": {1: [7], 2: [3, 4], 3: [2, 3, 2], 4: [2, 2, 2, 1]},
}


def make_config(
    model: str = "mlp",
    num_stages: int = 2,
    schedule: str = "gpipe",
    num_microbatches: int = 4,
    batch_size: int = 16,
    steps: int = 10,
    lr: float = 0.1,
) -> TrainConfig:
    """A small, fast run of ``model`` split into ``num_stages`` balanced stages."""
    cfg = TrainConfig(
        model=dict(MODEL_SPECS[model]),
        data=dict(DATA_SPECS[model]),
        optim={"_target_": "torch.optim.SGD", "_partial_": True, "lr": lr, "momentum": 0.9},
    )
    cfg.pipeline.balance = BALANCES[model][num_stages]
    cfg.pipeline.num_microbatches = num_microbatches
    cfg.schedule.name = schedule
    cfg.train.batch_size = batch_size
    cfg.train.steps = steps
    cfg.train.log_every = 1
    cfg.device = "cpu"
    return cfg


@pytest.fixture
def small_config():
    """Factory for small run configs."""
    return make_config
