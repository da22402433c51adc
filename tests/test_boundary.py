"""Nested values between stages and stages without parameters: helpers, one stage, pipeline == unsplit."""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import assert_same_training, make_config, run_command, train_pipelined, train_unsplit
from nested_parts import make_model
from torch import nn

from pipetrain import boundary
from pipetrain.build import build_stages
from pipetrain.checkpoint import load_checkpoint, merged_model_state, restore_stage, save_stage
from pipetrain.compose import compose_config, to_train_config
from pipetrain.driver import split_microbatches
from pipetrain.losses import get_loss
from pipetrain.partition import StageModule
from pipetrain.stage import Stage

TESTS_DIR = Path(__file__).resolve().parent


def nested_value(requires_grad: bool = False) -> dict:
    hidden = torch.randn(4, 3, requires_grad=requires_grad)
    return {
        "pair": (hidden * 2, torch.tensor([True, False, True, True])),
        "depth": 3,
        "note": None,
        "tag": "x",
        "ids": [torch.arange(4)],
    }


def assert_same_structure(value, expected) -> None:
    values, spec = boundary._flatten(value)
    expected_values, expected_spec = boundary._flatten(expected)
    assert spec == expected_spec
    for got, want in zip(values, expected_values, strict=True):
        if torch.is_tensor(want):
            torch.testing.assert_close(got, want)
        else:
            assert got == want


# --- helpers ---------------------------------------------------------------------------------------------


def test_detach_and_to_cpu_keep_the_structure_and_constants():
    value = nested_value(requires_grad=True)
    for moved in (boundary.detach(value), boundary.to_cpu(value), boundary.to_device(value, "cpu")):
        assert_same_structure(moved, value)
    assert not boundary.requires_grad(boundary.detach(value))
    assert not boundary.requires_grad(boundary.to_cpu(value))
    assert boundary.requires_grad(value)
    assert len(boundary.tensor_leaves(value)) == 3


def test_detach_for_grad_makes_float_leaves_require_grad_only():
    value = boundary.detach_for_grad(nested_value(requires_grad=True))
    hidden, mask = value["pair"]
    assert hidden.requires_grad and hidden.is_leaf
    assert not mask.requires_grad and not value["ids"][0].requires_grad
    assert (value["depth"], value["note"], value["tag"]) == (3, None, "x")


def test_backward_pairs_skip_leaves_without_gradient():
    hidden = torch.randn(2, 3, requires_grad=True)
    other = torch.randn(2, 3, requires_grad=True)
    output = (hidden * 3, torch.ones(2, dtype=torch.bool), 7, {"unused": other * 2, "none": None})
    grad = (torch.ones(2, 3), None, None, {"unused": None, "none": None})
    tensors, grads = boundary.backward_pairs(output, grad)
    assert len(tensors) == 1 and tensors[0] is output[0] and grads[0] is grad[0]
    torch.autograd.backward(tensors, grads)
    torch.testing.assert_close(hidden.grad, torch.full((2, 3), 3.0))
    assert other.grad is None
    with pytest.raises(RuntimeError, match="does not mirror"):
        boundary.backward_pairs(output, (grad[0], None))


def test_input_grads_mirror_the_input():
    value = boundary.detach_for_grad(nested_value())
    hidden = value["pair"][0]
    (hidden.sum() * 2).backward()
    grads = boundary.input_grads(value)
    torch.testing.assert_close(grads["pair"][0], torch.full_like(hidden, 2.0))
    assert grads["pair"][1] is None and grads["ids"] == [None]
    assert (grads["depth"], grads["note"], grads["tag"]) == (None, None, None)


def test_split_chunks_every_tensor_leaf_and_repeats_constants():
    value = nested_value()
    chunks = boundary.split(value, 2)
    assert len(chunks) == 2
    for idx, chunk in enumerate(chunks):
        torch.testing.assert_close(chunk["pair"][0], value["pair"][0][2 * idx : 2 * idx + 2])
        torch.testing.assert_close(chunk["ids"][0], torch.arange(2 * idx, 2 * idx + 2))
        assert (chunk["depth"], chunk["note"], chunk["tag"]) == (3, None, "x")


def test_batch_size_refuses_mismatched_or_missing_batch_dimensions():
    assert boundary.batch_size((torch.ones(6, 2), [torch.zeros(6)])) == 6
    with pytest.raises(ValueError, match=r"different sizes along dimension 0 \(\[4, 6\]\)"):
        boundary.batch_size((torch.ones(6, 2), torch.zeros(4)))
    with pytest.raises(ValueError, match="needs a batch dimension"):
        boundary.batch_size({"scale": torch.tensor(2.0), "x": torch.ones(6)})
    with pytest.raises(ValueError, match="at least one tensor"):
        boundary.batch_size({"n": 3})


@dataclass
class Holder:
    hidden: torch.Tensor


def test_hidden_tensor_leaf_finds_tensors_inside_objects():
    assert boundary.hidden_tensor_leaf(nested_value()) is None
    holder = Holder(torch.ones(2))
    assert boundary.hidden_tensor_leaf((torch.ones(2), {"h": holder})) is holder


def test_split_microbatches_takes_nested_inputs_and_targets():
    inputs = {"x": torch.randn(8, 3), "mask": torch.ones(8, dtype=torch.bool), "scale": 2}
    targets = (torch.arange(8), torch.randn(8, 2))
    micro_inputs, micro_targets = split_microbatches(inputs, targets, 4)
    assert len(micro_inputs) == len(micro_targets) == 4
    torch.testing.assert_close(micro_inputs[1]["x"], inputs["x"][2:4])
    assert micro_inputs[3]["scale"] == 2
    torch.testing.assert_close(micro_targets[2][0], torch.arange(4, 6))
    with pytest.raises(ValueError, match="train.batch_size: 8 is not divisible"):
        split_microbatches(inputs, targets, 3)


# --- one stage -------------------------------------------------------------------------------------------


def make_stage(units: list[nn.Module], stage_idx: int, num_stages: int) -> Stage:
    module = StageModule([f"u{idx}" for idx in range(len(units))], units)
    optimizer = functools.partial(torch.optim.SGD, lr=0.1)
    return Stage(stage_idx, num_stages, module, torch.device("cpu"), optimizer, get_loss("mse"), 1.0)


def tuple_model() -> nn.Module:
    torch.manual_seed(0)
    return make_model(in_features=4, hidden=4, depth=2, style="tuple")


def test_middle_stage_with_tuple_boundaries_returns_the_input_gradient():
    model = tuple_model()
    stage = make_stage([model.blocks[0], model.blocks[1]], stage_idx=1, num_stages=3)
    hidden, mask = torch.randn(6, 4), torch.randn(6, 1) > 0
    out_hidden, out_mask, depth = stage.forward(0, (hidden, mask, 0))
    assert not out_hidden.requires_grad and out_mask.dtype == torch.bool and depth == 2
    grad_in = stage.backward(0, (torch.ones_like(out_hidden), None, None))
    reference = hidden.clone().requires_grad_(True)
    stage.module((reference, mask, 0))[0].backward(torch.ones(6, 4))
    assert isinstance(grad_in, tuple) and grad_in[1:] == (None, None)
    torch.testing.assert_close(grad_in[0], reference.grad)
    assert stage.step().peak_activation_bytes > 0


def test_stage_whose_outputs_need_no_gradient_skips_backward():
    model = tuple_model()
    stage = make_stage([model.split], stage_idx=0, num_stages=2)
    assert stage.optimizer is None
    hidden, _, _ = stage.forward(0, torch.randn(6, 4))
    assert stage.backward(0, (torch.ones_like(hidden), None, None)) is None
    assert stage.microbatches_in_flight == 0
    report = stage.step()
    assert report.stage_idx == 0 and report.losses == ()


class HolderUnit(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple:
        return (Holder(x * 2),)


def test_stage_refuses_an_output_hiding_tensors_in_an_object():
    stage = make_stage([HolderUnit()], stage_idx=0, num_stages=2)
    with pytest.raises(ValueError, match=r"stage 0: the output of micro-batch 0 holds a Holder"):
        stage.forward(0, torch.randn(2, 4))


# --- in-process pipeline == unsplit ----------------------------------------------------------------------


def nested_config(style: str, balance: list[int], schedule: str, steps: int = 10):
    cfg = make_config("mlp", 2, schedule, num_microbatches=4, steps=steps)
    cfg.model = {
        "_target_": "nested_parts.make_model",
        "in_features": 8,
        "hidden": 16,
        "depth": 3,
        "num_classes": 5,
        "style": style,
    }
    cfg.pipeline.balance = list(balance)
    return cfg


def assert_pipelined_equals_unsplit(cfg) -> None:
    losses, weights = train_pipelined(cfg)
    assert_same_training(losses, weights, *train_unsplit(cfg))
    assert losses[-1] < losses[0], "training should make progress on the synthetic task"


@pytest.mark.parametrize("style", ["tuple", "dict"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("balance", [[2, 3], [1, 2, 2]], ids=["2stages", "3stages"])
def test_nested_boundaries_train_like_the_unsplit_model(style, schedule, balance):
    assert_pipelined_equals_unsplit(nested_config(style, balance, schedule))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_parameter_free_middle_stage_trains_like_the_unsplit_model(schedule):
    cfg = nested_config("relu", [1, 1, 1], schedule)
    _, stages = build_stages(cfg)
    assert stages[1].optimizer is None
    assert [type(unit) for unit in stages[1].module.units] == [nn.ReLU]
    assert_pipelined_equals_unsplit(cfg)


def test_checkpoint_of_a_parameter_free_stage_saves_and_restores(tmp_path):
    cfg = nested_config("relu", [1, 1, 1], "1f1b", steps=2)
    _, stages = build_stages(cfg)
    for stage in stages:
        save_stage(stage, tmp_path, step=2)
    (tmp_path / "manifest.json").write_text('{"step": 2, "num_stages": 3}')
    saved = load_checkpoint(tmp_path)
    assert saved.param_groups and set(saved.model_state) == {
        "inner.weight",
        "inner.bias",
        "head.weight",
        "head.bias",
    }
    _, fresh = build_stages(cfg)
    for stage in fresh:
        restore_stage(stage, saved)
    assert fresh[1].optimizer is None


# --- real processes --------------------------------------------------------------------------------------

DISTRIBUTED = [
    "model._target_=nested_parts.make_model",
    "model.in_features=8",
    "model.hidden=16",
    "model.depth=3",
    "model.num_classes=5",
    "+model.style=dict",
    "data.num_samples=256",
    "pipeline.balance=[1,2,2]",
    "pipeline.num_microbatches=4",
    "schedule=1f1b",
    "train.batch_size=16",
    "train.steps=6",
    "train.log_every=1",
    "optim=sgd",
    "optim.lr=0.1",
    "optim.momentum=0.9",
    "device=cpu",
]


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_rpc_training_with_dict_boundaries_and_a_parameter_free_stage_equals_unsplit(tmp_path):
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "pipetrain.train", f"hydra.run.dir={tmp_path}", *DISTRIBUTED]
    result = run_command(args, timeout=150, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.output[-4000:]
    _, reference_weights = train_unsplit(to_train_config(compose_config(DISTRIBUTED)))
    weights = merged_model_state(tmp_path / "checkpoints" / "step_6")
    assert weights.keys() == reference_weights.keys()
    for name, value in reference_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-5)
