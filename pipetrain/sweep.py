"""The Hydra callback of a multirun: jobs named by their overrides, failed jobs recorded, a summary.

On by default (``hydra.callbacks.sweep_summary`` in ``pipetrain/conf/train.yaml``)::

    python -m pipetrain.train -m schedule=gpipe,1f1b pipeline.balance=[2,4],[3,3] train.steps=20
    # multirun/<date>/<time>/summary.csv, summary.md: one row per job, fastest first

After each job, ``summary.csv`` and ``summary.md`` are rewritten with every job so far, so a sweep that
stops early still leaves its answer; a failed job is a row with its error, and a row of TensorBoard's
HPARAMS table with ``status`` = ``failed``. At the end the best job and its overrides are printed. Turn it
off with ``~hydra.callbacks.sweep_summary``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipetrain.metrics import log_failed_run
from pipetrain.summary import JobRow, best_row, describe_best, job_row, run_config, run_error, write_summary
from pipetrain.sweep_naming import job_hparams, set_swept_keys, swept_keys, varied_overrides

__all__ = ["SweepSummary"]


class SweepSummary(Callback):
    """Collects one :class:`~pipetrain.summary.JobRow` per job of a multirun and writes the summary."""

    def __init__(self) -> None:
        self.rows: list[JobRow] = []
        self.overrides: dict[int, list[str]] = {}
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        params = OmegaConf.select(config, "hydra.sweeper.params")
        set_swept_keys(
            swept_keys(
                list(config.hydra.overrides.task),
                {str(k): str(v) for k, v in params.items()} if params else None,
            )
        )
        self.rows, self.overrides, self.sweep_dir = [], {}, None

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        try:
            self._record(config, job_return)
        except Exception as error:  # noqa: BLE001 - a summary that cannot be written must not stop the sweep
            print(f"pipetrain: sweep summary: cannot record job {config.hydra.job.num}: {error}", flush=True)

    def _record(self, config: DictConfig, job_return: JobReturn) -> None:
        run_dir = Path(config.hydra.runtime.output_dir)
        job_num = int(config.hydra.job.num)
        overrides = list(job_return.overrides or [])
        status, error = _outcome(job_return, run_dir)
        composed = run_config(run_dir) or _plain(job_return.cfg)
        hparams = (composed.get("log") or {}).get("hparams") or job_hparams(overrides)
        if status not in ("ok", "interrupted") and run_dir.is_dir():
            log_failed_run(run_dir, hparams)
        varied = " ".join(varied_overrides(overrides))
        self.rows.append(job_row(job_num, varied, run_dir, composed, status, error))
        self.overrides[job_num] = overrides
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        write_summary(self.sweep_dir, self.rows)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        set_swept_keys(None)
        if self.sweep_dir is None:
            return
        best = best_row(self.rows)
        if best is not None:
            print(f"pipetrain: {describe_best(self.rows)}", flush=True)
            print(f"pipetrain: its overrides: {' '.join(self.overrides[best.job])}", flush=True)
        print(f"pipetrain: sweep summary: {self.sweep_dir / 'summary.md'}", flush=True)


def _outcome(job_return: JobReturn, run_dir: Path) -> tuple[str, str]:
    """``(status, error)`` of a finished job: ``ok``, ``interrupted`` or ``failed (...)`` and why."""
    # ``return_value`` re-raises a failed job's exception; the stored one is read instead.
    value = job_return._return_value
    if job_return.status == JobStatus.FAILED:
        lines = str(value).splitlines()
        return "failed (exception)", f"{type(value).__name__}: {lines[0] if lines else ''}"
    if value == 0:
        return "ok", ""
    if value == 130:
        return "interrupted", ""
    error = run_error(run_dir) or f"exit status {value}; the output of every process is in {run_dir / 'logs'}"
    return f"failed (exit {value})", error


def _plain(cfg: DictConfig | None) -> dict[str, Any]:
    """The job's composed config as a plain mapping, resolved where it resolves."""
    if cfg is None:
        return {}
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:
        return OmegaConf.to_container(cfg, resolve=False)
