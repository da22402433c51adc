"""Hydra composition: ``pipetrain/conf/`` + overrides -> a validated :class:`~pipetrain.config.TrainConfig`.

A run's configuration is composed and checked once, by whoever starts the run; it is written, resolved,
to ``<run_dir>/config.yaml`` (:func:`write_run_config`) and every process of the run loads exactly that
file (:func:`load_run_config`), so what ran is always what ``config.yaml`` says.

Together with the entry points, the only module that touches Hydra and ``DictConfig``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationKeyError, MissingMandatoryValue, OmegaConfBaseException

from pipetrain.build import MODEL_SPEC_EXTRAS
from pipetrain.config import TrainConfig, register_schema
from pipetrain.run_dir import claim_run_dir
from pipetrain.sweep_naming import claim_job_dir

__all__ = [
    "CONF_DIR",
    "RUN_CONFIG",
    "register_resolvers",
    "USER_TARGET_KEYS",
    "compose_config",
    "drop_group_arguments",
    "drop_group_arguments_in_app",
    "to_train_config",
    "write_run_config",
    "load_run_config",
    "record_auto_balance",
]

RUN_CONFIG = "config.yaml"
"""The resolved configuration of a run, in its run directory."""

CONF_DIR = Path(__file__).resolve().parent / "conf"
"""pipetrain's own configs (``pipetrain/conf/``), installed with the package."""

USER_TARGET_KEYS = ("model", "data")
"""Target specs whose ``_target_`` the command line may point at a user's callable."""

_KEPT_KEYS = {"model": ("_target_", *MODEL_SPEC_EXTRAS), "data": ("_target_",)}


def compose_config(
    overrides: Sequence[str] = (), config_name: str = "train", config_dir: Path = CONF_DIR
) -> DictConfig:
    """Compose ``<config_dir>/<config_name>.yaml`` with command-line style ``overrides``."""
    register_schema()
    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
        return drop_group_arguments(
            cfg, overrides, lambda others: compose(config_name=config_name, overrides=others)
        )


def drop_group_arguments(
    cfg: DictConfig, overrides: Sequence[str], compose_with: Callable[[list[str]], DictConfig]
) -> DictConfig:
    """Give a callable named by ``model._target_=...`` on the command line only the command line's arguments.

    The chosen ``model`` option (``mlp`` by default) supplies its own callable's arguments (``in_features``,
    ``hidden``, ...). When the command line replaces that option's ``_target_`` by another callable, those
    keys are dropped from ``cfg`` (in place) unless the command line gives them too (``+model.width=16``,
    ``++model.num_classes=4``); ``model.init`` stays, pipetrain reads it itself. Likewise for ``data``. A
    ``_target_`` equal to the option's own changes nothing. ``compose_with(overrides)`` composes the same
    config with other overrides: without the ``_target_`` override it shows the option's own ``_target_``.
    """
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    replaced = _replaced_targets(parsed)
    if not replaced:
        return cfg
    target_keys = {f"{key}._target_" for key in replaced}
    option = compose_with([item.input_line for item in parsed if item.key_or_group not in target_keys])
    for key, given in replaced.items():
        if OmegaConf.select(option, f"{key}._target_") == cfg[key].get("_target_"):
            continue
        keep = {*_KEPT_KEYS[key], *given}
        with open_dict(cfg):
            for name in [name for name in cfg[key] if name not in keep]:
                del cfg[key][name]
    return cfg


def drop_group_arguments_in_app(cfg: DictConfig) -> DictConfig:
    """:func:`drop_group_arguments` inside a Hydra app (``@hydra.main``), with the job's own overrides."""
    hydra_cfg = HydraConfig.get()
    config_name = hydra_cfg.job.config_name
    return drop_group_arguments(
        cfg,
        list(hydra_cfg.overrides.task),
        lambda others: compose(config_name=config_name, overrides=others),
    )


def _replaced_targets(parsed: Sequence[Override]) -> dict[str, set[str]]:
    """For each of :data:`USER_TARGET_KEYS` whose ``_target_`` is overridden: the argument names given."""
    parsed = [item for item in parsed if not item.is_delete()]
    replaced = {}
    for key in USER_TARGET_KEYS:
        if any(item.key_or_group == f"{key}._target_" for item in parsed):
            prefix = f"{key}."
            replaced[key] = {
                item.key_or_group[len(prefix) :].split(".")[0]
                for item in parsed
                if item.key_or_group.startswith(prefix)
            }
    return replaced


def register_resolvers() -> None:
    """The resolvers ``pipetrain/conf/train.yaml`` uses to name run directories (idempotent).

    ``${pipetrain_run_dir:${run_dir},<default>}`` is ``run_dir`` when given, else ``<default>`` claimed
    (created, with a ``-1``, ``-2`` ... suffix when another run took it); ``${pipetrain_claim_dir:<dir>}``
    claims ``<dir>`` likewise (sweep directories); ``${pipetrain_job_dir:<sweep dir>,<job num>,<overrides>}``
    claims a sweep job's directory named by the overrides its sweep varies (:mod:`pipetrain.sweep_naming`).
    """
    if not OmegaConf.has_resolver("pipetrain_run_dir"):
        OmegaConf.register_new_resolver(
            "pipetrain_run_dir", lambda run_dir, default: str(run_dir or claim_run_dir(default))
        )
    if not OmegaConf.has_resolver("pipetrain_claim_dir"):
        OmegaConf.register_new_resolver("pipetrain_claim_dir", lambda base: str(claim_run_dir(base)))
    if not OmegaConf.has_resolver("pipetrain_job_dir"):
        OmegaConf.register_new_resolver(
            "pipetrain_job_dir",
            lambda sweep_dir, num, overrides: claim_job_dir(sweep_dir, num, list(overrides)),
        )


def write_run_config(run_dir: Path, cfg: DictConfig) -> Path:
    """Write ``cfg``, resolved and with ``run_dir`` set, to ``<run_dir>/config.yaml``; return its path."""
    cfg = cfg.copy()
    cfg.run_dir = str(run_dir)
    path = Path(run_dir) / RUN_CONFIG
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def record_auto_balance(cfg: DictConfig, record: dict[str, Any]) -> DictConfig:
    """A copy of ``cfg`` whose ``pipeline.balance=auto`` is replaced by the chosen split, recorded in
    ``autobalance.result`` (``record``: :func:`pipetrain.balance.result_record`)."""
    cfg = cfg.copy()
    cfg.pipeline.balance = list(record["balance"])
    cfg.pipeline.stages = None
    cfg.pipeline.num_stages = len(record["balance"])
    cfg.autobalance.result = record
    return cfg


def load_run_config(source: Path | str) -> DictConfig:
    """A run's configuration from its ``config.yaml`` (a path) or that file's text, checked by the schema."""
    text = Path(source).read_text() if isinstance(source, Path) else source
    register_schema()
    try:
        return OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.create(text))
    except OmegaConfBaseException as error:
        raise ValueError(f"{getattr(error, 'full_key', None) or 'config'}: {_first_line(error)}") from None


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
            "matching data=... for the model (or an experiment=..., e.g. experiment=gpt), or, for your own "
            "model._target_, your own data._target_=..."
        ) from None
    except OmegaConfBaseException as error:
        raise ValueError(f"{getattr(error, 'full_key', None) or 'config'}: {_first_line(error)}") from None
    assert isinstance(typed, TrainConfig), type(typed)
    return typed


def _first_line(error: OmegaConfBaseException) -> str:
    return str(getattr(error, "msg", error)).splitlines()[0]
