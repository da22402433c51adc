"""Sweep jobs named and described by the overrides their sweep varies.

``python -m pipetrain.train -m schedule=gpipe,1f1b pipeline.balance=[2,4],[3,3] train.steps=6`` varies
``schedule`` and ``pipeline.balance``: its jobs run in ``<sweep_dir>/schedule=gpipe,balance=[2,4]/`` and so
on (TensorBoard names the runs after these directories), and each job's HPARAMS columns are
``balance`` and ``schedule`` (plus ``status``). A key is named by its last component unless two varied keys
share it. The sweep callback (:mod:`pipetrain.sweep`) tells this module which keys vary when the sweep
starts (:func:`set_swept_keys`); without it, a job is named by all of its overrides.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override

from pipetrain.run_dir import claim_new_dir

__all__ = ["swept_keys", "set_swept_keys", "varied_overrides", "job_name", "job_hparams", "claim_job_dir"]

_MAX_NAME_BYTES = 200
_UNSAFE = re.compile(r"[/\x00-\x1f\x7f]")

# Hydra resolves a job's directory (``hydra.sweep.subdir``) from the job's config alone, which does not say
# which keys the sweep varies; the sweep callback records them here when the sweep starts.
_swept: list[str] | None = None
_job_dirs: dict[tuple[str, int], str] = {}


def swept_keys(overrides: Sequence[str], params: Mapping[str, str] | None = None) -> list[str]:
    """The keys a sweep varies: its command-line overrides with several values (``a=1,2``, ``range(3)``)
    and its ``hydra.sweeper.params`` entries with several values, in command-line order."""
    lines = list(overrides) + [f"{key}={value}" for key, value in (params or {}).items()]
    keys = []
    for item in OverridesParser.create().parse_overrides(lines):
        if item.is_sweep_override() and item.key_or_group not in keys:
            keys.append(item.key_or_group)
    return keys


def set_swept_keys(keys: Sequence[str] | None) -> None:
    """Record the keys the sweep that starts now varies (``None``: unknown)."""
    global _swept
    _swept = None if keys is None else list(keys)
    _job_dirs.clear()


def varied_overrides(job_overrides: Sequence[str]) -> list[str]:
    """The job's overrides of the keys its sweep varies, as given (all of them when unknown)."""
    return [item.input_line for item in _varied(job_overrides).values()]


def job_name(job_overrides: Sequence[str]) -> str:
    """``name=value,...`` over the job's varied overrides; ``""`` when it has none."""
    return ",".join(f"{name}={_typed_text(item)}" for name, item in _varied(job_overrides).items())


def job_hparams(job_overrides: Sequence[str]) -> dict[str, bool | int | float | str]:
    """The job's varied overrides as TensorBoard hparams: numbers and booleans as such, the rest as typed."""
    hparams: dict[str, bool | int | float | str] = {}
    for name, item in _varied(job_overrides).items():
        value = item.value()
        hparams[name] = value if isinstance(value, (bool, int, float)) else _typed_text(item)
    return hparams


def claim_job_dir(sweep_dir: str | os.PathLike, job_num: int, job_overrides: Sequence[str]) -> str:
    """Claim ``<sweep_dir>/<job name>`` for job ``job_num`` (suffixed ``-1``, ... when taken); return its
    name. The same job always gets the same directory; a name too long for a file system is shortened
    and made unique by a hash; a ``/`` in a value becomes ``_``; a job that varies nothing is its number."""
    key = (os.fspath(sweep_dir), int(job_num))
    if key not in _job_dirs:
        name = _UNSAFE.sub("_", job_name(job_overrides)) or str(job_num)
        if len(name.encode()) > _MAX_NAME_BYTES:
            digest = hashlib.sha1(name.encode()).hexdigest()[:10]
            name = name.encode()[: _MAX_NAME_BYTES - 11].decode(errors="ignore") + "-" + digest
        _job_dirs[key] = claim_new_dir(Path(sweep_dir) / name).name
    return _job_dirs[key]


def _varied(job_overrides: Sequence[str]) -> dict[str, Override]:
    """Short name -> override, for the job's overrides of varied keys (all of them when unknown)."""
    parsed = [item for item in OverridesParser.create().parse_overrides(list(job_overrides))]
    parsed = [item for item in parsed if not item.is_delete()]
    if _swept is not None:
        parsed = [item for item in parsed if item.key_or_group in _swept]
    keys = [item.key_or_group for item in parsed]
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {
        (short if last.count(short) == 1 else key): item
        for key, short, item in zip(keys, last, parsed, strict=True)
    }


def _typed_text(item: Override) -> str:
    """The value as the command line gave it (``[2,4]``, ``1f1b``)."""
    return item.input_line.split("=", 1)[1] if "=" in item.input_line else item.get_value_element_as_str()
