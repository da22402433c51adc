"""Config -> objects: the model, the stage plan, the stages, the schedule and the dataset.

Every process of a run builds the same full model from the same seed (and ``model.init``), then keeps
only its own stage, so all stages start from exactly the weights the unsplit model would have. With
``pipeline.deferred_batchnorm`` the model's BatchNorm layers become
:class:`~pipetrain.batchnorm.DeferredBatchNorm`, committed once per optimizer step of their stage.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from pipetrain.batchnorm import commit_deferred_batchnorm, convert_deferred_batchnorm, deferred_batchnorms
from pipetrain.checkpoint import find_checkpoint, load_checkpoint, read_manifest, restore_stage
from pipetrain.config import TrainConfig
from pipetrain.data import EvalBatches, hold_out
from pipetrain.losses import get_loss
from pipetrain.models import model_units
from pipetrain.partition import StageModule, StagePlan, partition, plan_stages
from pipetrain.schedule import Schedule, build_schedule
from pipetrain.stage import Stage
from pipetrain.targets import call_target
from pipetrain.topology import Topology

__all__ = [
    "MODEL_SPEC_EXTRAS",
    "instantiate_model",
    "build_model",
    "build_plan",
    "build_schedule_for",
    "DATA_SPEC_EXTRAS",
    "build_dataset",
    "build_datasets",
    "build_eval_batches",
    "CHECKPOINTING_MODES",
    "recomputed_microbatches",
    "build_stage",
    "build_stages",
    "build_worker_stages",
    "resume_step",
]

MODEL_SPEC_EXTRAS = ("init",)
"""Keys of the ``model`` spec that pipetrain reads itself instead of passing to the builder."""
DATA_SPEC_EXTRAS = ("eval_split",)
"""Keys of the ``data`` spec that pipetrain reads itself instead of passing to the builder."""


def instantiate_model(cfg: TrainConfig) -> nn.Module:
    """The model as ``model._target_`` builds it from ``cfg.seed`` (under ``torch.device("meta")``: shapes
    only), checked to be an ``nn.Module``; nothing loaded or converted yet."""
    torch.manual_seed(cfg.seed)
    model = call_target(cfg.model, "model", skip=MODEL_SPEC_EXTRAS)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model._target_: {cfg.model['_target_']} returned {type(model).__name__}, not an nn.Module"
        )
    return model


def build_model(cfg: TrainConfig) -> nn.Module:
    """The full model, initialised from ``cfg.seed``, then from ``model.init`` when set.

    With ``pipeline.deferred_batchnorm`` its BatchNorm layers are then converted (keeping the loaded
    values: the model loads ``model.init`` as the user built it, and names do not change).
    """
    model = instantiate_model(cfg)
    init_path = cfg.model.get("init")
    if init_path:
        state = torch.load(init_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    if cfg.pipeline.deferred_batchnorm:
        model = convert_deferred_batchnorm(model)
    return model


def build_plan(cfg: TrainConfig, model: nn.Module) -> StagePlan:
    """Check ``pipeline.stages`` / ``pipeline.balance`` against the model's units."""
    names = [name for name, _ in model_units(model)]
    return plan_stages(names, stages=cfg.pipeline.stages, balance=cfg.pipeline.balance)


def build_schedule_for(cfg: TrainConfig, num_stages: int) -> Schedule:
    """The schedule named by ``schedule.name`` for this run (it places the stages on workers)."""
    return build_schedule(
        cfg.schedule.name, num_stages, cfg.pipeline.num_microbatches, cfg.pipeline.stages_per_worker
    )


def build_dataset(cfg: TrainConfig) -> Dataset:
    """The training dataset named by ``data`` (without the part ``data.eval_split`` holds out)."""
    return build_datasets(cfg)[0]


def build_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset | None]:
    """``(train, eval)``: ``data``, minus ``data.eval_split`` of it held out; the evaluation set is
    ``eval_data`` when given, else that held-out part, else ``None``."""
    dataset = call_target(cfg.data, "data", skip=DATA_SPEC_EXTRAS)
    split = cfg.data.get("eval_split")
    if cfg.eval_data and split:
        raise ValueError("data.eval_split: set it or eval_data._target_, not both")
    if split:
        return hold_out(dataset, float(split), cfg.seed)
    return dataset, call_target(cfg.eval_data, "eval_data") if cfg.eval_data else None


def build_eval_batches(cfg: TrainConfig, eval_set: Dataset | None) -> EvalBatches | None:
    """The batches of each evaluation pass (``None`` when ``eval.every`` is 0)."""
    if not cfg.eval.every:
        return None
    if eval_set is None:
        raise ValueError(
            f"eval.every: {cfg.eval.every} needs an evaluation set; set data.eval_split (e.g. 0.1) or "
            "eval_data._target_"
        )
    return EvalBatches(eval_set, cfg.train.batch_size, cfg.eval.batches)


CHECKPOINTING_MODES = ("never", "except_last", "always")
"""Values of ``pipeline.activation_checkpointing``."""


def recomputed_microbatches(mode: str, num_microbatches: int) -> range:
    """The micro-batches whose activations ``pipeline.activation_checkpointing=mode`` recomputes."""
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(
            f"pipeline.activation_checkpointing: {mode!r} is not one of {list(CHECKPOINTING_MODES)}"
        )
    return {
        "never": range(0),
        "except_last": range(num_microbatches - 1),
        "always": range(num_microbatches),
    }[mode]


def build_stage(
    cfg: TrainConfig, module: StageModule, stage_idx: int, num_stages: int, device: torch.device
) -> Stage:
    """Stage ``stage_idx`` of ``num_stages``, holding ``module``, with its own optimizer.

    Its DeferredBatchNorm layers, if any, commit their statistics each time the stage steps.
    """
    stage = Stage(
        stage_idx=stage_idx,
        num_stages=num_stages,
        module=module,
        device=device,
        optimizer_factory=call_target(cfg.optim, "optim"),
        loss_fn=get_loss(cfg.train.loss),
        loss_scale=1.0 / cfg.pipeline.num_microbatches,
        stop_on_nan=cfg.train.stop_on_nan,
        lr_scheduler_factory=call_target(cfg.lr_scheduler, "lr_scheduler") if cfg.lr_scheduler else None,
        precision=cfg.precision,
        recompute_microbatches=recomputed_microbatches(
            cfg.pipeline.activation_checkpointing, cfg.pipeline.num_microbatches
        ),
    )
    _commit_batchnorm_on_step(stage)
    if cfg.train.compile:
        stage.module.compile()  # in place: parameter names (and so checkpoints) stay the same
    return stage


def _commit_batchnorm_on_step(stage: Stage) -> None:
    """Commit ``stage``'s DeferredBatchNorm statistics right after each of its optimizer steps.

    Through an optimizer step hook; a stage without an optimizer gets its ``step`` wrapped instead.
    """
    module = stage.module
    if not deferred_batchnorms(module):
        return
    optimizer = getattr(stage, "optimizer", None)
    if optimizer is not None:
        optimizer.register_step_post_hook(lambda *_: commit_deferred_batchnorm(module))
        return
    step = stage.step

    def step_and_commit(*args, **kwargs):
        report = step(*args, **kwargs)
        commit_deferred_batchnorm(module)
        return report

    stage.step = step_and_commit


def build_stages(
    cfg: TrainConfig, devices: Sequence[torch.device] | None = None
) -> tuple[StagePlan, list[Stage]]:
    """The plan and all its stages in this process (the in-process pipeline), resumed if configured.

    Stage ``k`` goes to ``devices[k]``, by default to the device of the worker the schedule places it on.
    """
    model = build_model(cfg)
    plan = build_plan(cfg, model)
    if devices is None:
        topology = Topology.of(build_schedule_for(cfg, plan.num_stages))
        devices = [topology.device(cfg.device, topology.worker_of(idx)) for idx in range(plan.num_stages)]
    stages = [
        build_stage(cfg, module, idx, plan.num_stages, devices[idx])
        for idx, module in enumerate(partition(model, plan))
    ]
    _resume(cfg, stages)
    return plan, stages


def build_worker_stages(cfg: TrainConfig, plan: StagePlan, worker_idx: int) -> dict[int, Stage]:
    """The stages worker ``worker_idx`` hosts (stage index -> stage), on its device, resumed if configured.

    Runs in the worker's process: every worker builds the same full model from the same seed and keeps
    only its own stages.
    """
    topology = Topology.of(build_schedule_for(cfg, plan.num_stages))
    local_rank = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None
    rank = int(os.environ["RANK"]) if "RANK" in os.environ else None
    device = topology.device(cfg.device, worker_idx, local_rank, rank)
    modules = partition(build_model(cfg), plan)
    stages = {
        idx: build_stage(cfg, modules[idx], idx, plan.num_stages, device)
        for idx in topology.stages_of(worker_idx)
    }
    _resume(cfg, list(stages.values()))
    return stages


def _resume(cfg: TrainConfig, stages: Sequence[Stage]) -> None:
    """Load the checkpoint into ``stages``; bring their learning-rate schedules to its step."""
    if cfg.checkpoint.resume:
        saved = load_checkpoint(find_checkpoint(cfg.checkpoint.resume))
        for stage in stages:
            restore_stage(stage, saved)
            stage.advance_lr_scheduler(saved.step)


def resume_step(cfg: TrainConfig) -> int:
    """The step a run continues from: that of ``checkpoint.resume``, else 0."""
    if not cfg.checkpoint.resume:
        return 0
    return int(read_manifest(find_checkpoint(cfg.checkpoint.resume))["step"])
