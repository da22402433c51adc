"""What each process of a run does once RPC is up: rank 0 drives, rank ``k+1`` serves stage ``k``."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipetrain.build import (
    build_dataset,
    build_model,
    build_schedule_for,
    build_stage,
    resume_step,
    stage_device,
)
from pipetrain.checkpoint import find_checkpoint, load_checkpoint, restore_stage
from pipetrain.config import TrainConfig
from pipetrain.data import BatchOrder
from pipetrain.driver import Driver
from pipetrain.failures import RunStopped, StageFailure
from pipetrain.loader import DataError
from pipetrain.partition import StagePlan, partition
from pipetrain.run_dir import DRIVER_PID_FILE
from pipetrain.transport.rpc import (
    DRIVER_NAME,
    RpcStageHandle,
    StageServer,
    init_rpc,
    serve,
    shutdown_rpc,
    stage_worker_name,
)

__all__ = ["check_world_size", "drive", "serve_stage"]


def check_world_size(plan: StagePlan, world_size: int) -> None:
    """One driver plus one worker per stage, or a ``ValueError`` saying how to launch."""
    if world_size != plan.num_stages + 1:
        raise ValueError(
            f"pipeline: {plan.num_stages} stages need {plan.num_stages + 1} processes (one driver + one per "
            f"stage) but the world size is {world_size}; launch with "
            f"torchrun --nproc-per-node={plan.num_stages + 1} (or change pipeline.balance / pipeline.stages)"
        )


def drive(cfg: TrainConfig, plan: StagePlan, world_size: int, run_dir: Path) -> int:
    """Rank 0: train over RPC stage handles; return the process exit status (130 when interrupted)."""
    (run_dir / DRIVER_PID_FILE).write_text(str(os.getpid()))
    init_rpc(DRIVER_NAME, 0, world_size, cfg.rpc)
    handles = [RpcStageHandle(idx, idx + 1) for idx in range(plan.num_stages)]
    batches = BatchOrder(build_dataset(cfg), cfg.train.batch_size, cfg.seed)
    driver = Driver(cfg, handles, plan, batches, run_dir)
    try:
        wall, cpu = time.monotonic(), time.process_time()
        driver.train(start_step=resume_step(cfg))
        driver_load = (time.process_time() - cpu) / max(time.monotonic() - wall, 1e-9)
    except (StageFailure, DataError) as failure:
        print(f"pipetrain: run stopped{_in_step(failure.step)}: {_describe(failure)}", flush=True)
        shutdown_rpc(graceful=False)
        return 1
    except RunStopped:
        print("pipetrain: run stopped by the launcher (SIGTERM); no stage failure was reported", flush=True)
        shutdown_rpc(graceful=False)
        return 1
    shutdown_rpc(graceful=True)
    if driver.interrupted_after is not None:
        print(f"pipetrain: run interrupted after step {driver.interrupted_after}", flush=True)
        return 130
    print(
        f"pipetrain: done (the driver used {driver_load:.0%} of one core); "
        f"TensorBoard: tensorboard --logdir {run_dir}",
        flush=True,
    )
    return 0


def serve_stage(cfg: TrainConfig, plan: StagePlan, rank: int, local_rank: int, world_size: int) -> int:
    """Rank ``k+1``: build stage ``k`` on its device and serve it until the driver is done."""
    stage_idx = rank - 1
    model = build_model(cfg)
    module = partition(model, plan)[stage_idx]
    stage = build_stage(cfg, module, stage_idx, plan.num_stages, stage_device(cfg, stage_idx, local_rank))
    del model
    if cfg.checkpoint.resume:
        restore_stage(stage, load_checkpoint(find_checkpoint(cfg.checkpoint.resume)))
    serve(StageServer(stage, build_schedule_for(cfg, plan.num_stages)))
    init_rpc(stage_worker_name(stage_idx), rank, world_size, cfg.rpc)
    shutdown_rpc(graceful=True)
    return 0


def _in_step(step: int | None) -> str:
    return f" in step {step}" if step is not None else ""


def _describe(failure: StageFailure | DataError) -> str:
    """The failure's line, then the traceback of where it happened (once)."""
    if isinstance(failure, StageFailure):
        return str(failure)
    if not failure.details:
        return failure.summary
    return f"{failure.summary}\n--- traceback in the data loader ---\n{failure.details.rstrip()}"
