"""Data-parallel replicas of the pipeline, in-process: the same training as the unsplit model on the whole
batch, for every schedule; the topology's rank mapping; the checks before launch; the logged figures.

The real multi-process runs (gloo process groups, torchrun, two nodes) are in ``test_replicas_rpc.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_same_training, make_config, train_pipelined, train_unsplit
from torch import nn

from pipetrain.preflight import check_settings
from pipetrain.schedule import build_schedule
from pipetrain.topology import Topology

# (schedule, stages_per_worker, balance): every schedule pipetrain has, two workers per replica.
SCHEDULES = {
    "gpipe": (1, [3, 3]),
    "1f1b": (1, [3, 3]),
    "interleaved_1f1b": (2, [2, 1, 2, 1]),
    "zb_h1": (1, [3, 3]),
    "zb_v": (2, [2, 1, 2, 1]),
}


def replicated_config(schedule: str, replicas: int = 2, model: str = "mlp", steps: int = 6):
    cfg = make_config(model, 2, schedule, num_microbatches=4, batch_size=32, steps=steps)
    cfg.pipeline.stages_per_worker, cfg.pipeline.balance = SCHEDULES[schedule]
    if model == "gpt":
        cfg.pipeline.balance = [2, 2, 2, 1] if cfg.pipeline.stages_per_worker == 2 else [3, 4]
    cfg.pipeline.replicas = replicas
    return cfg


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("model", ["mlp", "gpt"])
def test_two_replicas_train_like_the_unsplit_model_on_the_whole_batch(schedule, model):
    cfg = replicated_config(schedule, model=model)
    states: list[dict] = []
    losses, state = train_pipelined(cfg, replica_states=states)
    assert_same_training(losses, state, *train_unsplit(cfg))
    for name, value in states[0].items():  # the replicas hold the very same weights
        assert torch.equal(states[1][name], value), name


def test_replicas_with_global_gradient_clipping_equal_the_unsplit_model():
    cfg = replicated_config("1f1b", replicas=3)
    cfg.train.batch_size = 48
    cfg.train.clip_grad_norm = 0.12
    record: dict[str, list[float]] = {}
    reference = train_unsplit(cfg, record)
    assert max(record["grad_norm"]) > 0.12, "the test must clip"
    assert_same_training(*train_pipelined(cfg), *reference)


def batchnorm_mlp() -> nn.Module:
    """A small classifier with a BatchNorm layer (units ``0`` .. ``3``)."""
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))


def test_replicas_average_batchnorm_statistics_so_they_stay_identical():
    cfg = replicated_config("1f1b", steps=3)
    cfg.model = {"_target_": "test_replicas.batchnorm_mlp"}
    cfg.pipeline.balance = [2, 2]
    states: list[dict] = []
    train_pipelined(cfg, replica_states=states)
    assert not torch.equal(states[0]["1.running_mean"], torch.zeros(16)), "statistics must have moved"
    for name, value in states[0].items():
        assert torch.equal(states[1][name], value), name


def test_topology_maps_ranks_to_replicas_and_workers():
    topology = Topology.of(build_schedule("interleaved_1f1b", 4, 4, 2), num_replicas=3)
    assert (topology.num_workers, topology.world_size) == (2, 7)
    assert [topology.rank_of(w, r) for r in range(3) for w in range(2)] == [1, 2, 3, 4, 5, 6]
    assert [(topology.replica_at(rank), topology.worker_at(rank)) for rank in range(1, 7)] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 1),
    ]
    assert topology.replica_ranks(1) == (2, 4, 6)
    assert topology.label(0, 2) == "replica 2 worker 0 (rank 5)"
    assert Topology.of(build_schedule("gpipe", 2, 4)).label(1) == "worker 1 (rank 2)"
    with pytest.raises(ValueError, match="replica 3 does not exist"):
        topology.rank_of(0, 3)


@pytest.mark.parametrize(
    "replicas,batch_size,message",
    [
        (0, 16, r"pipeline.replicas: 0 must be an integer >= 1"),
        (
            3,
            16,
            r"train.batch_size: 16 does not split into pipeline.replicas=3 x pipeline.num_microbatches=4",
        ),
    ],
)
def test_bad_replica_settings_are_refused_before_launch(replicas, batch_size, message):
    cfg = make_config("mlp", 2, "1f1b", num_microbatches=4, batch_size=batch_size)
    cfg.pipeline.replicas = replicas
    with pytest.raises(ValueError, match=message):
        check_settings(cfg)


def test_each_replica_logs_its_workers_and_the_gradient_average(tmp_path):
    cfg = replicated_config("1f1b", steps=2)
    train_pipelined(cfg, run_dir=tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 2
    for replica in (0, 1):
        for worker in (0, 1):
            assert logged[-1][f"replica{replica}/worker{worker}/busy_s"] > 0
            assert f"replica{replica}/worker{worker}/idle_s" in logged[-1]
    for worker in (0, 1):
        total, exposed = (
            logged[-1][f"worker{worker}/allreduce_s"],
            logged[-1][f"worker{worker}/allreduce_exposed_s"],
        )
        assert 0 <= exposed <= total
    # One replica's figures are the plain worker tags; no replica tags then.
    single = make_config("mlp", 2, "1f1b", steps=1)
    train_pipelined(single, run_dir=tmp_path / "single")
    keys = json.loads((tmp_path / "single" / "metrics.jsonl").read_text())
    assert not [key for key in keys if key.startswith("replica") or "allreduce" in key]


@pytest.mark.parametrize("resumed_replicas", [2, 1, 4])
def test_a_replicated_checkpoint_resumes_under_any_replica_count(tmp_path, resumed_replicas):
    """Saved by 2 replicas at step 3, resumed under another schedule and split: by 2 replicas (bit for
    bit), by 1 or by 4 (to 1e-5: the mean over the batch is summed in another order)."""
    cfg = replicated_config("1f1b", steps=6)
    cfg.checkpoint.every = 3
    full, _ = train_pipelined(cfg, run_dir=tmp_path / "full")
    resumed_cfg = replicated_config("gpipe", replicas=resumed_replicas, steps=6)
    resumed_cfg.pipeline.balance = [2, 4]
    resumed_cfg.checkpoint.resume = str(tmp_path / "full" / "checkpoints" / "step_3")
    resumed, _ = train_pipelined(resumed_cfg, run_dir=tmp_path / "resumed", start_step=3)
    if resumed_replicas == 2:  # another schedule and split, the same arithmetic: exact
        assert resumed == full[3:]
    else:
        torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[3:]), rtol=1e-5, atol=1e-5)
