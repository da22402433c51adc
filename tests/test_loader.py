"""The driver's data loading: the same batches as before, in loader processes, timed as part of the step."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_config, train_pipelined

from pipetrain.build import build_dataset
from pipetrain.config import LoaderConfig
from pipetrain.data import BatchOrder
from pipetrain.loader import DataError, step_batches

pytestmark = pytest.mark.timeout(120)

DELAY_S = 0.004
BATCH = 16


def slow_config(steps: int = 4, num_workers: int = 0, broken: int = -1):
    cfg = make_config("mlp", 2, steps=steps, batch_size=BATCH)
    cfg.data = {
        "_target_": "data_parts.slow_dataset",
        "num_samples": 128,
        "in_features": 8,
        "num_classes": 5,
        "delay_s": DELAY_S,
        "broken": broken,
    }
    cfg.loader = LoaderConfig(num_workers=num_workers, prefetch_factor=2)
    return cfg


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_gives_the_batch_order_of_every_step(num_workers):
    cfg = slow_config(num_workers=num_workers)
    batches = BatchOrder(build_dataset(cfg), BATCH, seed=3)
    loaded = list(step_batches(batches, 2, 9, LoaderConfig(num_workers=num_workers)))
    assert len(loaded) == 7
    for step, (inputs, targets) in enumerate(loaded, start=2):
        expected_inputs, expected_targets = batches.batch(step)
        assert torch.equal(inputs, expected_inputs) and torch.equal(targets, expected_targets)


def test_throughput_counts_the_time_spent_loading(tmp_path):
    """A dataset that needs ``DELAY_S`` per sample cannot be trained faster than it is read."""
    train_pipelined(slow_config(num_workers=0), tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    load_s = BATCH * DELAY_S
    for entry in logged:
        assert entry["perf/step_time_s"] >= entry["perf/data_time_s"], entry
    # Each step's batch is taken within some step's time: its own, or (handed out ahead) the one before.
    assert sum(entry["perf/data_time_s"] for entry in logged) >= 0.9 * load_s * len(logged)
    total_time = sum(entry["perf/step_time_s"] for entry in logged)
    assert BATCH * len(logged) / total_time <= BATCH / load_s


def test_a_broken_sample_is_named_with_its_step(tmp_path):
    cfg = slow_config(num_workers=2, broken=40)
    order = BatchOrder(build_dataset(cfg), BATCH, cfg.seed)
    step = next(s for s in range(8) if 40 in order.indices(s).tolist())
    with pytest.raises(DataError) as raised:
        train_pipelined(cfg, tmp_path)
    failure = raised.value
    assert failure.step == step + 1
    assert failure.summary == (
        f"data: sample 40 (batch of step {step + 1}) failed to load: ValueError: cannot decode record 40"
    )
    assert "data_parts.py" in failure.details
