"""Target specs: ``{"_target_": "pkg.mod.fn", "_partial_": bool, **kwargs}`` -> objects.

The ``model``, ``data`` and ``optim`` config keys are target specs, as in Hydra's ``instantiate``; this
module resolves them without Hydra so that the rest of pipetrain works on plain data, and so that every
error names the config key it came from.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Collection, Mapping
from typing import Any

__all__ = ["import_target", "check_target_arguments", "call_target"]

_RESERVED = ("_target_", "_partial_")


def import_target(spec: Mapping[str, Any], key: str) -> Callable[..., Any]:
    """Import the callable named by ``spec["_target_"]``; ``ValueError`` naming ``<key>._target_``."""
    path = spec.get("_target_")
    if not isinstance(path, str) or not path:
        raise ValueError(f"{key}._target_: missing; set it to the dotted path of a callable (pkg.module.fn)")
    module_path, _, attribute = path.rpartition(".")
    if not module_path:
        raise ValueError(f"{key}._target_: {path!r} is not a dotted path; write it as pkg.module.fn")
    try:
        target = getattr(importlib.import_module(module_path), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"{key}._target_: cannot import {path!r} ({error}); check the name and PYTHONPATH"
        ) from error
    if not callable(target):
        raise ValueError(f"{key}._target_: {path!r} is not callable")
    return target


def check_target_arguments(spec: Mapping[str, Any], key: str, skip: Collection[str] = ()) -> None:
    """Refuse arguments in ``spec`` that its target does not accept, naming ``<key>.<argument>``."""
    target = import_target(spec, key)
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = {p.name for p in parameters if p.kind != inspect.Parameter.VAR_POSITIONAL}
    for name in spec:
        if name not in _RESERVED and name not in skip and name not in accepted:
            raise ValueError(
                f"{key}.{name}: {spec['_target_']} takes no argument {name!r} (it takes {sorted(accepted)}); "
                f"remove it with ~{key}.{name} or fix the spelling"
            )


def call_target(spec: Mapping[str, Any], key: str, skip: Collection[str] = (), **extra: Any) -> Any:
    """Call the spec's target with its arguments (minus ``skip``) and ``extra``.

    With ``_partial_: true`` return a ``functools.partial`` instead of calling it.
    """
    target = import_target(spec, key)
    kwargs = {name: value for name, value in spec.items() if name not in _RESERVED and name not in skip}
    kwargs.update(extra)
    if spec.get("_partial_", False):
        return functools.partial(target, **kwargs)
    return target(**kwargs)
