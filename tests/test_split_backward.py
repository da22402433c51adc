"""A stage's backward in two halves: I (input gradient) then W (weight gradients), equal to one B."""

from __future__ import annotations

import functools
import gc
import logging
import weakref

import pytest
import torch
from conftest import make_config
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipetrain.build import build_dataset, build_stages
from pipetrain.data import BatchOrder
from pipetrain.losses import get_loss
from pipetrain.stage import Stage


def _stages_and_batch(model: str):
    cfg = make_config(model, 3)
    _, stages = build_stages(cfg)
    inputs, targets = BatchOrder(build_dataset(cfg), 8, 0).batch(0)
    return stages, inputs, targets


def _run(stages, inputs, targets, split: bool):
    """One micro-batch through every stage: F, then B (or I on every stage, then W on every stage)."""
    value = inputs
    for stage in stages:
        value = stage.forward(0, value, targets if stage.is_last else None)
    grads, grad = [], None
    for stage in reversed(stages):
        grad = stage.backward_input(0, grad) if split else stage.backward(0, grad)
        grads.append(grad)
        if split:
            assert all(p.grad is None for p in stage.module.parameters())  # I leaves them to W
    if split:
        for stage in stages:
            stage.backward_weight(0)
    return grads, {(s.stage_idx, n): p.grad.clone() for s in stages for n, p in s.module.named_parameters()}


@pytest.mark.parametrize("model", ["mlp", "gpt"])
def test_input_then_weight_gradient_equals_full_backward(model, caplog):
    full = _run(*_stages_and_batch(model), split=False)
    with caplog.at_level(logging.WARNING, logger="pipetrain.stage"):
        split = _run(*_stages_and_batch(model), split=True)
    assert not caplog.records
    for ours, reference in zip(split[0][:-1], full[0][:-1], strict=True):  # stage 0 returns None
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)
    assert split[1].keys() == full[1].keys()
    for name, reference in full[1].items():
        torch.testing.assert_close(split[1][name], reference, rtol=1e-6, atol=1e-7, msg=str(name))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.LayerNorm(64))


def _mlp_stage(stage_idx: int, make_module=_mlp) -> Stage:
    torch.manual_seed(0)
    optimizer = functools.partial(torch.optim.SGD, lr=0.1)
    return Stage(stage_idx, 3, make_module(), torch.device("cpu"), optimizer, get_loss("cross_entropy"), 1.0)


def _addmm_inplace_flops(_, left, right, *__, **___) -> int:
    """``addmm_``'s matrix product (FlopCounterMode counts ``addmm`` but not its in-place form, which ``W``
    uses to accumulate a linear layer's weight gradient)."""
    return 2 * left.shape[0] * left.shape[1] * right.shape[1]


_addmm_inplace_flops._get_raw = True  # called with the tensors, not their shapes


def _flops(fn) -> int:
    with FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_inplace_flops}
    ) as counter:
        fn()
    return counter.get_total_flops()


def test_the_halves_do_the_work_of_one_backward_once():
    """Counted in floating-point operations: I + W == B, and I does the input side only."""
    x, grad = torch.randn(32, 64), torch.randn(32, 64)
    full, split = _mlp_stage(1), _mlp_stage(1)
    full.forward(0, x)
    backward = _flops(lambda: full.backward(0, grad))
    split.forward(0, x)
    input_half = _flops(lambda: split.backward_input(0, grad))
    weight_half = _flops(lambda: split.backward_weight(0))
    assert input_half + weight_half == backward
    assert 0 < input_half < backward and 0 < weight_half < backward
    for p_full, p_split in zip(full.module.parameters(), split.module.parameters(), strict=True):
        torch.testing.assert_close(p_split.grad, p_full.grad)


def test_memory_held_from_input_to_weight_gradient_is_counted():
    x = torch.randn(32, 64)
    grad = torch.randn(32, 64)
    full, split = _mlp_stage(1), _mlp_stage(1)
    for mb in range(2):
        full.forward(mb, x)
        split.forward(mb, x)
    for mb in range(2):
        full.backward(mb, grad)
        split.backward_input(mb, grad)
    held = split._held_bytes
    for mb in range(2):
        split.backward_weight(mb)
    assert split._held_bytes == 0 == full._held_bytes
    full_peak, split_peak = full.step().peak_activation_bytes, split.step().peak_activation_bytes
    # Every junction has a weight rule, so I freed each graph and keeps, per micro-batch, the gradient into
    # each junction (layer norm 32x64, second linear 32x64, first linear 32x128) and what each rule reads:
    # the layer norm's input (32x64) with its mean and 1/std (32x1 each), and the linear layers' inputs
    # (32x128 and 32x64).
    kept_per_microbatch = (2 * 32 * 64 + 32 * 128) * 4 + (32 * 64 + 2 * 32 + 32 * 128 + 32 * 64) * 4
    assert split_peak == held == 2 * kept_per_microbatch
    # The whole graph and the gradients would be more.
    assert 0 < held < full_peak + 2 * (2 * 32 * 64 + 32 * 128) * 4


def test_a_recomputed_micro_batch_keeps_its_graph_from_input_to_weight_gradient():
    """A graph whose saved tensors activation checkpointing recomputes is not read ahead of autograd: I
    keeps it whole for W, and the gradients still equal a full backward's."""
    x, grad = torch.randn(32, 64), torch.randn(32, 64)
    optimizer = functools.partial(torch.optim.SGD, lr=0.1)
    loss = get_loss("cross_entropy")
    recomputed = Stage(1, 3, _mlp(), torch.device("cpu"), optimizer, loss, 1.0, recompute_microbatches=[0])
    torch.manual_seed(0)
    full = _mlp_stage(1)
    recomputed.module.load_state_dict(full.module.state_dict())
    full.forward(0, x)
    full.backward(0, grad)
    recomputed.forward(0, x)
    recomputed.backward_input(0, grad)
    assert recomputed._pending_weight_grads[0].keeps_graph
    recomputed.backward_weight(0)
    for p_full, p_split in zip(full.module.parameters(), recomputed.module.parameters(), strict=True):
        torch.testing.assert_close(p_split.grad, p_full.grad)


class _TwiceApplied(nn.Module):
    """One linear layer used twice: its weight is reached through two junctions of the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.tanh(self.layer(x)))


def test_a_backward_that_cannot_be_split_falls_back_to_b_and_says_so(caplog):
    x, grad = torch.randn(4, 16), torch.randn(4, 16)
    full, split = _mlp_stage(2, _TwiceApplied), _mlp_stage(2, _TwiceApplied)
    full.num_stages = split.num_stages = 4  # not the last stage: it receives a gradient
    full.forward(0, x)
    reference = full.backward(0, grad)
    split.forward(0, x)
    with caplog.at_level(logging.WARNING, logger="pipetrain.stage"):
        ours = split.backward_input(0, grad)
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "stage 2: the backward cannot be split" in m and "'layer.weight' is used at two" in m
        for m in messages
    )
    assert all(p.grad is not None for p in split.module.parameters())  # the full backward ran in I
    split.backward_weight(0)
    torch.testing.assert_close(ours, reference)
    for p_full, p_split in zip(full.module.parameters(), split.module.parameters(), strict=True):
        torch.testing.assert_close(p_split.grad, p_full.grad)


def test_weight_gradient_needs_its_input_gradient_first():
    stage = _mlp_stage(1)
    stage.forward(0, torch.randn(2, 64))
    with pytest.raises(
        RuntimeError, match="stage 1: weight gradient of micro-batch 0 before its input gradient"
    ):
        stage.backward_weight(0)
    stage.backward_input(0, torch.randn(2, 64))
    with pytest.raises(
        RuntimeError, match=r"optimizer step with micro-batches \[0\] still waiting for backward"
    ):
        stage.step()
    stage.backward_weight(0)
    stage.step()


@pytest.mark.parametrize("model", ["mlp", "gpt"])
def test_the_halves_of_a_model_stage_cost_one_backward(model):
    """On the middle stage of the MLP and of the GPT model (attention, layer norm): I + W == B in FLOPs."""
    stages, inputs, _ = _stages_and_batch(model)
    hidden = stages[0].forward(0, inputs)
    middle = stages[1]
    grad = torch.ones_like(middle.forward(0, hidden))
    backward = _flops(lambda: middle.backward(0, grad))
    middle.forward(1, hidden)
    input_half = _flops(lambda: middle.backward_input(1, grad))
    weight_half = _flops(lambda: middle.backward_weight(1))
    assert input_half + weight_half == backward
    assert 0 < input_half < backward


@pytest.mark.parametrize("split", [False, True], ids=["B", "I-then-W"])
@pytest.mark.parametrize("model", ["mlp", "gpt"])
def test_a_finished_backward_frees_the_micro_batchs_graph(model, split):
    """Once a micro-batch's backward is done (B, or I and W), nothing keeps its activations alive.

    I keeps the graph for W (``retain_graph``); W runs only the nodes where parameters hang off the
    activation path, so the other nodes keep what they saved until the graph is dropped. A saved-tensor hook
    that hands back the saved tensor itself makes an output saved by its own node (a ReLU's, GELU's) a
    reference cycle through C++ that Python's collector cannot see: every micro-batch's graph leaked.
    """
    stages, inputs, _ = _stages_and_batch(model)
    hidden = stages[0].forward(0, inputs)
    middle = stages[1]
    outputs = []
    hooks = [
        module.register_forward_hook(lambda _, __, output: outputs.append(weakref.ref(output)))
        for module in middle.module.modules()
    ]
    grad = torch.ones_like(middle.forward(0, hidden))
    for hook in hooks:
        hook.remove()
    assert outputs
    if split:
        middle.backward_input(0, grad)
        middle.backward_weight(0)
    else:
        middle.backward(0, grad)
    gc.collect()
    alive = [ref() for ref in outputs if ref() is not None]
    assert not alive, f"{len(alive)} of {len(outputs)} module outputs outlive the backward"


def test_w_accumulates_a_linear_layers_gradients_in_place_as_b_would():
    """Over several micro-batches, W adds each linear layer's weight gradient into ``.grad`` with one
    ``addmm_`` (no weight-sized gradient of its own first), and the sums equal those of full backwards."""
    xs, grads = torch.randn(3, 16, 64), torch.randn(3, 16, 64)
    full, split = _mlp_stage(1), _mlp_stage(1)
    for mb in range(3):
        full.forward(mb, xs[mb])
        full.backward(mb, grads[mb])
        split.forward(mb, xs[mb])
        split.backward_input(mb, grads[mb])
    split.backward_weight(0)
    with FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_inplace_flops}
    ) as counter:
        split.backward_weight(1)
    products = counter.get_flop_counts()["Global"]
    assert set(products) == {torch.ops.aten.addmm_}, products  # both linear layers, nothing else
    split.backward_weight(2)
    for (name, ours), reference in zip(
        split.module.named_parameters(), full.module.parameters(), strict=True
    ):
        torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-5, atol=1e-6, msg=name)


class _Scaled(nn.Module):
    """A linear layer, a layer norm without bias, a bias-free linear layer on a 3-D input, and (when
    ``scale``) an elementwise scale parameter, which no weight rule covers."""

    def __init__(self, scale: bool) -> None:
        super().__init__()
        self.first = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32, bias=False)
        self.second = nn.Linear(32, 16, bias=False)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 16)) if scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.second(self.norm(self.first(x)))
        return y * self.scale if self.scale is not None else y


@pytest.mark.parametrize("scale", [False, True], ids=["rules-only", "with-a-junction-no-rule-covers"])
def test_w_computes_from_what_i_kept_and_equals_b(scale):
    """With a rule for every junction I frees the graph and W computes from the saved inputs; one
    junction without a rule keeps the whole graph for autograd. Both equal full backwards, summed over
    micro-batches."""
    xs, grads = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 8, 16)
    full, split = (_mlp_stage(1, functools.partial(_Scaled, scale)) for _ in range(2))
    for mb in range(2):
        full.forward(mb, xs[mb])
        reference = full.backward(mb, grads[mb])
        split.forward(mb, xs[mb])
        torch.testing.assert_close(split.backward_input(mb, grads[mb]), reference)
        assert split._pending_weight_grads[mb].keeps_graph == scale
    for mb in range(2):
        split.backward_weight(mb)
    for (name, ours), reference in zip(
        split.module.named_parameters(), full.module.parameters(), strict=True
    ):
        torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("model", ["mlp", "gpt"])
def test_model_stages_free_their_graph_at_the_input_gradient(model):
    """Every junction of the MLP's and the GPT model's middle stages (linear layers with and without bias,
    layer norms) has a weight rule: I frees their graphs and W needs no autograd."""
    stages, inputs, _ = _stages_and_batch(model)
    middle = stages[1]
    grad = torch.ones_like(middle.forward(0, stages[0].forward(0, inputs)))
    middle.backward_input(0, grad)
    pending = middle._pending_weight_grads[0]
    assert pending.junctions and not pending.keeps_graph
    assert all(junction.rule is not None for junction in pending.junctions)
