"""Zero-bubble schedules train exactly like the unsplit model, in-process and over RPC."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import (
    assert_same_training,
    make_config,
    train_equals_unsplit,
    train_pipelined,
    train_unsplit,
)

from pipetrain.compose import compose_config, to_train_config

pytestmark = pytest.mark.timeout(120)

# (model, schedule, workers) -> pipeline.balance: zb_v puts two stages on each worker.
RUNS = {
    ("mlp", "zb_h1", 2): [3, 3],
    ("mlp", "zb_h1", 3): [2, 2, 2],
    ("mlp", "zb_v", 2): [2, 1, 2, 1],
    ("mlp", "zb_v", 3): [1, 1, 1, 1, 1, 1],
    ("gpt", "zb_h1", 2): [3, 4],
    ("gpt", "zb_h1", 3): [2, 3, 2],
    ("gpt", "zb_v", 2): [2, 2, 2, 1],
    ("gpt", "zb_v", 3): [2, 1, 1, 1, 1, 1],
}


@pytest.mark.parametrize("key", list(RUNS), ids=lambda k: f"{k[0]}-{k[1]}-{k[2]}w")
def test_in_process_training_equals_unsplit(key, caplog):
    model, schedule, _ = key
    cfg = make_config(model, 2, schedule, num_microbatches=4, steps=3)
    cfg.pipeline.balance = RUNS[key]
    cfg.pipeline.stages_per_worker = 2 if schedule == "zb_v" else 1
    with caplog.at_level(logging.WARNING, logger="pipetrain.stage"):
        assert_same_training(*train_pipelined(cfg), *train_unsplit(cfg))
    assert not [r for r in caplog.records if "cannot be split" in r.getMessage()]  # every stage split


def test_zb_h1_holds_no_more_than_1f1b_on_its_first_stage(tmp_path):
    """1F1B's peak is its first stage's S micro-batches; ZB-H1's first stage holds the same (its I keeps
    nothing: there is no input gradient to compute, W runs the whole backward)."""
    peaks = {}
    for schedule in ("1f1b", "zb_h1"):
        cfg = make_config("gpt", 3, schedule, num_microbatches=6, steps=1, batch_size=24)
        train_pipelined(cfg, run_dir=tmp_path / schedule)
        logged = json.loads((tmp_path / schedule / "metrics.jsonl").read_text().splitlines()[-1])
        peaks[schedule] = [logged[f"worker{k}/peak_activation_mib"] for k in range(3)]
        busy = [logged[f"worker{k}/busy_{kind}_s"] for k in range(3) for kind in "fbiw"]
        assert sum(busy) == pytest.approx(sum(logged[f"worker{k}/busy_s"] for k in range(3)))
    assert peaks["zb_h1"][0] == peaks["1f1b"][0] > 0
    assert (
        logged["worker1/busy_i_s"] > 0 and logged["worker1/busy_w_s"] > 0 and logged["worker1/busy_b_s"] == 0
    )


RPC_RUNS = {
    "zb_h1-mlp-2w": ["schedule=zb_h1", "pipeline.balance=[3,3]"],
    "zb_v-gpt-3w": [
        "experiment=gpt",
        "schedule=zb_v",
        "pipeline.stages=null",
        "pipeline.balance=[2,1,1,1,1,1]",
        "model.d_model=16",
        "model.num_heads=2",
        "model.num_layers=4",
        "model.seq_len=8",
        "model.vocab_size=32",
        "data.seq_len=8",
        "data.vocab_size=32",
        "data.num_samples=256",
    ],
}


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("run", sorted(RPC_RUNS))
def test_rpc_zero_bubble_training_equals_unsplit(tmp_path, run):
    overrides = [
        "train.batch_size=16",
        "train.steps=4",
        "train.log_every=1",
        "optim=sgd",
        "optim.lr=0.1",
        "optim.momentum=0.9",
        "pipeline.num_microbatches=4",
        *RPC_RUNS[run],
    ]
    output, logged = train_equals_unsplit(tmp_path, overrides)
    num_workers = 2 if run.startswith("zb_h1") else 3
    for k in range(num_workers):  # the split backward's halves ran on every worker
        assert logged[-1][f"worker{k}/busy_w_s"] > 0
        assert logged[-1][f"worker{k}/busy_b_s"] == 0
    assert "cannot be split" not in output


def test_config_groups_and_checks_before_launch():
    from pipetrain.preflight import preflight

    v = to_train_config(compose_config(["schedule=zb_v", "pipeline.balance=[2,1,2,1]"]))
    assert (v.schedule.name, v.pipeline.stages_per_worker) == ("zb_v", 2)
    preflight(v, check_data=False)
    h1 = to_train_config(compose_config(["schedule=zb_h1"]))
    assert (h1.schedule.name, h1.pipeline.stages_per_worker) == ("zb_h1", 1)
    preflight(h1, check_data=False)
    bad = to_train_config(compose_config(["schedule=zb_v", "pipeline.stages_per_worker=1"]))
    with pytest.raises(
        ValueError, match=r"schedule=zb_v hosts exactly two stages.*pipeline.stages_per_worker=2"
    ):
        preflight(bad, check_data=False)
    odd = to_train_config(compose_config(["schedule=zb_v", "pipeline.balance=[2,2,2]"]))
    with pytest.raises(ValueError, match=r"pipeline.stages_per_worker=2 does not divide the 3 stages"):
        preflight(odd, check_data=False)
