"""The README's own-model recipe works as written: a user's callable gets only the user's arguments."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

import pytest
from conftest import run_command
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from pipetrain.build import build_model
from pipetrain.compose import CONF_DIR, compose_config, to_train_config
from pipetrain.preflight import preflight

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
USER_MODEL = ["model._target_=my_pkg.make_model", "data._target_=my_pkg.make_dataset"]


def _readme_blocks() -> list[str]:
    """The fenced code blocks of README.md, their text without the fences and the list indentation."""
    blocks, current, indent = [], None, 0
    for line in README.read_text().splitlines():
        if line.strip().startswith("```"):
            if current is None:
                current, indent = [], len(line) - len(line.lstrip())
            else:
                blocks.append("".join(f"{text[indent:]}\n" for text in current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def _readme_command() -> str:
    """The README's command line that trains the example user package."""
    lines = [
        line
        for block in _readme_blocks()
        for line in block.splitlines()
        if line.startswith("python -m pipetrain.train model._target_=my_pkg.make_model")
    ]
    assert len(lines) == 1, lines
    return lines[0]


def test_readme_shows_the_example_package_as_it_is():
    package = (HERE / "my_pkg" / "__init__.py").read_text()
    assert package in _readme_blocks()


def test_user_model_and_data_get_only_the_command_line_arguments():
    cfg = to_train_config(compose_config([*USER_MODEL, "+model.width=16", "pipeline.balance=[3,2]"]))
    assert cfg.model == {"_target_": "my_pkg.make_model", "width": 16, "init": None}
    assert cfg.data == {"_target_": "my_pkg.make_dataset"}
    assert preflight(cfg).stages == (("0", "1", "2"), ("3", "4"))
    assert build_model(cfg)[0].out_features == 16


def test_readme_command_composes_to_the_users_arguments():
    overrides = shlex.split(_readme_command())[3:]
    cfg = to_train_config(compose_config(overrides))
    assert cfg.model == {"_target_": "my_pkg.make_model", "width": 128, "init": None}
    assert cfg.data == {"_target_": "my_pkg.make_dataset"}
    preflight(cfg)


@pytest.mark.parametrize("override", ["++model.num_classes=3", "model.num_classes=3"])
def test_an_argument_the_default_model_also_takes_is_given(override):
    cfg = to_train_config(compose_config([*USER_MODEL, override]))
    assert cfg.model == {"_target_": "my_pkg.make_model", "num_classes": 3, "init": None}


def test_adding_an_argument_the_default_model_has_asks_for_plus_plus():
    with pytest.raises(ConfigCompositionException, match=r"\+\+model\.num_classes=3"):
        compose_config([*USER_MODEL, "+model.num_classes=3"])


def test_model_init_stays_with_a_user_model():
    cfg = to_train_config(compose_config([*USER_MODEL, "model.init=/models/mine.pt"]))
    assert cfg.model == {"_target_": "my_pkg.make_model", "init": "/models/mine.pt"}


def test_the_default_options_own_target_keeps_its_arguments():
    default = compose_config()
    cfg = compose_config(
        ["model._target_=pipetrain.models.mlp.mlp", "data._target_=pipetrain.data.synthetic_classification"]
    )
    assert OmegaConf.to_container(cfg.model) == OmegaConf.to_container(default.model)
    assert OmegaConf.to_container(cfg.data) == OmegaConf.to_container(default.data)


def test_user_data_with_the_built_in_model():
    cfg = to_train_config(compose_config(["data._target_=my_pkg.make_dataset", "data.num_samples=256"]))
    assert cfg.data == {"_target_": "my_pkg.make_dataset", "num_samples": 256}
    assert cfg.model == to_train_config(compose_config()).model


def test_user_model_with_the_default_data_asks_for_its_data():
    with pytest.raises(ValueError, match=r"^data\.in_features: .*your own data\._target_=\.\.\.$"):
        to_train_config(compose_config(["model._target_=my_pkg.make_model"]))


def test_the_default_balance_is_refused_with_a_split_that_fits():
    cfg = to_train_config(compose_config(USER_MODEL))
    with pytest.raises(ValueError) as refused:
        preflight(cfg)
    message = str(refused.value)
    assert message == (
        "pipeline.balance: [3, 3] sums to 6 but the model has 5 units (['0', '1', '2', '3', '4']); "
        "make the counts sum to 5, e.g. pipeline.balance=[3,2]"
    )
    assert any(f"pipetrain: configuration error: {message}\n" in block for block in _readme_blocks())


def test_user_option_files_give_only_their_own_arguments(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "model" / "my_model.yaml").write_text("_target_: my_pkg.make_model\nwidth: 32\n")
    (conf / "data" / "my_data.yaml").write_text("_target_: my_pkg.make_dataset\nnum_samples: 256\n")
    overrides = ["model=my_model", "data=my_data", "pipeline.balance=[3,2]"]
    cfg = to_train_config(compose_config(overrides, config_dir=conf))
    assert cfg.model == {"_target_": "my_pkg.make_model", "width": 32}
    assert cfg.data == {"_target_": "my_pkg.make_dataset", "num_samples": 256}
    preflight(cfg)


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("entry", ["python -m pipetrain.train", "pipetrain"])
def test_readme_command_trains(tmp_path, entry):
    """The README's line, run where it says (the directory holding my_pkg/), through both entry points."""
    shutil.copytree(HERE / "my_pkg", tmp_path / "my_pkg", ignore=shutil.ignore_patterns("__pycache__"))
    args = shlex.split(_readme_command())
    assert args[:3] == ["python", "-m", "pipetrain.train"]
    if entry == "pipetrain":
        command = Path(sys.executable).parent / "pipetrain"
        if not command.is_file():
            pytest.skip(f"no pipetrain command next to {sys.executable}")
        start = [str(command)]
    else:
        start = [sys.executable, "-m", "pipetrain.train"]
    result = run_command([*start, *args[3:], "train.steps=2"], 240, cwd=tmp_path)
    assert result.returncode == 0, result.output[-4000:]
    (run_dir,) = (tmp_path / "runs").glob("*/*")
    written = OmegaConf.load(run_dir / "config.yaml")
    user_model = {"_target_": "my_pkg.make_model", "init": None, "width": 128}
    assert OmegaConf.to_container(written.model) == user_model
    assert OmegaConf.to_container(written.data) == {"_target_": "my_pkg.make_dataset"}
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 1
