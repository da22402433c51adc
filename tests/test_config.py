"""Every config in pipetrain/conf/ composes and passes pre-flight; every refusal names its key and the fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_config
from hydra.errors import ConfigCompositionException

from pipetrain.compose import CONF_DIR, compose_config, to_train_config
from pipetrain.config import TrainConfig
from pipetrain.models import gpt, model_units
from pipetrain.partition import partition, plan_stages
from pipetrain.preflight import preflight

MLP_UNITS = ["layers.0", "layers.1", "layers.2", "layers.3", "layers.4", "head"]


def _options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def test_default_config_is_typed_and_valid():
    cfg = to_train_config(compose_config())
    assert isinstance(cfg, TrainConfig)
    assert cfg.pipeline.balance == [3, 3] and cfg.schedule.name == "gpipe"
    assert preflight(cfg).num_stages == 2


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes_and_passes_preflight(experiment):
    preflight(to_train_config(compose_config([f"experiment={experiment}"])))


@pytest.mark.parametrize(
    "group,option",
    [
        (group, option)
        for group in ("model", "pipeline", "schedule", "data", "optim")
        for option in _options(group)
    ],
)
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "model" and option.startswith("resnet"):
        overrides += ["data=synthetic_images", "pipeline.balance=[6,5]"]
    elif group == "model" and option == "gpt":
        overrides += ["experiment=gpt"]
    elif group == "pipeline" and option == "gpt_two_stages":
        overrides += ["experiment=gpt"]
    elif group == "data" and option == "synthetic_tokens":
        overrides += ["experiment=gpt"]
    elif group == "data" and option == "digits":
        overrides += ["experiment=digits"]
    elif group == "data" and option == "synthetic_images":
        overrides += ["model=resnet18", "pipeline.balance=[6,5]"]
    elif group == "data" and option in (
        "cifar10",
        "imagefolder",
    ):  # datasets on disk: composition only, their root is checked in pre-flight tests
        cfg = to_train_config(compose_config(overrides + ["data.root=/nonexistent"]))
        assert cfg.data["root"] == "/nonexistent"
        return
    preflight(to_train_config(compose_config(overrides)))


def test_misspelled_key_is_an_error():
    with pytest.raises(ConfigCompositionException, match="pipeline.stagez"):
        compose_config(["pipeline.stagez=[[a]]"])
    with pytest.raises(ConfigCompositionException, match="train.stepz"):
        compose_config(["train.stepz=3"])


def test_misspelled_key_in_a_yaml_file_is_an_error(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "pipeline" / "typo.yaml").write_text("balanse: [3, 3]\nnum_microbatches: 4\n")
    with pytest.raises(ConfigCompositionException, match="balanse"):
        compose_config(["pipeline=typo"], config_dir=conf)


def test_unknown_group_option_lists_the_known_ones():
    with pytest.raises(Exception, match="(?s)Could not find 'schedule/zb'.*1f1b.*gpipe"):
        compose_config(["schedule=zb"])


def test_sweepable_overrides_compose():
    cfg = to_train_config(
        compose_config(["pipeline.balance=[2,4]", "schedule=1f1b", "pipeline.num_microbatches=8"])
    )
    assert preflight(cfg).stages[0] == ("layers.0", "layers.1")


# --- partition refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stages,balance,message",
    [
        ([["layers.0", "bogus"], ["head"]], None, r"pipeline.stages: stage 0 names unknown unit 'bogus'"),
        (
            [MLP_UNITS[:3], MLP_UNITS[2:]],
            None,
            r"unit 'layers.2' is in stage 0 and stage 1; each unit belongs to exactly one stage",
        ),
        ([MLP_UNITS[:3], MLP_UNITS[3:5]], None, r"units \['head'\] are in no stage"),
        ([MLP_UNITS[3:], MLP_UNITS[:3]], None, r"list units in forward order"),
        ([MLP_UNITS, []], None, r"stage 1 is empty"),
        ([[u] for u in MLP_UNITS] + [["head"]], None, r"7 stages but the model has only 6 units"),
        (None, [3, 2], r"sums to 5 but the model has 6 units"),
        (None, [6, 0], r"stage 1 has 0 units"),
        (None, [1] * 7, r"7 stages but the model has only 6 units"),
        ([MLP_UNITS], [6], r"exactly one of pipeline.stages .* and pipeline.balance"),
        (None, None, r"exactly one of pipeline.stages"),
    ],
)
def test_bad_stage_specs_are_refused(stages, balance, message):
    with pytest.raises(ValueError, match=message):
        plan_stages(MLP_UNITS, stages=stages, balance=balance)


def test_tied_weights_across_stages_are_refused():
    model = gpt(vocab_size=32, seq_len=8, d_model=16, num_heads=2, num_layers=2, tie_embeddings=True)
    names = [name for name, _ in model_units(model)]
    plan = plan_stages(names, balance=[2, 3])
    with pytest.raises(ValueError, match=r"'head.weight' .* same tensor as 'embed.tok.weight'.*tied weights"):
        partition(model, plan)
    partition(model, plan_stages(names, balance=[5]))  # both in one stage is fine


def test_stage_modules_map_names_to_the_full_model():
    model = gpt(vocab_size=32, seq_len=8, d_model=16, num_heads=2, num_layers=2)
    names = [name for name, _ in model_units(model)]
    stages = partition(model, plan_stages(names, balance=[2, 3]))
    merged = {}
    for stage in stages:
        merged.update(stage.full_state_dict())
    assert merged.keys() == model.state_dict().keys()
    x = torch.randint(32, (2, 8))
    torch.testing.assert_close(stages[1](stages[0](x)), model(x))


# --- pre-flight refusals ----------------------------------------------------------------------------------


def _with(**changes):
    cfg = make_config("mlp", 2)
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if key:
            target = getattr(cfg, section)
            if isinstance(target, dict):
                target[key] = value
            else:
                setattr(target, key, value)
        else:
            setattr(cfg, section, value)
    return cfg


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"pipeline__num_microbatches": 0}, r"pipeline.num_microbatches: 0 must be an integer >= 1"),
        ({"train__batch_size": 18}, r"train.batch_size: 18 is not divisible by pipeline.num_microbatches=4"),
        ({"train__steps": 0}, r"train.steps: 0 must be an integer >= 1"),
        ({"train__log_every": 0}, r"train.log_every"),
        ({"train__loss": "hinge"}, r"train.loss: unknown loss 'hinge'; choose one of"),
        ({"schedule__name": "zb"}, r"unknown schedule 'zb'.*schedule=<name>"),
        ({"device": "tpu"}, r"device: 'tpu' is not one of"),
        ({"rpc__timeout_s": 0}, r"rpc.timeout_s"),
        (
            {"rpc__data_plane": "nccl"},
            r"rpc.data_plane: 'nccl' is not one of \['auto', 'rpc', 'c10d', 'shm'\]",
        ),
        (
            {"model___target_": "pipetrain.models.nope"},
            r"model._target_: cannot import 'pipetrain.models.nope'",
        ),
        ({"model__widthh": 3}, r"model.widthh: pipetrain.models.mlp.mlp takes no argument 'widthh'"),
        ({"optim__lrr": 3}, r"optim.lrr: torch.optim.SGD takes no argument"),
        ({"optim___partial_": False}, r"optim._partial_: must be true"),
        ({"model__init": "/nonexistent/model.pt"}, r"model.init: '/nonexistent/model.pt' is not a file"),
        ({"train__batch_size": 1024}, r"train.batch_size: 1024 is larger than the dataset \(256 samples\)"),
        ({"data__in_features": 9}, r"data: a sample of shape \(9,\).*does not fit model"),
        (
            {"data___target_": "pipetrain.data.cifar10", "data__root": "/nonexistent"},
            r"data.root: '/nonexistent' is not a directory",
        ),
    ],
)
def test_preflight_refuses_bad_settings(changes, message):
    cfg = _with(**changes)
    if "data___target_" in changes:
        cfg.data = {"_target_": changes["data___target_"], "root": changes["data__root"]}
    with pytest.raises(ValueError, match=message):
        preflight(cfg)


def test_stage_workers_preflight_without_reading_the_data():
    cfg = _with()
    cfg.data = {"_target_": "pipetrain.data.cifar10", "root": "/nonexistent"}
    assert preflight(cfg, check_data=False).num_stages == 2
    with pytest.raises(ValueError, match="data.root"):
        preflight(cfg)


def test_missing_mandatory_value_names_the_key():
    with pytest.raises(ValueError, match=r"data.root: required but not set"):
        to_train_config(compose_config(["data=cifar10"]))


def test_mismatched_config_groups_say_how_to_fix():
    with pytest.raises(ValueError, match=r"data.in_features: .*experiment=gpt"):
        to_train_config(compose_config(["model=gpt"]))


def test_conf_dir_is_inside_the_package():
    assert CONF_DIR == Path(__file__).resolve().parent.parent / "pipetrain" / "conf"
    assert (CONF_DIR / "train.yaml").is_file()
    assert not (CONF_DIR.parent.parent / "conf").exists(), "configs live in pipetrain/conf/ only"
