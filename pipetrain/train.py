"""Hydra entry point: compose and check the config once, claim the run directory, run it through torchrun.

    python -m pipetrain.train                                      # the default example, 2 stages on CPU
    python -m pipetrain.train experiment=gpt schedule=1f1b pipeline.num_microbatches=8
    python -m pipetrain.train -m pipeline.balance=[2,4],[3,3],[4,2] schedule=gpipe,1f1b   # a sweep
    python -m pipetrain.train experiment=gpt_wide_head pipeline.balance=auto    # profile, pick the split
    python -m pipetrain.train --config-dir my_conf --config-name my_run                # your own configs

Each run (or sweep job) gets its own directory (Hydra's output dir, or ``run_dir=...``) holding
``config.yaml`` (what every process of the run loads), ``tb/``, ``metrics.jsonl``, traces, checkpoints
and ``logs/``. The exit status is non-zero when any run failed (130 when interrupted).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipetrain.balance import AUTO, balance_run, result_record
from pipetrain.balance.report import describe_choice
from pipetrain.build import build_schedule_for, resume_step
from pipetrain.checkpoint import check_run_dir_checkpoints
from pipetrain.compose import (
    CONF_DIR,
    drop_group_arguments_in_app,
    record_auto_balance,
    register_resolvers,
    to_train_config,
    write_run_config,
)
from pipetrain.config import register_schema
from pipetrain.fast_exit import exit_now
from pipetrain.launch import append_train_log, run_torchrun
from pipetrain.preflight import preflight
from pipetrain.run_dir import RunLock, check_writable
from pipetrain.sweep_naming import job_hparams
from pipetrain.topology import Topology, describe_plan
from pipetrain.worker import LOCK_HELD_ENV

__all__ = ["main"]

_RESULTS: list[tuple[Path, int]] = []


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def _run(cfg: DictConfig) -> int:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir).resolve()
    cfg = drop_group_arguments_in_app(cfg)
    if hydra_cfg.mode == RunMode.MULTIRUN and not cfg.log.hparams:
        cfg.log.hparams = job_hparams(list(hydra_cfg.overrides.task))
    try:
        train_cfg = to_train_config(cfg)
        if train_cfg.pipeline.balance == AUTO:
            report = balance_run(train_cfg)  # profiles once per model, micro-batch and device per process
            print(f"pipetrain: {describe_choice(report)}", flush=True)
            cfg = record_auto_balance(cfg, result_record(report))
            train_cfg = to_train_config(cfg)
        plan = preflight(train_cfg)
        check_writable(run_dir)
        lock = RunLock(run_dir).acquire()
        check_run_dir_checkpoints(run_dir, resume_step(train_cfg), train_cfg.checkpoint.resume)
    except ValueError as error:
        print(f"pipetrain: configuration error: {error}", file=sys.stderr, flush=True)
        if run_dir.is_dir():
            append_train_log(run_dir, f"pipetrain: configuration error: {error}")
        _RESULTS.append((run_dir, 2))
        return 2
    with lock:
        config_path = write_run_config(run_dir, cfg)
        topology = Topology.of(build_schedule_for(train_cfg, plan.num_stages), train_cfg.pipeline.replicas)
        print(f"pipetrain: {describe_plan(plan, topology)} -> {run_dir}", flush=True)
        status = run_torchrun(
            topology.world_size,
            ["--config", str(config_path)],
            run_dir,
            env={LOCK_HELD_ENV: "1"},
            max_restarts=train_cfg.train.max_restarts,
        )
    _RESULTS.append((run_dir, status))
    return status


def main() -> None:
    """Console entry: run (or sweep), then exit non-zero if any run failed."""
    _import_from_working_dir()
    register_schema()
    register_resolvers()
    try:
        _check_run_dir_argument(sys.argv[1:])
    except ValueError as error:
        print(f"pipetrain: configuration error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    _run()
    failed = [(run_dir, status) for run_dir, status in _RESULTS if status != 0]
    if len(_RESULTS) > 1:
        print(f"pipetrain: {len(_RESULTS) - len(failed)}/{len(_RESULTS)} runs succeeded", flush=True)
    for run_dir, status in failed:
        outcome = "was interrupted" if status == 130 else f"failed with exit status {status}"
        print(f"pipetrain: run in {run_dir} {outcome}", file=sys.stderr, flush=True)
    exit_now(max((status for _, status in failed), default=0) if len(_RESULTS) == 1 else int(bool(failed)))


def _check_run_dir_argument(args: list[str]) -> None:
    """A ``run_dir=`` override must be writable: checked before Hydra creates its output directory there."""
    for arg in args:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "run_dir" and value not in ("", "null"):
            check_writable(value)


def _import_from_working_dir() -> None:
    """Modules in the working directory are importable, as under ``python -m`` (and in the workers).

    So the ``pipetrain`` command finds ``model._target_=my_pkg.make_model`` wherever
    ``python -m pipetrain.train`` does.
    """
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


if __name__ == "__main__":
    main()
