"""The driver hands the workers the next step while the current one runs (``train.submit_ahead``).

The workers run the steps in order, so handing a step out early changes no number; it is held back where
something must happen between two steps (a checkpoint, an evaluation, a profile, gradient clipping).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import assert_same_training, make_config, train_unsplit

from pipetrain.build import build_datasets, build_eval_batches, build_schedule_for, build_stages
from pipetrain.checkpoint import merged_model_state
from pipetrain.data import BatchOrder
from pipetrain.driver import Driver, launch_step
from pipetrain.transport import local_workers

pytestmark = pytest.mark.timeout(120)

STEPS = 4


class CountingHandle:
    """A real in-process worker handle that counts the steps handed to it."""

    def __init__(self, handle) -> None:
        self._handle = handle
        self.submitted = 0
        self.changed = threading.Condition()

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def submit(self, work, profile=False, evaluate=False):
        futures = self._handle.submit(work, profile, evaluate)
        with self.changed:
            self.submitted += 1
            self.changed.notify_all()
        return futures

    def wait_for(self, count: int, timeout_s: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.submitted >= count, timeout_s)


def start_gated_run(cfg, run_dir=None, held_step: int = 1):
    """Start training ``cfg`` in-process on a thread, the last stage's first forward of step ``held_step``
    held until the returned gate opens; the run's thread, the gate, the last worker's handle and the
    stages."""
    plan, stages = build_stages(cfg)
    schedule = build_schedule_for(cfg, plan.num_stages)
    train_set, eval_set = build_datasets(cfg)
    handles = [CountingHandle(handle) for handle in local_workers(stages, schedule)]
    gate = threading.Event()
    forwards = {"count": 0}
    forwards_per_step = cfg.pipeline.num_microbatches

    def hold(module, inputs):
        forwards["count"] += 1
        if forwards["count"] == (held_step - 1) * forwards_per_step + 1:
            assert gate.wait(60), "the test never opened the gate"

    stages[-1].module.register_forward_pre_hook(hold)
    driver = Driver(
        cfg,
        handles,
        plan,
        BatchOrder(train_set, cfg.train.batch_size, cfg.seed),
        run_dir,
        print_fn=lambda _: None,
        eval_batches=build_eval_batches(cfg, eval_set),
    )
    outcome: dict = {}

    def train():
        try:
            outcome["losses"] = driver.train()
        except BaseException as error:  # noqa: BLE001 - re-raised by the test
            outcome["error"] = error

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    return thread, gate, handles[-1], stages, outcome


def finish(thread, gate, outcome):
    gate.set()
    thread.join(60)
    assert not thread.is_alive(), "the run did not finish"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["losses"]


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b"])
def test_the_next_step_reaches_the_workers_while_a_step_runs_and_nothing_changes(schedule):
    cfg = make_config("mlp", 4, schedule, num_microbatches=4, steps=STEPS)
    if schedule == "interleaved_1f1b":
        cfg.pipeline.stages_per_worker = 2
    thread, gate, last_worker, stages, outcome = start_gated_run(cfg)
    # Step 1 cannot end while its last stage is held, yet step 2 is handed out.
    handed_ahead = last_worker.wait_for(2, timeout_s=30)
    losses = finish(thread, gate, outcome)
    assert handed_ahead, "step 2 was not handed to the workers before step 1 was done"
    state = {name: value for stage in stages for name, value in stage.module.full_state_dict().items()}
    assert_same_training(losses, state, *train_unsplit(cfg))


def test_without_submit_ahead_the_driver_waits_for_each_step():
    cfg = make_config("mlp", 2, "1f1b", num_microbatches=4, steps=STEPS)
    cfg.train.submit_ahead = False
    thread, gate, last_worker, _, outcome = start_gated_run(cfg)
    handed_ahead = last_worker.wait_for(2, timeout_s=1.0)
    finish(thread, gate, outcome)
    assert not handed_ahead


def test_a_checkpoint_holds_the_weights_of_its_own_step(tmp_path):
    """The step after a checkpoint's waits for the save: the checkpoint of step 2 is step 2's weights."""
    cfg = make_config("mlp", 2, "1f1b", num_microbatches=4, steps=STEPS)
    cfg.checkpoint.every = 2
    cfg.checkpoint.at_end = False
    thread, gate, last_worker, _, outcome = start_gated_run(cfg, tmp_path, held_step=2)
    # Step 2 is held: step 3 must not be handed out before step 2 is back and saved.
    handed_ahead = last_worker.wait_for(3, timeout_s=1.0)
    finish(thread, gate, outcome)
    assert not handed_ahead, "step 3 was handed out before step 2's checkpoint was saved"
    cfg.train.steps = 2
    _, reference = train_unsplit(cfg)
    saved = merged_model_state(tmp_path / "checkpoints" / "step_2")
    assert saved.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(saved[name], value, rtol=1e-5, atol=1e-5)


def test_the_window_of_a_step_handed_out_ahead_starts_after_the_previous_one_ends():
    """The last worker begins step 2 while step 1's first stage still drains: step 2's window starts only
    when step 1's last action has ended, so no idle time is counted in both steps."""
    cfg = make_config("mlp", 2, "1f1b", num_microbatches=4, steps=2)
    plan, stages = build_stages(cfg)
    schedule = build_schedule_for(cfg, plan.num_stages)
    # A slow first stage backward: the drain outlasts the last stage's share of the step.
    stages[0].module.register_full_backward_pre_hook(lambda module, grad_output: time.sleep(0.05))
    handles = local_workers(stages, schedule)
    batches = BatchOrder(build_datasets(cfg)[0], cfg.train.batch_size, cfg.seed)
    first = launch_step(handles, schedule, *batches.batch(0), cfg.pipeline.num_microbatches, timeout_s=30)
    second = launch_step(handles, schedule, *batches.batch(1), cfg.pipeline.num_microbatches, timeout_s=30)
    step1 = first.finish()
    step2 = second.finish(not_before=step1.actions_ended_at)
    last_worker_began = min(report.started_at for report in step2.reports)
    assert last_worker_began < step1.actions_ended_at - 0.02  # the overlap is there
    assert step2.actions_ended_at - step2.window_s == pytest.approx(step1.actions_ended_at, abs=1e-6)
    assert step2.window_s > 0
