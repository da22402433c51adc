"""Per-stage checkpoints keyed by full-model names; resume under any split; merge into one state dict.

Layout of ``<run_dir>/checkpoints/step_<N>/``: one ``stage<k>.pt`` per stage (parameters and buffers under
their names in the unsplit model, optimizer state keyed by parameter name, RNG state) and ``manifest.json``
(step, split, schedule, optimizer class and ``optim`` settings). A checkpoint is written into
``step_<N>.partial/`` and renamed to ``step_<N>`` only once every stage file and the manifest are on disk,
so a run killed while saving leaves the previous checkpoint as it was; an existing ``step_<N>`` is never
replaced. Multi-node runs need ``run_dir`` on storage every node sees.

A resumed run takes its weights and per-parameter optimizer state (moments, momentum buffers, step
counts) from the checkpoint, and its learning rate and other hyper-parameters from the config; with
another optimizer class its optimizer state starts fresh (:func:`resume_notice` says what changed).

    python -m pipetrain.checkpoint merge runs/.../checkpoints/step_100 model.pt   # for the unsplit model
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipetrain.stage import Stage
from pipetrain.targets import call_target

__all__ = [
    "MANIFEST",
    "partial_dir",
    "save_stage",
    "commit_checkpoint",
    "find_checkpoint",
    "read_manifest",
    "SavedCheckpoint",
    "load_checkpoint",
    "merged_model_state",
    "restore_stage",
    "optimizer_class_name",
    "optimizer_manifest",
    "resume_notice",
    "complete_checkpoints",
    "written_bytes",
    "prune_checkpoints",
    "remove_stale_partials",
    "check_run_dir_checkpoints",
    "main",
]

MANIFEST = "manifest.json"
_FORMAT = 1


def partial_dir(checkpoints_dir: Path, step: int) -> Path:
    """The directory a checkpoint of ``step`` is written into before it is committed."""
    return Path(checkpoints_dir) / f"step_{step}.partial"


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_stage(stage: Stage, directory: str | Path, step: int) -> str:
    """Write ``stage<k>.pt`` for ``stage`` into ``directory`` (atomically); return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = [stage.module.to_full_name(name) for name, _ in stage.module.named_parameters()]
    no_optimizer = {"state": {}, "param_groups": []}  # a stage without parameters
    optimizer_state = stage.optimizer.state_dict() if stage.optimizer is not None else no_optimizer
    by_index = dict(enumerate(names))
    payload = {
        "format": _FORMAT,
        "stage_idx": stage.stage_idx,
        "step": step,
        "unit_names": list(stage.module.unit_names),
        "model": {name: value.detach().cpu() for name, value in stage.module.full_state_dict().items()},
        "optimizer": {
            "state": {by_index[idx]: _to_cpu(state) for idx, state in optimizer_state["state"].items()},
            "param_groups": [
                {**group, "params": [by_index[idx] for idx in group["params"]]}
                for group in optimizer_state["param_groups"]
            ],
            "class": None if stage.optimizer is None else optimizer_class_name(type(stage.optimizer)),
        },
        "rng": {"torch": torch.get_rng_state()},
    }
    path = directory / f"stage{stage.stage_idx}.pt"
    _atomic_save(payload, path)
    return str(path)


def _to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    return {key: value.cpu() if torch.is_tensor(value) else value for key, value in state.items()}


def commit_checkpoint(directory: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest into a complete ``step_<N>.partial`` directory and rename it to ``step_<N>``.

    An existing ``step_<N>`` is never replaced: ``FileExistsError`` instead.
    """
    directory = Path(directory)
    final = directory.with_name(directory.name.removesuffix(".partial"))
    if final.exists():
        raise FileExistsError(
            f"checkpoint: {final} already exists and a checkpoint is never replaced; this run's "
            f"{final.name} stays unfinished in {directory}. Give each run its own run_dir (or continue "
            f"the run that wrote it with checkpoint.resume={final.parent})"
        )
    manifest_tmp = directory / (MANIFEST + ".tmp")
    manifest_tmp.write_text(json.dumps({"format": _FORMAT, **manifest}, indent=2, default=str))
    os.replace(manifest_tmp, directory / MANIFEST)
    os.replace(directory, final)
    return final


def complete_checkpoints(checkpoints_dir: str | Path) -> list[tuple[int, Path]]:
    """The committed ``(step, step_<N> directory)`` pairs in ``checkpoints_dir``, oldest first."""
    return sorted(
        (int(child.name.removeprefix("step_")), child)
        for child in Path(checkpoints_dir).glob("step_*")
        if child.name.removeprefix("step_").isdigit() and (child / MANIFEST).is_file()
    )


def find_checkpoint(path: str | Path) -> Path:
    """A committed step directory: ``path`` itself, or the latest ``step_<N>`` inside it."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    steps = complete_checkpoints(path)
    if not steps:
        raise ValueError(
            f"checkpoint.resume: {str(path)!r} holds no complete checkpoint (a step_<N> directory with "
            f"{MANIFEST}); point it at a run's checkpoints/ or checkpoints/step_<N> directory"
        )
    return steps[-1][1]


def read_manifest(step_dir: str | Path) -> dict[str, Any]:
    """The manifest of a committed checkpoint."""
    return json.loads((Path(step_dir) / MANIFEST).read_text())


@dataclass(frozen=True)
class SavedCheckpoint:
    """A committed checkpoint, read once: the merged state every stage restores its part from."""

    step: int
    model_state: dict[str, torch.Tensor]
    """Parameters and buffers of the whole model, by full-model name."""
    optimizer_state: dict[str, Any]
    """Per-parameter optimizer state, by full-model name."""
    param_groups: list[dict[str, Any]]
    """Optimizer hyper-parameters as saved (of stage 0's optimizer); not restored: the config's apply."""
    rng_by_stage: dict[tuple[int, tuple[str, ...]], torch.Tensor]
    """RNG state by ``(stage index, unit names)``: restored only under the same split."""
    optimizer_class: str | None = None
    """The optimizer class that kept ``optimizer_state`` (``None``: a checkpoint that did not record it)."""


def load_checkpoint(step_dir: str | Path) -> SavedCheckpoint:
    """Read every stage file of a committed checkpoint."""
    step_dir = Path(step_dir)
    manifest = read_manifest(step_dir)
    model_state: dict[str, torch.Tensor] = {}
    optimizer_state: dict[str, Any] = {}
    param_groups: list[dict[str, Any]] = []
    rng: dict[tuple[int, tuple[str, ...]], torch.Tensor] = {}
    optimizer_class = manifest.get("optimizer_class")
    for idx in range(manifest["num_stages"]):
        payload = torch.load(step_dir / f"stage{idx}.pt", map_location="cpu", weights_only=False)
        model_state.update(payload["model"])
        saved_optimizer = payload.get("optimizer") or {}
        optimizer_state.update(saved_optimizer.get("state", {}))
        param_groups = param_groups or saved_optimizer.get("param_groups", [])
        optimizer_class = optimizer_class or saved_optimizer.get("class")
        rng[(payload["stage_idx"], tuple(payload["unit_names"]))] = payload["rng"]["torch"]
    return SavedCheckpoint(
        int(manifest["step"]), model_state, optimizer_state, param_groups, rng, optimizer_class
    )


def merged_model_state(step_dir: str | Path) -> dict[str, torch.Tensor]:
    """One ``state_dict`` of the unsplit model, from every stage file of a checkpoint."""
    return load_checkpoint(step_dir).model_state


def restore_stage(stage: Stage, saved: SavedCheckpoint) -> None:
    """Load weights, per-parameter optimizer state and (same split only) RNG into ``stage``.

    Works under a different split: every parameter is found by its full-model name in whichever stage
    file held it, with its optimizer state when the saved optimizer kept state per parameter. The
    optimizer's hyper-parameters (learning rate, ...) stay those of the config it was built from; its
    state starts fresh when the checkpoint's optimizer was of another class, or kept state that does
    not fit this one (see :func:`resume_notice`).
    """
    stage.module.load_full_state_dict(saved.model_state)
    if stage.optimizer is not None:  # a stage without parameters has none
        _restore_optimizer_state(stage, saved)
    rng = saved.rng_by_stage.get((stage.stage_idx, tuple(stage.module.unit_names)))
    if rng is not None:
        torch.set_rng_state(rng)


def _restore_optimizer_state(stage: Stage, saved: SavedCheckpoint) -> None:
    """Load the saved per-parameter state of ``stage``'s parameters, keeping the optimizer's settings."""
    optimizer = stage.optimizer
    restore, _ = _optimizer_verdict(
        saved.optimizer_class,
        type(optimizer),
        _key_sets(saved.optimizer_state),
        lambda: _state_keys_of_same_optimizer(optimizer),
    )
    if not restore:
        return
    names = [stage.module.to_full_name(name) for name, _ in stage.module.named_parameters()]
    state = {
        idx: saved.optimizer_state[name] for idx, name in enumerate(names) if name in saved.optimizer_state
    }
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def optimizer_class_name(cls: type) -> str:
    """``module.QualName`` of an optimizer class, as checkpoints record it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def optimizer_manifest(optim_spec: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's record of the optimizer: its class and the ``optim`` settings it is built with.

    The class is ``None`` when the optimizer cannot be built on a probe parameter; a resume then reads it
    from the stage files, which record it too.
    """
    try:
        optimizer_class = optimizer_class_name(type(_configured_optimizer(optim_spec)[0]))
    except Exception:  # noqa: BLE001 - the stage files name the class as well
        optimizer_class = None
    return {"optimizer_class": optimizer_class, "optim": _plain(dict(optim_spec))}


def resume_notice(
    step_dir: str | Path, optim_spec: Mapping[str, Any], lr_scheduler_spec: Mapping[str, Any] | None = None
) -> str:
    """One line saying what a run resuming ``step_dir`` with ``optim_spec`` changes versus the checkpoint.

    E.g. ``pipetrain: resuming from .../step_5: optim.lr 0.01 -> 0.5``, or ``... optimizer AdamW -> SGD:
    its state starts fresh``. Reads the manifest and the stage files' optimizer entries (memory-mapped).
    A learning-rate schedule is rebuilt from the config and advanced to the checkpoint's step; a changed
    ``lr_scheduler`` is named too.
    """
    step_dir = Path(step_dir)
    manifest = read_manifest(step_dir)
    state_keys, param_groups, file_class = _saved_optimizer_outline(step_dir, manifest)
    optimizer, probe = _configured_optimizer(optim_spec)
    _, notice = _optimizer_verdict(
        manifest.get("optimizer_class") or file_class,
        type(optimizer),
        state_keys,
        lambda: _state_keys_after_one_step(optimizer, probe),
    )
    changes = [notice] if notice else []
    changes += _setting_changes(_saved_settings(manifest, param_groups, optim_spec), optim_spec)
    if lr_scheduler_spec is not None and "lr_scheduler" in manifest:
        saved_schedule, schedule = manifest["lr_scheduler"] or {}, _plain(dict(lr_scheduler_spec))
        if saved_schedule != schedule:
            changes.append(
                f"lr_scheduler {_describe_schedule(saved_schedule)} -> {_describe_schedule(schedule)} "
                f"(the new schedule continues from step {manifest['step']})"
            )
    return f"pipetrain: resuming from {step_dir}: {'; '.join(changes) or 'optimizer and settings as saved'}"


_RESERVED = ("_target_", "_partial_")
_UNSET = object()


def _describe_schedule(spec: Mapping[str, Any]) -> str:
    """``CosineAnnealingLR(T_max=100)``, or ``none``."""
    if not spec:
        return "none"
    arguments = ", ".join(f"{key}={value}" for key, value in spec.items() if key not in _RESERVED)
    return f"{str(spec.get('_target_')).rpartition('.')[2]}({arguments})"


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists), so saved and configured values compare."""
    return json.loads(json.dumps(value, default=str))


def _configured_optimizer(optim_spec: Mapping[str, Any]) -> tuple[torch.optim.Optimizer, torch.Tensor]:
    """The configured optimizer, built on a one-element probe parameter (on the CPU)."""
    probe = torch.zeros(1, requires_grad=True)
    return call_target(optim_spec, "optim")([probe]), probe


def _state_keys_after_one_step(optimizer: torch.optim.Optimizer, probe: torch.Tensor) -> frozenset | None:
    """The state keys ``optimizer`` keeps for ``probe`` after one step (``None``: it cannot step so)."""
    probe.grad = torch.zeros_like(probe)
    try:
        optimizer.step()
    except Exception:  # noqa: BLE001 - e.g. an optimizer that needs a closure: unknown
        return None
    return frozenset(optimizer.state.get(probe, {}))


def _state_keys_of_same_optimizer(optimizer: torch.optim.Optimizer) -> frozenset | None:
    """The state keys an optimizer of ``optimizer``'s class and settings keeps per parameter."""
    cls = type(optimizer)
    settings = {key: value for key, value in optimizer.param_groups[0].items() if key != "params"}
    probe = torch.zeros(1, requires_grad=True)
    try:
        accepted = inspect.signature(cls).parameters
        twin = cls([probe], **{key: value for key, value in settings.items() if key in accepted})
    except Exception:  # noqa: BLE001 - a constructor we cannot call from its settings: unknown
        return None
    return _state_keys_after_one_step(twin, probe)


def _key_sets(optimizer_state: Mapping[str, Mapping[str, Any]]) -> set[frozenset]:
    """The distinct sets of state keys saved per parameter."""
    return {frozenset(state) for state in optimizer_state.values()}


def _optimizer_verdict(
    saved_class: str | None,
    current: type,
    saved_keys: set[frozenset],
    expected_keys: Callable[[], frozenset | None],
) -> tuple[bool, str | None]:
    """Whether saved optimizer state is loaded into an optimizer of class ``current``; the notice if any.

    Another class starts fresh. The same class loads state that holds every key it keeps. A checkpoint
    that did not record its class loads state only when its keys are exactly those ``current`` keeps.
    """
    name = current.__name__
    if saved_class is not None and saved_class != optimizer_class_name(current):
        return False, f"optimizer {saved_class.rpartition('.')[2]} -> {name}: its state starts fresh"
    if not saved_keys:
        return True, None
    expected = expected_keys()
    shown = ", ".join(sorted({key for keys in saved_keys for key in keys}))
    if saved_class is not None:
        if expected is None or all(expected <= keys for keys in saved_keys):
            return True, None
        return False, (
            f"the saved optimizer state ({shown}) does not fit {name} as configured (it keeps "
            f"{', '.join(sorted(expected)) or 'none'}): its state starts fresh"
        )
    if expected is not None and all(keys == expected for keys in saved_keys):
        return True, f"the checkpoint does not name its optimizer; its state ({shown}) fits {name}: restored"
    return False, (
        f"the checkpoint does not name its optimizer and its state ({shown}) does not fit {name}: "
        "its state starts fresh"
    )


def _saved_optimizer_outline(
    step_dir: Path, manifest: Mapping[str, Any]
) -> tuple[set[frozenset], list[dict[str, Any]], str | None]:
    """Per-parameter state key sets, stage 0's param groups and the class the stage files record."""
    key_sets: set[frozenset] = set()
    param_groups: list[dict[str, Any]] = []
    saved_class = None
    for idx in range(manifest["num_stages"]):
        payload = torch.load(step_dir / f"stage{idx}.pt", map_location="cpu", mmap=True, weights_only=False)
        saved_optimizer = payload.get("optimizer") or {}
        key_sets |= _key_sets(saved_optimizer.get("state", {}))
        param_groups = param_groups or saved_optimizer.get("param_groups", [])
        saved_class = saved_class or saved_optimizer.get("class")
    return key_sets, param_groups, saved_class


def _saved_settings(
    manifest: Mapping[str, Any], param_groups: list[dict[str, Any]], optim_spec: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``optim`` settings of the checkpoint: the manifest's, else those in its first param group."""
    if "optim" in manifest:
        return {key: value for key, value in manifest["optim"].items() if key not in _RESERVED}
    group = param_groups[0] if param_groups else {}
    return {key: _plain(group[key]) for key in optim_spec if key not in _RESERVED and key in group}


def _setting_changes(saved: Mapping[str, Any], optim_spec: Mapping[str, Any]) -> list[str]:
    """``optim.<key> <saved> -> <configured>`` for every setting that differs."""
    configured = {key: _plain(value) for key, value in optim_spec.items() if key not in _RESERVED}
    changes = []
    for key in [*configured, *(key for key in saved if key not in configured)]:
        before, after = saved.get(key, _UNSET), configured.get(key, _UNSET)
        if before != after:
            changes.append(f"optim.{key} {_shown(before)} -> {_shown(after)}")
    return changes


def _shown(value: Any) -> str:
    return "(default)" if value is _UNSET else json.dumps(value)


def written_bytes(directory: str | Path) -> int:
    """Total size of the files in ``directory`` (0 when it is not there): how far a save has come."""
    total = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    total += entry.stat().st_size
                except OSError:  # a stage file's .tmp renamed meanwhile
                    continue
    except OSError:  # not there (yet): nothing written
        return total
    return total


def prune_checkpoints(checkpoints_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete committed checkpoints older than the newest ``keep_last`` (``0``: keep all); return them.

    The newest checkpoint and ``step_<N>.partial`` directories are never deleted.
    """
    if keep_last <= 0:
        return []
    doomed = [path for _, path in complete_checkpoints(checkpoints_dir)[:-keep_last]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def remove_stale_partials(checkpoints_dir: str | Path) -> list[Path]:
    """Delete the ``step_<N>.partial`` directories that runs killed while saving left; return them.

    Call it only while no other run writes into ``checkpoints_dir`` (the run directory's lock).
    """
    stale = sorted(path for path in Path(checkpoints_dir).glob("step_*.partial") if path.is_dir())
    for path in stale:
        shutil.rmtree(path)
    return stale


def check_run_dir_checkpoints(run_dir: str | Path, start_step: int, resume: str | Path | None = None) -> None:
    """Refuse a run directory that holds checkpoints this run would collide with, before launch.

    A run starting at ``start_step`` writes ``step_<N>`` for ``N > start_step``: a committed checkpoint of
    a step ``>= start_step`` in ``<run_dir>/checkpoints`` is a ``ValueError`` naming ``run_dir``, except
    the one the run resumes from (``resume``, as ``checkpoint.resume`` gives it).
    """
    checkpoints_dir = Path(run_dir) / "checkpoints"
    resumed = find_checkpoint(resume).resolve() if resume else None
    clashing = [
        path
        for step, path in complete_checkpoints(checkpoints_dir)
        if step >= start_step and path.resolve() != resumed
    ]
    if not clashing:
        return
    names = ", ".join(path.name for path in clashing[:3]) + (" ..." if len(clashing) > 3 else "")
    continue_it = "" if resume else f", or continue that run with checkpoint.resume={checkpoints_dir}"
    raise ValueError(
        f"run_dir: {str(run_dir)!r} already holds checkpoints ({names}) of step >= {start_step}, the step "
        f"this run starts from; checkpoints are never replaced: choose a new run_dir{continue_it}"
    )


def main(argv: list[str] | None = None) -> int:
    """``merge <step_dir> <out.pt>``: write the unsplit model's state dict."""
    parser = argparse.ArgumentParser(prog="python -m pipetrain.checkpoint")
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="merge a step's stage files into one state dict")
    merge.add_argument("step_dir", help="checkpoints/step_<N> (or checkpoints/ for the latest)")
    merge.add_argument("out", help="output .pt path")
    args = parser.parse_args(argv)
    try:
        step_dir = find_checkpoint(args.step_dir)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    state = merged_model_state(step_dir)
    torch.save(state, args.out)
    print(f"wrote {len(state)} tensors from {step_dir} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
