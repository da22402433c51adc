"""The engine: workers that host several stages, one runner for both transports, interleaved 1F1B.

In-process runs go through the same :class:`~pipetrain.runner.WorkerRunner` as the RPC runs; each is
checked against the unsplit model trained in one process.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import sys
import time

import pytest
import torch
from conftest import (
    SMALL_SGD_RUN,
    assert_same_training,
    launch_with_markers,
    make_config,
    signal_inside_phase,
    train_equals_unsplit,
    train_pipelined,
    train_unsplit,
)
from slow_parts import slow_model_overrides

from pipetrain.build import build_dataset, build_schedule_for, build_stages
from pipetrain.checkpoint import merged_model_state
from pipetrain.data import BatchOrder
from pipetrain.driver import run_step
from pipetrain.runner import WorkerRunner
from pipetrain.schedule import Action, ActionKind, Schedule
from pipetrain.topology import Topology
from pipetrain.transport import local_workers

pytestmark = pytest.mark.timeout(120)


def six_stage_config(schedule: str, stages_per_worker: int, num_microbatches: int = 4, steps: int = 4):
    """The MLP (6 units) as 6 one-unit stages."""
    cfg = make_config("mlp", 3, schedule, num_microbatches=num_microbatches, steps=steps)
    cfg.pipeline.balance = [1] * 6
    cfg.pipeline.stages_per_worker = stages_per_worker
    cfg.train.batch_size = 4 * num_microbatches
    return cfg


def test_topology_maps_ranks_workers_and_stages():
    topology = Topology((0, 1, 0, 1))
    assert (topology.num_stages, topology.num_workers, topology.world_size) == (4, 2, 3)
    assert topology.stages_of(0) == (0, 2) and topology.stages_of(1) == (1, 3)
    assert [topology.rank_of(w) for w in range(2)] == [1, 2]
    assert topology.worker_at(2) == 1 and topology.worker_of(3) == 1
    assert topology.label(1) == "worker 1 (rank 2)"
    assert topology.device("cpu", 1) == torch.device("cpu")
    with pytest.raises(ValueError, match="rank 0 runs no worker"):
        topology.worker_at(0)


@pytest.mark.parametrize(
    "schedule,stages_per_worker,num_microbatches",
    [
        ("gpipe", 1, 4),
        ("1f1b", 1, 4),
        ("interleaved_1f1b", 2, 4),
        ("interleaved_1f1b", 2, 6),
        ("interleaved_1f1b", 3, 4),
    ],
    ids=["gpipe-6w", "1f1b-6w", "interleaved-3w-v2", "interleaved-3w-v2-m6", "interleaved-2w-v3"],
)
def test_in_process_training_equals_unsplit(schedule, stages_per_worker, num_microbatches):
    cfg = six_stage_config(schedule, stages_per_worker, num_microbatches)
    assert_same_training(*train_pipelined(cfg), *train_unsplit(cfg))


def test_interleaved_on_two_workers_equals_unsplit():
    cfg = make_config("mlp", 2, "interleaved_1f1b", num_microbatches=4, steps=4)
    cfg.pipeline.balance = [2, 1, 2, 1]
    cfg.pipeline.stages_per_worker = 2
    assert_same_training(*train_pipelined(cfg), *train_unsplit(cfg))


def test_stages_of_one_worker_hand_over_in_process():
    """Two consecutive stages on one worker: outputs pass between them without any fetch."""
    cfg = make_config("mlp", 2, "gpipe", num_microbatches=2, steps=1)
    _, stages = build_stages(cfg)
    forward = [Action(s, ActionKind.FORWARD, mb) for s in (0, 1) for mb in (0, 1)]
    backward = [Action(s, ActionKind.BACKWARD, mb) for s in (1, 0) for mb in (0, 1)]
    schedule = Schedule(actions=(tuple(forward + backward),), placement=(0, 0), num_microbatches=2)
    runner = WorkerRunner(0, {0: stages[0], 1: stages[1]}, schedule)

    def no_fetch(worker: int, step_id: int, action: Action):
        raise AssertionError(f"fetched {action} from worker {worker}")

    runner.connect(no_fetch)
    inputs, targets = BatchOrder(build_dataset(cfg), cfg.train.batch_size, cfg.seed).batch(0)
    micro_inputs, micro_targets = inputs.chunk(2), targets.chunk(2)
    work = [
        (
            a,
            micro_inputs[a.mb_idx] if a.stage_idx == 0 and a.kind is ActionKind.FORWARD else None,
            micro_targets[a.mb_idx] if a.stage_idx == 1 and a.kind is ActionKind.FORWARD else None,
        )
        for a in schedule[0]
    ]
    done = []
    assert runner.run_actions(1, work, done.append).wait() is None
    reports = runner.optimizer_step(1).wait()
    assert [report.stage_idx for report in reports] == [0, 1]
    # Short actions go unreported (the future says they are done); the end of the last one is reported
    # at once, before the optimizer steps.
    assert done == sorted(done) and done[-1] == len(work) and len(done) < len(work)
    reference_losses, reference_weights = train_unsplit(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=1))
    )
    assert sum(reports[1].losses) == pytest.approx(reference_losses[0], rel=1e-5)
    for stage in stages:
        for name, value in stage.module.full_state_dict().items():
            torch.testing.assert_close(value, reference_weights[name], rtol=1e-5, atol=1e-5)


def test_an_output_for_another_worker_waits_for_whichever_of_its_production_and_fetch_comes_second():
    cfg = make_config("mlp", 2, "gpipe", num_microbatches=2, steps=1)
    _, stages = build_stages(cfg)
    runner = WorkerRunner(0, {0: stages[0]}, build_schedule_for(cfg, 2))
    first, second = Action(0, ActionKind.FORWARD, 0), Action(0, ActionKind.FORWARD, 1)

    fetched_early = runner.fetch(1, first)  # the consumer asks before the value exists
    assert not fetched_early.done()
    runner._put_out(1, first, ("value 0", 1.0))
    assert fetched_early.wait() == ("value 0", 1.0)

    runner._put_out(1, second, ("value 1", 2.0))  # the value exists before the consumer asks
    runner._put_out(1, second, "a failure after the hand-over")  # does not replace it
    assert runner.fetch(1, second).wait() == ("value 1", 2.0)
    assert runner._outbox == {}


def test_no_output_for_another_worker_outlives_its_fetch():
    cfg = make_config("mlp", 2, "interleaved_1f1b", num_microbatches=4, steps=3)
    cfg.pipeline.balance = [2, 1, 2, 1]
    cfg.pipeline.stages_per_worker = 2
    plan, stages = build_stages(cfg)
    schedule = build_schedule_for(cfg, plan.num_stages)
    handles = local_workers(stages, schedule)
    order = BatchOrder(build_dataset(cfg), cfg.train.batch_size, cfg.seed)
    for step in range(3):
        run_step(handles, schedule, *order.batch(step), cfg.pipeline.num_microbatches)
    assert [handle.runner._outbox for handle in handles] == [{}, {}]


@pytest.mark.parametrize(
    "first,second",
    [(("1f1b", 1), ("interleaved_1f1b", 2)), (("interleaved_1f1b", 2), ("1f1b", 1))],
    ids=["1f1b-to-interleaved", "interleaved-to-1f1b"],
)
def test_resume_across_placements_is_exact(tmp_path, first, second):
    def config(schedule, stages_per_worker, steps=6):
        cfg = make_config("mlp", 2, schedule, num_microbatches=4, steps=steps)
        cfg.pipeline.balance = [2, 1, 2, 1]
        cfg.pipeline.stages_per_worker = stages_per_worker
        cfg.optim = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.01}
        cfg.checkpoint.every = 3
        return cfg

    full_losses, full_weights = train_pipelined(config(*first), tmp_path / "full")
    resumed = config(*second)
    resumed.checkpoint.resume = str(tmp_path / "full" / "checkpoints" / "step_3")
    losses, _ = train_pipelined(resumed, tmp_path / "resumed", start_step=3)
    assert losses == full_losses[3:]
    final = merged_model_state(tmp_path / "resumed" / "checkpoints" / "step_6")
    for name, value in full_weights.items():
        assert torch.equal(final[name], value), name


INTERLEAVED_RUNS = {
    "2-workers": ["pipeline.balance=[2,1,2,1]"],
    "3-workers": ["pipeline.balance=[1,1,1,1,1,1]", "pipeline.num_microbatches=6", "train.batch_size=24"],
}


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", sorted(INTERLEAVED_RUNS))
def test_rpc_interleaved_training_equals_unsplit(tmp_path, layout):
    overrides = [*SMALL_SGD_RUN, "schedule=interleaved_1f1b", *INTERLEAVED_RUNS[layout]]
    output, logged = train_equals_unsplit(tmp_path, overrides)
    assert "on 2 workers" in output or "on 3 workers" in output
    assert {f"worker{k}/busy_s" for k in range(2)} <= logged[-1].keys()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_a_killed_worker_hosting_two_stages_is_named_with_its_stage_and_action(tmp_path):
    markers = tmp_path / "markers"
    args = [
        sys.executable,
        "-m",
        "pipetrain.train",
        f"run_dir={tmp_path / 'run'}",
        *slow_model_overrides(delay_s=0.2),  # a stage of one unit: its backward lasts 0.2 s
        "optim=sgd",
        "schedule=interleaved_1f1b",
        "pipeline.balance=[2,1,2,1]",
        "train.batch_size=16",
        "train.steps=1000",
        "train.log_every=1000",
    ]
    run = launch_with_markers(args, tmp_path, markers)
    _, killed_at = signal_inside_phase(run, markers, rank=2, phase="backward", signum=signal.SIGKILL)
    result = run.finish(timeout=60)
    assert time.monotonic() - killed_at < 10
    assert result.returncode != 0
    pattern = (
        r"run stopped in step \d+: worker 1 \(rank 2\) failed during action ([13])B\d+ \(stage \1\)"
        ".*lost the connection"
    )
    assert re.search(pattern, result.output), result.output[-3000:]
