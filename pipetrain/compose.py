"""Hydra composition: ``conf/`` + overrides -> a validated :class:`~pipetrain.config.TrainConfig`.

Together with the entry points, the only module that touches Hydra and ``DictConfig``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError, MissingMandatoryValue, OmegaConfBaseException

from pipetrain.config import TrainConfig, register_schema

__all__ = ["CONF_DIR", "compose_config", "to_train_config"]

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
"""The ``conf/`` directory shipped with pipetrain."""


def compose_config(
    overrides: Sequence[str] = (), config_name: str = "train", config_dir: Path = CONF_DIR
) -> DictConfig:
    """Compose ``<config_dir>/<config_name>.yaml`` with command-line style ``overrides``."""
    register_schema()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Resolve ``cfg`` into the typed schema; a missing or ill-typed value is a ``ValueError`` naming it."""
    try:
        typed = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as error:
        raise ValueError(
            f"{error.full_key}: required but not set; give it on the command line ({error.full_key}=...)"
        ) from None
    except InterpolationKeyError as error:
        raise ValueError(
            f"{error.full_key}: {_first_line(error)}; the chosen configs do not fit together: pick a "
            "matching data=... for the model (or an experiment=..., e.g. experiment=gpt)"
        ) from None
    except OmegaConfBaseException as error:
        raise ValueError(f"{getattr(error, 'full_key', None) or 'config'}: {_first_line(error)}") from None
    assert isinstance(typed, TrainConfig), type(typed)
    return typed


def _first_line(error: OmegaConfBaseException) -> str:
    return str(getattr(error, "msg", error)).splitlines()[0]
