"""Automatic restart: a run that torchrun restarts (``--max-restarts``) resumes from its newest checkpoint.

    python -m pipetrain.train train.max_restarts=2 checkpoint.every=50
    torchrun --nproc-per-node=3 --max-restarts=2 -m pipetrain.worker checkpoint.every=50   # by hand

When a process of the run fails, torchrun stops the others and starts them all again, with
``TORCHELASTIC_RESTART_COUNT`` counting the restarts. The driver then continues from the newest complete
checkpoint this run wrote into its run directory, or, when it wrote none yet, from where the run started
(its ``checkpoint.resume``, else step 0), and says so. The workers build their stages from the config the
driver hands them, so they load the same checkpoint; the data order follows from the step. Rank 0 of a run
launched by hand takes up the run its first attempt started (the same run directory and ``config.yaml``)
instead of composing a new one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipetrain.checkpoint import complete_checkpoints, find_checkpoint, read_manifest
from pipetrain.config import TrainConfig
from pipetrain.config_share import ConfigRefused, has_shared_store, publish_config, published_config

__all__ = [
    "LOCK_WAIT_S",
    "INTERRUPTED",
    "restart_count",
    "resume_point",
    "resume_on_restart",
    "rejoin_config",
    "driver_exit_status",
]

LOCK_WAIT_S = 30.0
"""How long a restarted rank 0 waits for the run directory's lock: processes the failed attempt's driver
forked (its data loader) hold it until they notice their parent is gone."""


INTERRUPTED = 130
"""The driver's exit status after an interrupt (Ctrl-C, SIGINT): it finished its step and saved."""


def restart_count() -> int:
    """How many times torchrun has restarted this run (0: its first attempt, or not under torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def resume_point(run_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint a restarted run continues from: the newest complete one in ``<run_dir>/checkpoints``
    of a step after the run's start, else the run's own ``resume`` (``checkpoint.resume``), else ``None``.

    Only checkpoints of steps after the start are the run's own: a run directory may also hold older
    ones, from a run that this one continues.
    """
    started_from = find_checkpoint(resume) if resume else None
    start_step = int(read_manifest(started_from)["step"]) if started_from is not None else 0
    own = [path for step, path in complete_checkpoints(Path(run_dir) / "checkpoints") if step > start_step]
    return own[-1] if own else started_from


def resume_on_restart(cfg: TrainConfig, print_fn: Callable[[str], Any] = print) -> TrainConfig:
    """``cfg`` as the driver runs it: on a restart, resuming from :func:`resume_point` (said in one line)."""
    count = restart_count()
    if count == 0 or cfg.run_dir is None:
        return cfg
    run_dir = Path(cfg.run_dir)
    point = resume_point(run_dir, cfg.checkpoint.resume)
    limit = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?")
    if point is None:
        print_fn(
            f"pipetrain: restart {count} of {limit} (torchrun): no checkpoint yet: starting over from step 0"
        )
        return cfg
    step = int(read_manifest(point)["step"])
    shown = point.relative_to(run_dir) if point.is_relative_to(run_dir) else point
    print_fn(f"pipetrain: restart {count} of {limit} (torchrun): resuming from step {step} ({shown})")
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=str(point)))


def rejoin_config() -> str | None:
    """Rank 0 of a restarted run launched by hand: the config its first attempt wrote (with that attempt's
    run directory), shared again with the other ranks; ``None`` when this is no restart or the first
    attempt shared none. A ``ValueError`` with the first attempt's reason when it refused the config."""
    if restart_count() == 0 or not has_shared_store():
        return None
    try:
        text = published_config(0)
    except ConfigRefused as refused:
        publish_config(error=str(refused))
        raise ValueError(str(refused)) from None
    if text is not None:
        publish_config(text)
    return text


def driver_exit_status(status: int) -> int:
    """The driver's exit status as torchrun gets it: 0 for a run stopped by an interrupt while torchrun
    may still restart it, which it would do for any non-zero status (the user asked it to stop; the
    driver's last line says so, and ``pipetrain.train`` still exits with 130)."""
    restarts_left = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) - restart_count()
    return 0 if status == INTERRUPTED and restarts_left > 0 else status
