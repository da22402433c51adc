"""Tests for the built-in models and their unit decomposition."""

from __future__ import annotations

import importlib

import pytest
import torch
import torchvision
from torch import nn

from pipetrain.models import BUILTIN_MODELS, gpt, mlp, model_units, resnet18, resnet50, run_units

RESNET_UNITS = [
    "conv1",
    "bn1",
    "relu",
    "maxpool",
    "layer1",
    "layer2",
    "layer3",
    "layer4",
    "avgpool",
    "flatten",
    "fc",
]


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "mlp":
        return mlp(), torch.randn(4, 32)
    if name == "gpt":
        return gpt(), torch.randint(0, 256, (2, 32))
    if name == "resnet18":
        return resnet18(), torch.randn(2, 3, 32, 32)
    if name == "resnet50":
        return resnet50(), torch.randn(2, 3, 32, 32)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["mlp", "gpt", "resnet18", "resnet50"])
@pytest.mark.parametrize("train", [False, True])
def test_units_reproduce_forward(name: str, train: bool) -> None:
    model, x = _build(name)
    model.train(train)
    with torch.no_grad():
        expected = model(x)
        got = run_units(model_units(model), x)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", ["mlp", "gpt", "resnet18", "resnet50"])
def test_units_cover_all_params_disjointly(name: str) -> None:
    model, _ = _build(name)
    seen: dict[int, str] = {}
    for unit_name, unit in model_units(model):
        assert model.get_submodule(unit_name) is unit
        for p in unit.parameters():
            assert id(p) not in seen, f"parameter shared by {seen[id(p)]} and {unit_name}"
            seen[id(p)] = unit_name
    assert set(seen) == {id(p) for p in model.parameters()}


def test_unit_names() -> None:
    assert [n for n, _ in model_units(mlp())] == [f"layers.{i}" for i in range(5)] + ["head"]
    assert [n for n, _ in model_units(mlp(depth=2))] == ["layers.0", "layers.1", "layers.2", "head"]
    assert [n for n, _ in model_units(gpt())] == ["embed"] + [f"blocks.{i}" for i in range(4)] + [
        "ln_f",
        "head",
    ]
    assert [n for n, _ in model_units(gpt(num_layers=2))] == ["embed", "blocks.0", "blocks.1", "ln_f", "head"]
    assert [n for n, _ in model_units(resnet18())] == RESNET_UNITS
    assert [n for n, _ in model_units(resnet50())] == RESNET_UNITS
    assert [n for n, _ in resnet18().named_children()] == RESNET_UNITS


def test_model_units_expands_only_top_level_module_lists() -> None:
    model = nn.Module()
    model.a = nn.Linear(2, 2)
    model.lst = nn.ModuleList([nn.ModuleList([nn.ReLU()]), nn.Linear(2, 2)])
    model.seq = nn.Sequential(nn.ReLU(), nn.ReLU())
    units = model_units(model)
    assert [n for n, _ in units] == ["a", "lst.0", "lst.1", "seq"]
    assert units[1][1] is model.lst[0]
    with pytest.raises(ValueError):
        model_units(nn.ReLU())


def test_output_shapes() -> None:
    torch.manual_seed(0)
    assert mlp(in_features=8, num_classes=3)(torch.randn(5, 8)).shape == (5, 3)
    assert gpt(vocab_size=50, seq_len=16)(torch.randint(0, 50, (3, 10))).shape == (3, 10, 50)
    assert resnet18(num_classes=7)(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError):
        gpt(seq_len=8)(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(resnet18, torchvision.models.resnet18), (resnet50, torchvision.models.resnet50)],
)
def test_resnet_state_dict_matches_torchvision(ours, theirs) -> None:
    torch.manual_seed(0)
    reference = theirs(weights=None, num_classes=10)
    model = ours(num_classes=10)
    ref_sd = reference.state_dict()
    assert list(model.state_dict().keys()) == list(ref_sd.keys())
    model.load_state_dict(ref_sd)
    model.eval()
    reference.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_tie_embeddings() -> None:
    tied = gpt(tie_embeddings=True)
    assert tied.head.weight is tied.embed.tok.weight
    untied = gpt()
    assert untied.head.weight is not untied.embed.tok.weight


def test_gpt_is_causal() -> None:
    torch.manual_seed(0)
    model = gpt().eval()
    idx = torch.randint(0, 256, (2, 32))
    t = 10
    changed = idx.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % 256
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1], b[:, t + 1])


def test_builtin_models_targets_resolve() -> None:
    assert set(BUILTIN_MODELS) == {"mlp", "gpt", "resnet18", "resnet50"}
    for name, target in BUILTIN_MODELS.items():
        module_path, _, attr = target.rpartition(".")
        builder = getattr(importlib.import_module(module_path), attr)
        assert builder is globals()[name]
