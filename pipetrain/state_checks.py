"""Pre-flight checks of the state a run loads: ``model.init`` files and ``checkpoint.resume`` checkpoints.

Each check opens the files the run would load (memory-mapped: only their metadata is read) and compares
their tensor shapes with the model's ``state_dict()``, built on the ``meta`` device by the pre-flight
checks. Every mistake is one ``ValueError`` naming the config key, the file, the tensor and the fix:

    model.init: head.weight is [1000, 512] in 'resnet18.pt' but [10, 512] in the model; set
    model.num_classes=1000 to build the model the file was saved from, or give a state dict of this model
"""

from __future__ import annotations

import inspect
import pickle
import pickletools
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipetrain.checkpoint import MANIFEST, complete_checkpoints, find_checkpoint, read_manifest
from pipetrain.targets import import_target

__all__ = ["SavedShapes", "check_model_init", "check_checkpoint_readable", "check_state_fits"]

SavedShapes = dict[str, tuple[tuple[int, ...], Path]]
"""Tensor shapes of saved state, by full-model name, with the file that holds each tensor."""

_HOW_TO_MAKE = (
    "torch.save(model.state_dict(), path), or merge a pipetrain checkpoint: "
    "python -m pipetrain.checkpoint merge <checkpoints/step_N> model.pt"
)
_SHOWN = 3
_CONTAINER_MODULES = ("torch._", "__builtin__.", "builtins.", "collections.")
_CUT_SHORT = "not a whole torch.save archive: cut short or overwritten"
_NOT_MODEL_ARGUMENTS = ("_target_", "_partial_", "init")


class _Unreadable(Exception):
    """A checkpoint file that cannot be opened, and why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def check_model_init(model_spec: Mapping[str, Any], model: nn.Module) -> None:
    """Refuse a ``model.init`` that is missing, not a state dict, or does not fit ``model``."""
    init = model_spec.get("init")
    if not init:
        return
    path = Path(init)
    state = _read_state_dict(path)
    saved = {name: (tuple(value.shape), path) for name, value in state.items() if torch.is_tensor(value)}
    check_state_fits("model.init", saved, model, model_spec, str(init))


def check_checkpoint_readable(step_dir: str | Path, key: str = "checkpoint.resume") -> SavedShapes:
    """Open the manifest and every stage file of ``step_dir``; return the saved model tensors' shapes.

    A file that cannot be read is a ``ValueError`` naming it and the previous complete checkpoint.
    """
    step_dir = Path(step_dir)
    try:
        return _saved_shapes(step_dir)
    except _Unreadable as unreadable:
        raise ValueError(
            f"{key}: {unreadable.path} cannot be read ({unreadable.reason}); the checkpoint is "
            f"damaged: {_previous_checkpoint_fix(step_dir, key)}"
        ) from None


def check_state_fits(
    key: str, saved: SavedShapes, model: nn.Module, model_spec: Mapping[str, Any], source: str
) -> None:
    """Refuse saved state whose names or tensor sizes differ from ``model``'s ``state_dict()``.

    Sizes are compared first; a model argument whose value is the model's size of a differing dimension
    is offered as the fix (``model.<argument>=<saved size>``).
    """
    expected = {
        name: tuple(value.shape) for name, value in model.state_dict().items() if torch.is_tensor(value)
    }
    is_init = key == "model.init"
    other = "give a state dict of this model" if is_init else "resume a checkpoint of this model"
    mismatched = [(name, saved[name], expected[name]) for name in expected if name in saved]
    mismatched = [(name, saved_at, shape) for name, saved_at, shape in mismatched if saved_at[0] != shape]
    if mismatched:
        name, (saved_shape, file), shape = mismatched[0]
        more = ""
        if len(mismatched) > 1:
            more = f" (and {len(mismatched) - 1} more: {_listed([m[0] for m in mismatched[1:]])})"
        settings = _size_fixes(mismatched, _model_arguments(model_spec))
        fix = f"set {' '.join(settings)}" if settings else "set the model.* arguments it was saved with"
        raise ValueError(
            f"{key}: {name} is {list(saved_shape)} in {str(file)!r} but {list(shape)} in the model{more}; "
            f"{fix} to build the model the {'file' if is_init else 'checkpoint'} was saved from, or {other}"
        )
    missing = [name for name in expected if name not in saved]
    unexpected = [name for name in saved if name not in expected]
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"the model's {_listed(missing)} are not in it")
    if unexpected:
        parts.append(f"it holds {_listed(unexpected)} that the model has not")
    prefix = _name_prefix(unexpected, expected)
    if prefix is not None:
        fix = (
            f"its names carry the prefix {prefix!r} (saved from a wrapped model); save it without: "
            f"torch.save({{k.removeprefix({prefix!r}): v for k, v in torch.load(path).items()}}, 'model.pt')"
        )
    else:
        fix = f"set the model.* arguments it was saved with (e.g. a depth or layer count), or {other}"
    raise ValueError(f"{key}: {source!r} does not fit the model: {'; '.join(parts)}; {fix}")


def _saved_shapes(step_dir: Path) -> SavedShapes:
    """The model tensors' shapes in every stage file of ``step_dir``; :class:`_Unreadable` otherwise."""
    try:
        num_stages = int(read_manifest(step_dir)["num_stages"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise _Unreadable(step_dir / MANIFEST, _reason(error)) from None
    shapes: SavedShapes = {}
    for idx in range(num_stages):
        path = step_dir / f"stage{idx}.pt"
        if path.is_file() and not zipfile.is_zipfile(path):
            raise _Unreadable(path, _CUT_SHORT)
        try:
            payload = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
            model_state = payload["model"]
            shapes.update(
                {
                    name: (tuple(value.shape), path)
                    for name, value in model_state.items()
                    if torch.is_tensor(value)
                }
            )
        except Exception as error:  # noqa: BLE001 - whatever it is, the file cannot be resumed from
            raise _Unreadable(path, _reason(error)) from None
    return shapes


def _previous_checkpoint_fix(step_dir: Path, key: str) -> str:
    """Resume from the newest readable checkpoint before ``step_dir``, or start without one."""
    name = step_dir.name.removeprefix("step_")
    step = int(name) if name.isdigit() else None
    for earlier_step, earlier in reversed(complete_checkpoints(step_dir.parent)):
        if step is not None and earlier_step >= step:
            continue
        try:
            _saved_shapes(earlier)
        except _Unreadable:
            continue
        return f"resume from the previous complete checkpoint: {key}={earlier}"
    return f"{step_dir.parent} holds no earlier complete checkpoint; start without {key}"


def _read_state_dict(path: Path) -> Mapping[str, Any]:
    """The state dict in ``path`` (memory-mapped), or a ``ValueError`` saying what the file is instead."""
    shown = str(path)
    if not path.exists():
        raise ValueError(
            f"model.init: {shown!r} is not a file (nothing is there); give a full-model state dict: "
            f"{_HOW_TO_MAKE}"
        )
    if path.is_dir():
        raise ValueError(_directory_problem(path))
    if not zipfile.is_zipfile(path) and not path.read_bytes()[:1] == pickle.PROTO:
        raise ValueError(_unreadable_problem(path, None))  # neither torch.save format
    try:
        state = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only load failed" not in str(error).lower():
            raise ValueError(_unreadable_problem(path, error)) from None
        raise ValueError(_pickled_objects_problem(path)) from None
    except Exception as error:  # noqa: BLE001 - any other failure: the file is not a torch.save file
        raise ValueError(_unreadable_problem(path, error)) from None
    problem = _state_dict_problem(state, path)
    if problem:
        raise ValueError(problem)
    return state


def _directory_problem(path: Path) -> str:
    shown = str(path)
    if (path / MANIFEST).is_file() or complete_checkpoints(path):
        return (
            f"model.init: {shown!r} is a pipetrain checkpoint directory, not a state dict file; merge it "
            f"into one: python -m pipetrain.checkpoint merge {find_checkpoint(path)} model.pt, then set "
            f"model.init=model.pt (or continue its run with checkpoint.resume={shown})"
        )
    return f"model.init: {shown!r} is a directory, not a state dict file; give one written by {_HOW_TO_MAKE}"


def _unreadable_problem(path: Path, error: BaseException | None) -> str:
    reason = _reason(error) if error is not None else "it was not written by torch.save, or cut short"
    return (
        f"model.init: {str(path)!r} is not a file torch.load can read ({reason}); give a state dict written "
        f"by {_HOW_TO_MAKE}"
    )


def _pickled_objects_problem(path: Path) -> str:
    """What a file holding pickled objects (not only tensors and containers) holds."""
    names = _pickled_globals(path)
    modules = [name for name in names if _is_module_class(name)]
    shown = str(path)
    if modules:
        return (
            f"model.init: {shown!r} holds a whole pickled module ({modules[0]}), not a state dict; save its "
            f"weights instead: torch.save(model.state_dict(), path) (for a file you trust: "
            f"torch.save(torch.load({shown!r}, weights_only=False).state_dict(), 'model.pt'))"
        )
    what = f" ({_listed(names)})" if names else ""
    return (
        f"model.init: {shown!r} holds pickled objects{what}, not a state dict; give one written by "
        f"{_HOW_TO_MAKE}"
    )


def _pickled_globals(path: Path) -> list[str]:
    """The classes and functions a ``torch.save`` archive's pickle names, outermost first (not executed)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickled = next(name for name in archive.namelist() if name.endswith("/data.pkl"))
            data = archive.read(pickled)
        names, strings = [], []
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":
                names.append(".".join(str(arg).split(" ", 1)))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 - only a description: go without it
        return []
    return [
        name
        for name in dict.fromkeys(names)
        if not name.startswith(_CONTAINER_MODULES) and not name.endswith("Storage")
    ]


def _is_module_class(name: str) -> bool:
    """Whether ``name`` is an ``nn.Module`` subclass of an already imported module (nothing is imported)."""
    module_name, _, qualname = name.rpartition(".")
    target: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        target = getattr(target, part, None)
    return inspect.isclass(target) and issubclass(target, nn.Module)


def _state_dict_problem(state: Any, path: Path) -> str | None:
    """What ``state`` is when it is not a mapping from names to tensors, else ``None``."""
    shown = str(path)
    if not isinstance(state, Mapping):
        return (
            f"model.init: {shown!r} holds a {type(state).__name__}, not a state dict (a mapping from "
            f"parameter names to tensors); give one written by {_HOW_TO_MAKE}"
        )
    if {"stage_idx", "unit_names", "model"} <= set(state):
        return (
            f"model.init: {shown!r} is one stage file of a pipetrain checkpoint, not the whole model's "
            f"state dict; merge the checkpoint: python -m pipetrain.checkpoint merge {path.parent} model.pt, "
            "then set model.init=model.pt"
        )
    others = [k for k, v in state.items() if not torch.is_tensor(v) and not str(k).endswith("_extra_state")]
    if state and not others:
        return None
    nested = [k for k in others if isinstance(state[k], Mapping) and state[k] and _all_tensors(state[k])]
    if nested:
        return (
            f"model.init: {shown!r} holds a dict with entries {_listed(list(state))}, not a state dict; its "
            f"weights look to be under {nested[0]!r}: save them alone: "
            f"torch.save(torch.load({shown!r})[{nested[0]!r}], 'model.pt')"
        )
    what = f"whose entries {_listed(others)} are not tensors" if state else "that is empty"
    return f"model.init: {shown!r} holds a dict {what}, not a state dict; give one written by {_HOW_TO_MAKE}"


def _all_tensors(mapping: Mapping[Any, Any]) -> bool:
    return all(torch.is_tensor(value) for value in mapping.values())


def _model_arguments(model_spec: Mapping[str, Any]) -> dict[str, tuple[int, bool]]:
    """Integer arguments of the model's builder: ``name -> (value, given in the config)``."""
    arguments = {
        name: (value, True)
        for name, value in model_spec.items()
        if name not in _NOT_MODEL_ARGUMENTS and isinstance(value, int) and not isinstance(value, bool)
    }
    try:
        parameters = inspect.signature(import_target(model_spec, "model")).parameters.values()
    except (TypeError, ValueError):
        return arguments
    for parameter in parameters:
        default = parameter.default
        if parameter.name not in arguments and isinstance(default, int) and not isinstance(default, bool):
            arguments[parameter.name] = (default, False)
    return arguments


def _size_fixes(
    mismatched: list[tuple[str, tuple[tuple[int, ...], Path], tuple[int, ...]]],
    arguments: dict[str, tuple[int, bool]],
) -> list[str]:
    """``model.<argument>=<saved size>`` for each argument equal to the model's size of a differing dim."""
    sizes: dict[str, set[int]] = {}
    for _, (saved_shape, _), shape in mismatched:
        if len(saved_shape) != len(shape):
            continue
        for saved_size, size in zip(saved_shape, shape, strict=True):
            if saved_size == size:
                continue
            for name, (value, _) in arguments.items():
                if value == size:
                    sizes.setdefault(name, set()).add(saved_size)
    return [
        f"{'' if arguments[name][1] else '+'}model.{name}={next(iter(found))}"
        for name, found in sizes.items()
        if len(found) == 1
    ]


def _name_prefix(unexpected: list[str], expected: Mapping[str, Any]) -> str | None:
    """A prefix (``module.``) whose removal turns the unexpected names into exactly the model's."""
    if not unexpected or len(unexpected) != len(expected):
        return None
    first = unexpected[0]
    for name in expected:
        if first.endswith("." + name):
            prefix = first[: len(first) - len(name)]
            if {n.removeprefix(prefix) for n in unexpected if n.startswith(prefix)} == set(expected):
                return prefix
    return None


def _listed(names: list[str]) -> str:
    """The first few names, and how many more."""
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" (+{len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")


def _reason(error: BaseException) -> str:
    """The first line of ``error``, shortened."""
    if isinstance(error, FileNotFoundError):
        return "the file is missing"
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(error).__name__}: {text[:160]}" if text else type(error).__name__
