"""The Dockerfile builds on a CUDA PyTorch image, installs this package (not editable) and runs it."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [tuple(line.split(maxsplit=1)) for line in lines]


def test_dockerfile_uses_a_cuda_pytorch_base_that_fits_the_torch_range():
    base = next(arg for op, arg in instructions() if op == "FROM")
    match = re.fullmatch(r"pytorch/pytorch:(\d+)\.(\d+)\.\d+-cuda[\d.]+-cudnn\d+-runtime", base)
    assert match, base
    requirement = re.search(r'"(torch>=[^"]+)"', (ROOT / "pyproject.toml").read_text())[1]
    low, high = re.fullmatch(r"torch>=(\d+\.\d+),<(\d+\.\d+)", requirement).groups()
    version = (int(match[1]), int(match[2]))
    assert tuple(map(int, low.split("."))) <= version < tuple(map(int, high.split(".")))


def test_dockerfile_installs_the_package_with_its_configs():
    ops = instructions()
    copied = " ".join(arg for op, arg in ops if op == "COPY")
    for path in ("pyproject.toml", "README.md", "pipetrain"):
        assert path in copied
    assert (ROOT / "pipetrain" / "conf" / "train.yaml").is_file(), "the configs travel inside the package"
    installs = [arg for op, arg in ops if op == "RUN" and "pip install" in arg]
    assert len(installs) == 1, installs
    assert not re.search(r"(^|\s)(-e|--editable)(\s|$)", installs[0]), "install it as a regular package"


def test_dockerfile_runs_the_installed_package_not_the_sources():
    ops = instructions()
    workdirs = [arg for op, arg in ops if op == "WORKDIR"]
    source_dir = next(arg for op, arg in ops if op == "WORKDIR")
    install = next(arg for op, arg in ops if op == "RUN" and "pip install" in arg)
    assert f"rm -rf {source_dir}" in install, "the sources must not shadow the installed package"
    assert workdirs[-1] != source_dir


def test_dockerfile_entry_point_is_the_train_command():
    entrypoint = next(arg for op, arg in instructions() if op == "ENTRYPOINT")
    assert json.loads(entrypoint) == ["python", "-m", "pipetrain.train"]
