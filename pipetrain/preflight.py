"""Pre-flight checks: every config mistake we can find before a single process starts.

:func:`preflight` raises one ``ValueError`` whose message names the config key and the fix. It builds the
model on the ``meta`` device (no memory, no compute) to check the stage split and to push one
micro-batch's shape through the whole model.
"""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from pipetrain.build import (
    DATA_SPEC_EXTRAS,
    MODEL_SPEC_EXTRAS,
    build_datasets,
    build_eval_batches,
    build_plan,
    build_schedule_for,
    instantiate_model,
    recomputed_microbatches,
)
from pipetrain.checkpoint import find_checkpoint, read_manifest
from pipetrain.composition import check_model_composes
from pipetrain.config import DATA_PLANES, TrainConfig
from pipetrain.data import check_num_classes
from pipetrain.losses import get_loss
from pipetrain.partition import StagePlan, partition
from pipetrain.schedule import Schedule, splits_backward
from pipetrain.stage import PRECISIONS
from pipetrain.state_checks import check_checkpoint_readable, check_model_init, check_state_fits
from pipetrain.targets import call_target, check_target_arguments

__all__ = ["check_pipeline_split", "check_settings", "preflight", "stage_plan"]

_DEVICES = ("auto", "cpu", "cuda")


def check_settings(cfg: TrainConfig) -> None:
    """Checks of single values that need neither the model nor the data."""
    _at_least(cfg.pipeline.num_microbatches, 1, "pipeline.num_microbatches")
    check_pipeline_split(cfg)
    _at_least(cfg.pipeline.stages_per_worker, 1, "pipeline.stages_per_worker")
    _at_least(cfg.train.steps, 1, "train.steps")
    _at_least(cfg.train.batch_size, 1, "train.batch_size")
    _at_least(cfg.train.log_every, 1, "train.log_every")
    _at_least(cfg.train.max_restarts, 0, "train.max_restarts")
    _at_least(cfg.log.trace_every, 0, "log.trace_every")
    _check_profile_steps(cfg.log.profile_steps, cfg.train.steps)
    _at_least(cfg.checkpoint.every, 0, "checkpoint.every")
    _at_least(cfg.checkpoint.keep_last, 0, "checkpoint.keep_last")
    _at_least(cfg.rpc.num_worker_threads, 1, "rpc.num_worker_threads")
    _at_least(cfg.loader.num_workers, 0, "loader.num_workers")
    _at_least(cfg.loader.prefetch_factor, 1, "loader.prefetch_factor")
    if not cfg.rpc.timeout_s > 0:
        raise ValueError(f"rpc.timeout_s: {cfg.rpc.timeout_s} must be > 0 seconds")
    if cfg.rpc.data_plane not in DATA_PLANES:
        raise ValueError(f"rpc.data_plane: {cfg.rpc.data_plane!r} is not one of {list(DATA_PLANES)}")
    _at_least(cfg.pipeline.replicas, 1, "pipeline.replicas")
    if cfg.train.batch_size % cfg.pipeline.num_microbatches:
        raise ValueError(
            f"train.batch_size: {cfg.train.batch_size} is not divisible by pipeline.num_microbatches="
            f"{cfg.pipeline.num_microbatches}; choose a batch size that is a multiple of it"
        )
    per_step = cfg.pipeline.replicas * cfg.pipeline.num_microbatches
    if cfg.train.batch_size % per_step:
        raise ValueError(
            f"train.batch_size: {cfg.train.batch_size} does not split into pipeline.replicas="
            f"{cfg.pipeline.replicas} x pipeline.num_microbatches={cfg.pipeline.num_microbatches} equal "
            f"micro-batches; choose a batch size that is a multiple of {per_step}"
        )
    if cfg.device not in _DEVICES:
        raise ValueError(f"device: {cfg.device!r} is not one of {list(_DEVICES)}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device: cuda requested but no CUDA device is visible; use device=cpu or device=auto"
        )
    get_loss(cfg.train.loss)
    recomputed_microbatches(cfg.pipeline.activation_checkpointing, cfg.pipeline.num_microbatches)
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision: {cfg.precision!r} is not one of {list(PRECISIONS)}")
    _at_least(cfg.eval.every, 0, "eval.every")
    _at_least(cfg.eval.batches, 0, "eval.batches")
    extras = {"model": MODEL_SPEC_EXTRAS, "data": DATA_SPEC_EXTRAS}
    for key in ("model", "data", "optim"):
        check_target_arguments(getattr(cfg, key), key, skip=extras.get(key, ()))
    if cfg.eval_data:
        check_target_arguments(cfg.eval_data, "eval_data")
    if not cfg.optim.get("_partial_", False):
        raise ValueError(
            "optim._partial_: must be true (each stage builds its optimizer on its own parameters)"
        )
    if cfg.train.clip_grad_norm is not None and not cfg.train.clip_grad_norm > 0:
        raise ValueError(
            f"train.clip_grad_norm: {cfg.train.clip_grad_norm} must be > 0 (or null for no clipping)"
        )
    if cfg.lr_scheduler:
        _check_lr_scheduler(cfg)


def check_pipeline_split(cfg: TrainConfig) -> None:
    """``pipeline.balance`` is ``null``, ``auto`` or a list of unit counts; ``pipeline.num_stages`` fits the
    split; the ``autobalance`` settings are in range."""
    pipeline, balance = cfg.pipeline, cfg.pipeline.balance
    if balance is not None and balance != "auto":
        if not isinstance(balance, (list, tuple)) or not all(
            isinstance(count, int) and not isinstance(count, bool) for count in balance
        ):
            raise ValueError(
                f"pipeline.balance: {balance!r} is neither a list of unit counts (e.g. "
                "pipeline.balance=[3,3]) nor auto (pipeline.balance=auto)"
            )
    if pipeline.num_stages is not None:
        _at_least(pipeline.num_stages, 1, "pipeline.num_stages")
        given = balance if balance not in (None, "auto") else pipeline.stages
        if given is not None and len(given) != pipeline.num_stages:
            raise ValueError(
                f"pipeline.num_stages: {pipeline.num_stages} but the configured split has {len(given)} "
                "stages (pipeline.balance / pipeline.stages); set pipeline.num_stages=null or make them agree"
            )
    elif balance == "auto" and pipeline.stages is None:
        raise ValueError(
            "pipeline.num_stages: pipeline.balance=auto needs the number of stages to cut the model into; "
            "add pipeline.num_stages=2 (or another count)"
        )
    auto = cfg.autobalance
    if auto.max_memory_mib is not None and not auto.max_memory_mib > 0:
        raise ValueError(f"autobalance.max_memory_mib: {auto.max_memory_mib} must be > 0 (or null: no cap)")
    _at_least(auto.warmup, 0, "autobalance.warmup")
    _at_least(auto.repeats, 1, "autobalance.repeats")


def stage_plan(cfg: TrainConfig) -> StagePlan:
    """The stage plan of a configuration that :func:`preflight` already accepted (no checks repeated)."""
    with torch.device("meta"):
        return build_plan(cfg, instantiate_model(cfg))


def preflight(cfg: TrainConfig, check_data: bool = True) -> StagePlan:
    """Every check of :func:`check_settings`, plus the stage split, schedule and data; return the plan.

    ``check_data=False`` skips building the dataset.
    """
    check_settings(cfg)
    with torch.device("meta"):
        model = instantiate_model(cfg)
    check_model_init(cfg.model, model)
    _check_batchnorm_microbatch(cfg, model)
    _check_batchnorm_recompute(cfg, model)
    plan = build_plan(cfg, model)
    partition(model, plan)
    _check_compile(cfg, build_schedule_for(cfg, plan.num_stages))
    if check_data:
        dataset, eval_set = build_datasets(cfg)
        build_eval_batches(cfg, eval_set)
        check_num_classes(dataset, cfg.model, cfg.data)
        if len(dataset) < cfg.train.batch_size:
            raise ValueError(
                f"train.batch_size: {cfg.train.batch_size} is larger than the dataset ({len(dataset)} "
                "samples); lower train.batch_size or use more data"
            )
        _check_shapes(cfg, model, dataset)
        check_model_composes(cfg, dataset)
    if cfg.checkpoint.resume:
        _check_resume(cfg, plan, model)
    return plan


def _check_lr_scheduler(cfg: TrainConfig) -> None:
    """The scheduler spec names a callable that builds a scheduler on the configured optimizer."""
    check_target_arguments(cfg.lr_scheduler, "lr_scheduler")
    if not cfg.lr_scheduler.get("_partial_", False):
        raise ValueError(
            "lr_scheduler._partial_: must be true (each stage builds its scheduler on its own optimizer)"
        )
    probe = call_target(cfg.optim, "optim")([torch.nn.Parameter(torch.zeros(1))])
    try:
        call_target(cfg.lr_scheduler, "lr_scheduler")(probe)
    except Exception as error:
        raise ValueError(
            f"lr_scheduler: {cfg.lr_scheduler['_target_']} cannot be built on the optimizer ({error}); "
            "check its arguments"
        ) from error


def _check_batchnorm_microbatch(cfg: TrainConfig, model: torch.nn.Module) -> None:
    """Refuse micro-batches of one sample for a model with BatchNorm (its statistics need more)."""
    if cfg.train.batch_size // (cfg.pipeline.num_microbatches * cfg.pipeline.replicas) != 1:
        return
    names = [name for name, sub in model.named_modules() if isinstance(sub, _BatchNorm)]
    if names:
        raise ValueError(
            f"pipeline.num_microbatches: train.batch_size={cfg.train.batch_size} in "
            f"{cfg.pipeline.num_microbatches} micro-batches gives micro-batches of 1 sample, but the "
            f"model's BatchNorm layers (e.g. {names[0]!r}) need more than 1 sample for batch statistics; "
            "lower pipeline.num_microbatches or raise train.batch_size so each micro-batch has >= 2 samples"
        )


def _check_batchnorm_recompute(cfg: TrainConfig, model: torch.nn.Module) -> None:
    """Refuse recomputation for a model with BatchNorm: running it twice would update its statistics twice."""
    if cfg.pipeline.activation_checkpointing == "never":
        return
    names = [name for name, sub in model.named_modules() if isinstance(sub, _BatchNorm)]
    if names:
        raise ValueError(
            f"pipeline.activation_checkpointing: {cfg.pipeline.activation_checkpointing} would run the "
            f"model's BatchNorm layers (e.g. {names[0]!r}) twice per micro-batch and update their running "
            "statistics twice; use pipeline.activation_checkpointing=never for this model"
        )


def _check_compile(cfg: TrainConfig, schedule: Schedule) -> None:
    """Refuse ``torch.compile`` under a schedule that splits backward (it runs one graph's backward twice)."""
    if cfg.train.compile and splits_backward(schedule):
        raise ValueError(
            f"train.compile: schedule={cfg.schedule.name} splits each backward into input and weight "
            "gradients, which walks the stage's autograd graph twice; a compiled stage has one fused "
            "backward that runs once. Use train.compile=false, or a schedule of whole backwards "
            "(gpipe, 1f1b, interleaved_1f1b)"
        )


def _check_resume(cfg: TrainConfig, plan: StagePlan, model: torch.nn.Module) -> None:
    step_dir = find_checkpoint(cfg.checkpoint.resume)
    saved = check_checkpoint_readable(step_dir)
    manifest = read_manifest(step_dir)
    saved_units = [name for names in manifest["stages"] for name in names]
    units = [name for names in plan.stages for name in names]
    if saved_units != units:
        raise ValueError(
            f"checkpoint.resume: {str(step_dir)!r} was saved from a model with units {saved_units}, but this "
            f"model has {units}; resume with the same model config"
        )
    step = int(manifest["step"])
    if step >= cfg.train.steps:
        raise ValueError(
            f"checkpoint.resume: the checkpoint is at step {step} and train.steps={cfg.train.steps}; "
            "raise train.steps to train further"
        )
    check_state_fits("checkpoint.resume", saved, model, cfg.model, str(step_dir))


def _check_shapes(cfg: TrainConfig, model: torch.nn.Module, dataset) -> None:
    sample, target = dataset[0]
    micro_batch = cfg.train.batch_size // (cfg.pipeline.num_microbatches * cfg.pipeline.replicas)
    inputs = torch.as_tensor(sample).unsqueeze(0).expand(micro_batch, *torch.as_tensor(sample).shape)
    targets = torch.as_tensor(target).unsqueeze(0).expand(micro_batch, *torch.as_tensor(target).shape)
    try:
        output = model(inputs.to("meta"))
        get_loss(cfg.train.loss)(output, targets.to("meta"))
    except (RuntimeError, ValueError, IndexError, TypeError) as error:
        raise ValueError(
            f"data: a sample of shape {tuple(inputs.shape[1:])} ({inputs.dtype}) with target "
            f"{tuple(targets.shape[1:])} does not fit model {cfg.model['_target_']} and train.loss="
            f"{cfg.train.loss} ({error}); pick a data / model pair that matches"
        ) from None


def _check_profile_steps(steps: list[int], num_steps: int) -> None:
    """Every profiled step is one the run takes: an integer within ``1..train.steps``."""
    for step in steps:
        if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= num_steps:
            raise ValueError(
                f"log.profile_steps: step {step!r} is not within 1..train.steps={num_steps}; name steps the "
                f"run takes, e.g. log.profile_steps=[{min(num_steps, 5)}]"
            )


def _at_least(value: int, minimum: int, key: str) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}: {value!r} must be an integer >= {minimum}")
