"""Pipetrain trains the model the user wrote: forward must be the chain of its units, labels must fit."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import composition_parts as parts
import pytest
import torch
from conftest import make_config, run_command

from pipetrain.build import build_dataset
from pipetrain.composition import check_model_composes, check_units_compose
from pipetrain.losses import get_loss
from pipetrain.models import gpt, mlp, model_units, resnet18
from pipetrain.preflight import preflight

TESTS_DIR = Path(__file__).resolve().parent
WHAT_RUNS = r"pipetrain trains the model's units applied one after another"
MOVE_INTO_A_UNIT = r"move that computation into a unit module \(e.g. an nn.Flatten\(\) child, or a residual"


def _check(model_class) -> None:
    torch.manual_seed(0)
    check_units_compose(model_class(8, 5), torch.randn(2, 8))


@pytest.mark.parametrize(
    "model_class,message",
    [
        (
            parts.Residual,
            rf"model: forward computes something its units do not \(max abs difference [0-9.e+-]+ in "
            rf"output between forward and the units applied in order\); {MOVE_INTO_A_UNIT}.*{WHAT_RUNS}",
        ),
        (
            parts.OutOfOrder,
            r"model: units run in the order \['inp', 'head'\] but are registered as \['head', 'inp'\]: "
            r"register the children in the order forward calls them",
        ),
        (parts.NeverCalled, r"model: forward never calls units \['unused'\].*call each of them once"),
        (
            parts.CalledTwice,
            r"model: forward calls units \['act'\] more than once.*its own child module",
        ),
        (parts.Scaled, rf"max abs difference [0-9.e+-]+ in output .*; {MOVE_INTO_A_UNIT}"),
        (
            parts.FlattenInForward,
            rf"applying the units in order fails on the data \(RuntimeError: .*\) where forward works; "
            rf"{MOVE_INTO_A_UNIT}",
        ),
        (
            parts.TupleOut,
            r"forward returns tuple\(Tensor\(2, 5\), Tensor\(2, 16\)\) but its units applied in order return "
            r"Tensor\(2, 5\)",
        ),
    ],
    ids=lambda value: getattr(value, "__name__", "message"),
)
def test_forward_that_is_not_the_chain_of_its_units_is_refused(model_class, message):
    with pytest.raises(ValueError, match=message):
        _check(model_class)


def test_shared_module_under_two_names_is_refused():
    with pytest.raises(
        ValueError,
        match=r"model: units 'first' and 'second' are the same module \(one module registered under two "
        r"names\); units must be distinct modules",
    ):
        model_units(parts.SharedModule(8, 5))


def test_same_module_twice_in_a_module_list_is_refused():
    model = torch.nn.Module()
    relu = torch.nn.ReLU()
    model.layers = torch.nn.ModuleList([relu, relu])
    with pytest.raises(ValueError, match=r"units 'layers.0' and 'layers.1' are the same module"):
        model_units(model)


def test_tied_weights_inside_units_are_fine():
    model = gpt(vocab_size=32, seq_len=8, d_model=16, num_heads=2, num_layers=2, tie_embeddings=True)
    check_units_compose(model, torch.randint(0, 32, (2, 8)))


def test_nested_outputs_are_compared_leaf_by_leaf():
    class Pair(torch.nn.Module):
        def forward(self, x):
            return {"a": x, "b": (x, 2 * x)}

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            out = self.pair(x)
            return {"a": out["a"], "b": (out["b"][0], out["b"][1] + 1.0)}

    with pytest.raises(ValueError, match=r"max abs difference 1 in output\['b'\]\[1\]"):
        check_units_compose(Model(), torch.randn(2, 3))


def test_models_whose_forward_is_their_units_pass():
    torch.manual_seed(0)
    check_units_compose(parts.Composes(8, 5), torch.randn(2, 8))
    check_units_compose(mlp(in_features=8, hidden=16, depth=2, num_classes=5), torch.randn(2, 8))
    check_units_compose(gpt(vocab_size=32, seq_len=8, d_model=16, num_heads=2), torch.randint(0, 32, (2, 8)))
    check_units_compose(resnet18(num_classes=5), torch.randn(1, 3, 32, 32))


def _residual_config():
    cfg = make_config("mlp", 2)
    cfg.model = {"_target_": "composition_parts.make_residual_model", "in_features": 8, "num_classes": 5}
    cfg.pipeline.balance = [2, 1]
    return cfg


def test_preflight_refuses_a_model_that_does_not_compose():
    with pytest.raises(ValueError, match=rf"model: forward computes something its units do not.*{WHAT_RUNS}"):
        preflight(_residual_config())


def test_the_check_on_a_config_keeps_the_random_state_and_accepts_batches_of_one():
    cfg = make_config("mlp", 1, num_microbatches=1, batch_size=1)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_model_composes(cfg, build_dataset(cfg))
    torch.testing.assert_close(torch.rand(3), expected)
    assert preflight(cfg).num_stages == 1


@pytest.mark.parametrize(
    "labels,message",
    [
        (
            [0, 5, 1],
            r"train.loss=cross_entropy: label 5 is out of range for the model's output of 5 classes "
            r"\(labels 0..4\); match the data's classes and the model's num_classes, "
            r"e.g. model.num_classes=6",
        ),
        ([0, -3, 1], r"train.loss=cross_entropy: label -3 is out of range .* labels are class indices >= 0"),
    ],
)
def test_labels_out_of_range_are_refused(labels, message):
    loss = get_loss("cross_entropy")
    with pytest.raises(ValueError, match=message):
        loss(torch.randn(3, 5), torch.tensor(labels))
    with pytest.raises(ValueError, match=message):  # sequence targets, one label per position
        loss(torch.randn(1, 3, 5), torch.tensor([labels]))


def test_labels_in_range_and_skipped_labels_are_accepted():
    logits, labels = torch.randn(3, 5), torch.tensor([0, 4, -100])
    loss = get_loss("cross_entropy")(logits, labels)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels))


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_train_refuses_a_model_that_does_not_compose_before_any_process_starts(tmp_path):
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    args = [
        sys.executable,
        "-m",
        "pipetrain.train",
        f"hydra.run.dir={tmp_path}",
        "model._target_=composition_parts.make_residual_model",
        "++model.in_features=32",
        "++model.num_classes=10",
        "pipeline.balance=[2,1]",
    ]
    result = run_command(args, timeout=100, cwd=tmp_path, env=env)
    assert result.returncode == 2, result.output[-4000:]
    errors = [line for line in result.output.splitlines() if "configuration error" in line]
    assert len(errors) == 1, result.output[-4000:]
    assert errors[0].startswith("pipetrain: configuration error: model: forward computes something its units")
    assert "residual block module" in errors[0]
    assert "stages [" not in result.output  # the launcher never got to torchrun
    assert not (tmp_path / "metrics.jsonl").exists()
