"""An installed pipetrain works: its wheel, installed outside the checkout, trains from any directory.

The wheel is built from a copy of the sources (nothing is written into the checkout) without build
isolation (no network) and installed without dependencies into a scratch directory that ``PYTHONPATH``
puts first; the commands run from scratch directories, so the checkout's ``pipetrain`` is not the one
imported, by the launcher or by the workers torchrun starts (they inherit the environment).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import run_command
from omegaconf import OmegaConf

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["train.steps=2", "train.log_every=1", "model.hidden=32"]


def _pip(*args: str, cwd: Path) -> None:
    """Run pip of this interpreter; fail with its output."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The directory the wheel is installed into (``--target``)."""
    base = tmp_path_factory.mktemp("install")
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "pipetrain", source / "pipetrain", ignore=shutil.ignore_patterns("__pycache__"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(base / "dist"), str(source), cwd=base)
    (wheel,) = (base / "dist").glob("pipetrain-*.whl")
    configs = {path.relative_to(ROOT).as_posix() for path in (ROOT / "pipetrain" / "conf").rglob("*.yaml")}
    assert configs and configs <= set(zipfile.ZipFile(wheel).namelist()), "the wheel lacks configs"
    site = base / "site"
    _pip("install", "--no-deps", "--no-compile", "--target", str(site), str(wheel), cwd=base)
    return site


def _env(site: Path) -> dict[str, str]:
    return {"PYTHONPATH": str(site)}


def _scratch(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def _check_run(cwd: Path) -> None:
    """The one run directory under ``cwd/runs`` holds the config and two logged steps."""
    (run_dir,) = (cwd / "runs").glob("*/*")
    assert OmegaConf.load(run_dir / "config.yaml").train.steps == 2
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_the_installed_copy_is_the_one_imported(installed, tmp_path):
    code = "import pipetrain.train, pipetrain.worker, pipetrain.compose as c; print(c.__file__, c.CONF_DIR)"
    result = run_command([sys.executable, "-c", code], 60, cwd=tmp_path, env=_env(installed))
    assert result.returncode == 0, result.output
    module_file, conf_dir = result.output.split()
    assert Path(module_file).is_relative_to(installed), module_file
    assert (Path(conf_dir) / "train.yaml").is_file()


def test_python_m_pipetrain_train_trains(installed, tmp_path):
    cwd = _scratch(tmp_path, "cwd")
    args = [sys.executable, "-m", "pipetrain.train", *QUICK]
    result = run_command(args, 240, cwd=cwd, env=_env(installed))
    assert result.returncode == 0, result.output[-4000:]
    _check_run(cwd)


def test_pipetrain_command_trains(installed, tmp_path):
    cwd = _scratch(tmp_path, "cwd")
    result = run_command([str(installed / "bin" / "pipetrain"), *QUICK], 240, cwd=cwd, env=_env(installed))
    assert result.returncode == 0, result.output[-4000:]
    _check_run(cwd)


def test_config_dir_options_join_the_installed_ones(installed, tmp_path):
    cwd = _scratch(tmp_path, "cwd")
    (cwd / "my_conf" / "model").mkdir(parents=True)
    (cwd / "my_conf" / "model" / "tiny.yaml").write_text("_target_: pipetrain.models.mlp.mlp\nhidden: 8\n")
    args = [str(installed / "bin" / "pipetrain"), "--config-dir", "my_conf", "model=tiny", "--cfg", "job"]
    result = run_command(args, 60, cwd=cwd, env=_env(installed))
    assert result.returncode == 0, result.output[-4000:]
    printed = OmegaConf.create(result.output)
    assert printed.model == {"_target_": "pipetrain.models.mlp.mlp", "hidden": 8}
    assert printed.schedule.name == "gpipe"  # from the installed pipetrain/conf/
