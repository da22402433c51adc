"""Balance a configured run: profile its units (once per model, micro-batch and device), search the split.

:func:`balance_run` is what both ``python -m pipetrain.balance`` and ``pipeline.balance=auto`` call. The
profiles are kept for the life of the process, so a Hydra multirun (whose jobs run in one launcher
process) profiles each distinct model / data / micro-batch / device once, however many jobs share it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from pipetrain.balance.profile import profile_device, profile_units
from pipetrain.balance.search import SplitPrediction, SplitSearch, UnitCost, predict_split, search_split
from pipetrain.balance.search import uniform_balance as _uniform
from pipetrain.config import TrainConfig
from pipetrain.partition import plan_stages
from pipetrain.preflight import check_settings

__all__ = ["AUTO", "BalanceReport", "balance_run", "num_stages_of", "result_record"]

AUTO = "auto"
"""The ``pipeline.balance`` value that asks for a profiled split."""

_MIB = 2**20
_PROFILES: dict[str, list[UnitCost]] = {}


@dataclass(frozen=True)
class BalanceReport:
    """A balanced run: the unit costs, the best split and how the uniform and configured ones compare."""

    units: tuple[UnitCost, ...]
    device: str
    microbatch_size: int
    search: SplitSearch
    uniform: SplitPrediction
    configured: SplitPrediction | None
    """The split the config gave (``None`` with ``pipeline.balance=auto``)."""
    profiled: bool
    """Whether this call profiled (``False``: the profile of an earlier call in this process was reused)."""

    @property
    def best(self) -> SplitPrediction:
        """The chosen split."""
        return self.search.best


def num_stages_of(cfg: TrainConfig) -> int:
    """Stages to balance into: ``pipeline.num_stages``, else the configured split's length."""
    pipeline = cfg.pipeline
    if pipeline.num_stages is not None:
        return pipeline.num_stages
    if pipeline.balance not in (None, AUTO):
        return len(pipeline.balance)
    if pipeline.stages is not None:
        return len(pipeline.stages)
    raise ValueError(
        "pipeline.num_stages: give the number of stages to balance into, e.g. pipeline.num_stages=2"
    )


def balance_run(cfg: TrainConfig) -> BalanceReport:
    """Profile ``cfg``'s units (or reuse this process's profile) and find its best split.

    Raises ``ValueError`` naming the config key for a bad configuration, a unit that fails to run alone, or
    a memory cap no split meets.
    """
    check_settings(cfg)
    num_stages = num_stages_of(cfg)
    device = profile_device(cfg, num_stages)
    key = _profile_key(cfg, str(device))
    profiled = key not in _PROFILES
    if profiled:
        _PROFILES[key] = profile_units(cfg, device, cfg.autobalance.warmup, cfg.autobalance.repeats)
    units = _PROFILES[key]
    cap = cfg.autobalance.max_memory_mib
    search = search_split(
        units,
        cfg.schedule.name,
        num_stages,
        cfg.pipeline.num_microbatches,
        cfg.pipeline.stages_per_worker,
        None if cap is None else cap * _MIB,
    )
    configured = _configured_balance(cfg, [u.name for u in units])
    return BalanceReport(
        units=tuple(units),
        device=str(device),
        microbatch_size=cfg.train.batch_size // cfg.pipeline.num_microbatches,
        search=search,
        uniform=predict_split(units, _uniform(len(units), num_stages), search.schedule),
        configured=None if configured is None else predict_split(units, configured, search.schedule),
        profiled=profiled,
    )


def result_record(report: BalanceReport) -> dict[str, Any]:
    """What a run records of its automatic split (``autobalance.result`` in its config.yaml)."""
    return {
        "balance": list(report.best.balance),
        "predicted_step_time_s": round(report.best.step_time_s, 6),
        "predicted_bubble_fraction": round(report.best.bubble_fraction, 4),
        "predicted_peak_memory_mib": round(report.best.peak_memory_bytes / _MIB, 2),
        "uniform_balance": list(report.uniform.balance),
        "uniform_predicted_step_time_s": round(report.uniform.step_time_s, 6),
        "device": report.device,
        "microbatch_size": report.microbatch_size,
    }


def _configured_balance(cfg: TrainConfig, unit_names: list[str]) -> tuple[int, ...] | None:
    """The configured split as unit counts (``None`` for ``auto``); ``ValueError`` when it does not fit."""
    pipeline = cfg.pipeline
    if pipeline.balance == AUTO:
        return None
    plan = plan_stages(unit_names, stages=pipeline.stages, balance=pipeline.balance)
    return tuple(len(names) for names in plan.stages)


def _profile_key(cfg: TrainConfig, device: str) -> str:
    """What a profile depends on: model, data, optimizer, loss, micro-batch, device, timing settings."""
    return json.dumps(
        {
            "model": cfg.model,
            "data": cfg.data,
            "optim": cfg.optim,
            "loss": cfg.train.loss,
            "batch_size": cfg.train.batch_size,
            "num_microbatches": cfg.pipeline.num_microbatches,
            "seed": cfg.seed,
            "device": device,
            "threads": os.environ.get("OMP_NUM_THREADS"),
            "timing": [cfg.autobalance.warmup, cfg.autobalance.repeats],
            "deferred_batchnorm": cfg.pipeline.deferred_batchnorm,
        },
        sort_keys=True,
        default=str,
    )
