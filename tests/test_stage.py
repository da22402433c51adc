"""One stage on its own: per-micro-batch forward/backward, refusals, memory accounting, failure naming."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import make_config
from torch import nn

from pipetrain.build import build_dataset, build_schedule_for, build_stages
from pipetrain.data import BatchOrder
from pipetrain.driver import run_step
from pipetrain.executor import StageFailure
from pipetrain.losses import get_loss
from pipetrain.partition import StageModule
from pipetrain.stage import Stage
from pipetrain.timings import SpanCategory
from pipetrain.transport import local_workers


def make_stage(stage_idx: int = 0, num_stages: int = 2) -> Stage:
    module = StageModule(["layer"], [nn.Linear(4, 4)])
    optimizer = functools.partial(torch.optim.SGD, lr=0.1)
    return Stage(stage_idx, num_stages, module, torch.device("cpu"), optimizer, get_loss("mse"), 0.5)


def test_backward_returns_the_input_gradient_of_a_middle_stage():
    stage = make_stage(stage_idx=1, num_stages=3)
    x = torch.randn(2, 4)
    out = stage.forward(0, x)
    grad_in = stage.backward(0, torch.ones_like(out))
    reference = x.clone().requires_grad_(True)
    stage.module(reference).backward(torch.ones(2, 4))
    torch.testing.assert_close(grad_in, reference.grad)


@pytest.mark.parametrize(
    "calls,message",
    [
        (lambda s: s.backward(0, torch.ones(2, 4)), "backward of micro-batch 0 before its forward"),
        (lambda s: (s.forward(0, torch.ones(2, 4)), s.forward(0, torch.ones(2, 4))), "already run forward"),
        (
            lambda s: (s.forward(0, torch.ones(2, 4)), s.step()),
            r"micro-batches \[0\] still waiting for backward",
        ),
        (lambda s: (s.forward(0, torch.ones(2, 4)), s.backward(0, None)), "needs a gradient"),
    ],
)
def test_out_of_order_use_is_refused(calls, message):
    with pytest.raises(RuntimeError, match=message):
        calls(make_stage())


def test_last_stage_needs_a_target_and_stops_on_nan():
    stage = make_stage(stage_idx=1, num_stages=2)
    with pytest.raises(RuntimeError, match="needs the target"):
        stage.forward(0, torch.ones(2, 4))
    with pytest.raises(FloatingPointError, match="loss of micro-batch 1 is nan"):
        stage.forward(1, torch.full((2, 4), float("nan")), torch.zeros(2, 4))


def test_report_has_compute_spans_and_losses():
    stage = make_stage(stage_idx=1, num_stages=2)
    for mb in range(2):
        stage.forward(mb, torch.randn(2, 4), torch.zeros(2, 4))
    for mb in range(2):
        stage.backward(mb)
    report = stage.step()
    assert [span.name for span in report.spans if span.category == SpanCategory.COMPUTE] == [
        "1F0",
        "1F1",
        "1B0",
        "1B1",
    ]
    assert len(report.losses) == 2 and report.peak_activation_bytes > 0


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_activation_memory_grows_with_m_for_gpipe_only(schedule):
    peaks = []
    for m in (2, 4, 8):
        cfg = make_config("mlp", 2, schedule, num_microbatches=m, batch_size=8 * m)
        _, stages = build_stages(cfg)
        inputs, targets = BatchOrder(build_dataset(cfg), cfg.train.batch_size, 0).batch(0)
        result = run_step(
            local_workers(stages, build_schedule_for(cfg, 2)), build_schedule_for(cfg, 2), inputs, targets, m
        )
        peaks.append(result.reports[0].peak_activation_bytes)
    if schedule == "gpipe":
        assert peaks[0] < peaks[1] < peaks[2]
        assert peaks[2] == 4 * peaks[0]
    else:
        assert peaks[0] == peaks[1] == peaks[2]


def test_saved_activations_are_counted_per_input_layout_and_step():
    """Micro-batches of one layout save as much as the first; another layout is counted on its own, and
    the next step counts again (a module that saves more there is seen)."""

    class SavesMoreEachStep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 4)
            self.extra_squares = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.layer(x)
            for _ in range(self.extra_squares):
                y = y * y  # saves y twice, as either operand
            return y

    def peak(stage: Stage, batch_sizes: list[int]) -> int:
        for mb, size in enumerate(batch_sizes):
            stage.forward(mb, torch.randn(size, 4))
        for mb, size in enumerate(batch_sizes):
            stage.backward(mb, torch.ones(size, 4))
        return stage.step().peak_activation_bytes

    inner = SavesMoreEachStep()
    module = StageModule(["layer"], [inner])
    stage = Stage(
        1, 3, module, torch.device("cpu"), functools.partial(torch.optim.SGD, lr=0.1), get_loss("mse"), 1
    )
    one = peak(stage, [4])
    assert one == 4 * 4 * 4  # the linear layer saves its input (the weight is not counted)
    assert peak(stage, [4, 4, 4]) == 3 * one
    assert peak(stage, [4, 2, 4, 2]) == one + one // 2 + one + one // 2
    inner.extra_squares = 2
    assert peak(stage, [4, 4]) == 2 * (one + 2 * 2 * one)


def test_in_process_failure_names_stage_and_action():
    cfg = make_config("mlp", 2)
    cfg.data["num_classes"] = 20  # targets the 5-class model cannot score
    _, stages = build_stages(cfg)
    inputs, targets = BatchOrder(build_dataset(cfg), cfg.train.batch_size, 0).batch(0)
    failure = (
        r"worker 1 \(in-process\) failed during action 1F\d \(stage 1\): "
        "ValueError: train.loss=cross_entropy: label"
    )
    schedule = build_schedule_for(cfg, 2)
    with pytest.raises(StageFailure, match=failure):
        run_step(local_workers(stages, schedule), schedule, inputs, targets, 4)
