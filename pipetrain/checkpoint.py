"""Per-stage checkpoints keyed by full-model names; resume under any split; merge into one state dict.

Layout of ``<run_dir>/checkpoints/step_<N>/``: one ``stage<k>.pt`` per stage (parameters and buffers under
their names in the unsplit model, optimizer state keyed by parameter name, RNG state) and ``manifest.json``
(step, split, schedule). A checkpoint is written into ``step_<N>.partial/`` and renamed to ``step_<N>``
only once every stage file and the manifest are on disk, so a run killed while saving leaves the previous
checkpoint as it was. Multi-node runs need ``run_dir`` on storage every node sees.

    python -m pipetrain.checkpoint merge runs/.../checkpoints/step_100 model.pt   # for the unsplit model
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipetrain.stage import Stage

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
    optimizer_state = stage.optimizer.state_dict()
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
        },
        "rng": {"torch": torch.get_rng_state()},
    }
    path = directory / f"stage{stage.stage_idx}.pt"
    _atomic_save(payload, path)
    return str(path)


def _to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    return {key: value.cpu() if torch.is_tensor(value) else value for key, value in state.items()}


def commit_checkpoint(directory: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest into a complete ``step_<N>.partial`` directory and rename it to ``step_<N>``."""
    directory = Path(directory)
    manifest_tmp = directory / (MANIFEST + ".tmp")
    manifest_tmp.write_text(json.dumps({"format": _FORMAT, **manifest}, indent=2))
    os.replace(manifest_tmp, directory / MANIFEST)
    final = directory.with_name(directory.name.removesuffix(".partial"))
    if final.exists():
        shutil.rmtree(final)
    os.replace(directory, final)
    return final


def find_checkpoint(path: str | Path) -> Path:
    """A committed step directory: ``path`` itself, or the latest ``step_<N>`` inside it."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    steps = sorted(
        (int(child.name.removeprefix("step_")), child)
        for child in path.glob("step_*")
        if child.name.removeprefix("step_").isdigit() and (child / MANIFEST).is_file()
    )
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
    """Optimizer hyper-parameters (of stage 0's optimizer)."""
    rng_by_stage: dict[tuple[int, tuple[str, ...]], torch.Tensor]
    """RNG state by ``(stage index, unit names)``: restored only under the same split."""


def load_checkpoint(step_dir: str | Path) -> SavedCheckpoint:
    """Read every stage file of a committed checkpoint."""
    step_dir = Path(step_dir)
    manifest = read_manifest(step_dir)
    model_state: dict[str, torch.Tensor] = {}
    optimizer_state: dict[str, Any] = {}
    param_groups: list[dict[str, Any]] = []
    rng: dict[tuple[int, tuple[str, ...]], torch.Tensor] = {}
    for idx in range(manifest["num_stages"]):
        payload = torch.load(step_dir / f"stage{idx}.pt", map_location="cpu", weights_only=False)
        model_state.update(payload["model"])
        optimizer_state.update(payload["optimizer"]["state"])
        param_groups = param_groups or payload["optimizer"]["param_groups"]
        rng[(payload["stage_idx"], tuple(payload["unit_names"]))] = payload["rng"]["torch"]
    return SavedCheckpoint(int(manifest["step"]), model_state, optimizer_state, param_groups, rng)


def merged_model_state(step_dir: str | Path) -> dict[str, torch.Tensor]:
    """One ``state_dict`` of the unsplit model, from every stage file of a checkpoint."""
    return load_checkpoint(step_dir).model_state


def restore_stage(stage: Stage, saved: SavedCheckpoint) -> None:
    """Load weights, optimizer state and (same split only) RNG into ``stage``.

    Works under a different split: every parameter is found by its full-model name in whichever stage
    file held it, with its optimizer state when the saved optimizer kept state per parameter.
    """
    stage.module.load_full_state_dict(saved.model_state)
    names = [stage.module.to_full_name(name) for name, _ in stage.module.named_parameters()]
    groups = [
        {**saved.param_groups[min(i, len(saved.param_groups) - 1)], "params": group["params"]}
        for i, group in enumerate(stage.optimizer.state_dict()["param_groups"])
    ]
    state = {
        idx: saved.optimizer_state[name] for idx, name in enumerate(names) if name in saved.optimizer_state
    }
    stage.optimizer.load_state_dict({"state": state, "param_groups": groups})
    rng = saved.rng_by_stage.get((stage.stage_idx, tuple(stage.module.unit_names)))
    if rng is not None:
        torch.set_rng_state(rng)


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
