"""Hydra entry point: compose and check the config, make the run directory, run it through torchrun.

    python -m pipetrain.train                                      # the default example, 2 stages on CPU
    python -m pipetrain.train experiment=gpt schedule=1f1b pipeline.num_microbatches=8
    python -m pipetrain.train -m pipeline.balance=[2,4],[3,3],[4,2] schedule=gpipe,1f1b   # a sweep

Each run (or sweep job) gets its own directory (Hydra's output dir) holding ``config.yaml``, ``tb/``,
``metrics.jsonl``, traces and checkpoints. The exit status is non-zero when any run failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pipetrain.compose import to_train_config
from pipetrain.config import register_schema
from pipetrain.launch import run_torchrun
from pipetrain.preflight import preflight

__all__ = ["main"]

_RESULTS: list[tuple[Path, int]] = []


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def _run(cfg: DictConfig) -> int:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(cfg.run_dir or hydra_cfg.runtime.output_dir).resolve()
    try:
        plan = preflight(to_train_config(cfg))
    except ValueError as error:
        print(f"pipetrain: configuration error: {error}", file=sys.stderr, flush=True)
        _RESULTS.append((run_dir, 2))
        return 2
    overrides = [o for o in hydra_cfg.overrides.task if not o.lstrip("+~").startswith("run_dir=")]
    print(f"pipetrain: {plan.num_stages} stages {[list(s) for s in plan.stages]} -> {run_dir}", flush=True)
    status = run_torchrun(plan.num_stages + 1, [*overrides, f"run_dir={run_dir}"])
    _RESULTS.append((run_dir, status))
    return status


def main() -> None:
    """Console entry: run (or sweep), then exit non-zero if any run failed."""
    register_schema()
    _run()
    failed = [(run_dir, status) for run_dir, status in _RESULTS if status != 0]
    if len(_RESULTS) > 1:
        print(f"pipetrain: {len(_RESULTS) - len(failed)}/{len(_RESULTS)} runs succeeded", flush=True)
    for run_dir, status in failed:
        print(f"pipetrain: run in {run_dir} failed with exit status {status}", file=sys.stderr, flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
