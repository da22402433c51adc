"""What each process of a run does once its config is known: rank 0 drives, the others serve as workers."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipetrain.build import (
    build_datasets,
    build_eval_batches,
    build_schedule_for,
    build_worker_stages,
    resume_step,
)
from pipetrain.config import TrainConfig
from pipetrain.data import BatchOrder
from pipetrain.driver import Driver
from pipetrain.failures import RunStopped, StageFailure
from pipetrain.host_memory import keep_freed_memory
from pipetrain.loader import DataError
from pipetrain.partition import StagePlan
from pipetrain.profiling import warm_up as warm_up_profiler
from pipetrain.run_dir import DRIVER_PID_FILE
from pipetrain.schedule import Schedule
from pipetrain.topology import Topology
from pipetrain.transport.collectives import join_default_group, leave_default_group
from pipetrain.transport.progress_store import ProgressBoard, connect_progress_store
from pipetrain.transport.rpc import (
    DRIVER_NAME,
    init_rpc,
    resolve_data_plane,
    shutdown_rpc,
    start_workers,
    worker_name,
)

__all__ = ["check_world_size", "drive", "serve_worker"]


def check_world_size(topology: Topology, world_size: int) -> None:
    """One driver plus one process per worker of every replica, or a ``ValueError`` saying how to launch."""
    if world_size != topology.world_size:
        workers = f"{topology.num_workers} workers"
        if topology.num_replicas > 1:
            workers = f"{topology.num_replicas} replicas x {topology.num_workers} workers"
        raise ValueError(
            f"pipeline: {topology.num_stages} stages on {workers} need {topology.world_size} processes "
            f"(one driver + one per worker) but the world size is {world_size}; launch with torchrun "
            f"--nproc-per-node={topology.world_size} (or change pipeline.replicas / pipeline.balance / "
            "pipeline.stages / pipeline.stages_per_worker)"
        )


def drive(cfg: TrainConfig, plan: StagePlan, world_size: int, run_dir: Path) -> int:
    """Rank 0: train over RPC stage handles; return the process exit status (130 when interrupted)."""
    (run_dir / DRIVER_PID_FILE).write_text(str(os.getpid()))
    if cfg.train.keep_host_memory:
        keep_freed_memory()
    init_rpc(DRIVER_NAME, 0, world_size, cfg.rpc)
    schedule = build_schedule_for(cfg, plan.num_stages)
    topology = Topology.of(schedule, cfg.pipeline.replicas)
    if _uses_collectives(cfg, topology):
        join_default_group(0, world_size, cfg.rpc.timeout_s)
    with ProgressBoard(connect_progress_store()) as board:
        return _train_on_workers(cfg, plan, schedule, topology, board, run_dir)


def _train_on_workers(
    cfg: TrainConfig,
    plan: StagePlan,
    schedule: Schedule,
    topology: Topology,
    board: ProgressBoard,
    run_dir: Path,
) -> int:
    """The driver's run once RPC is up: start the workers, train, leave the RPC group; the exit status."""
    try:
        handles = start_workers(
            topology,
            schedule,
            build_worker_stages,
            (cfg, plan),
            board,
            cfg.rpc.timeout_s,
            resolve_data_plane(cfg.rpc.data_plane),
        )
    except StageFailure as failure:
        print(f"pipetrain: run stopped: {failure}", flush=True)
        shutdown_rpc(graceful=False)
        return 1
    train_set, eval_set = build_datasets(cfg)
    batches = BatchOrder(train_set, cfg.train.batch_size, cfg.seed)
    driver = Driver(
        cfg, handles, plan, batches, run_dir, eval_batches=build_eval_batches(cfg, eval_set), own_process=True
    )
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
    leave_default_group()
    if driver.interrupted_after is not None:
        print(f"pipetrain: run interrupted after step {driver.interrupted_after}", flush=True)
        return 130
    print(
        f"pipetrain: done (the driver used {driver_load:.0%} of one core); "
        f"TensorBoard: tensorboard --logdir {run_dir}",
        flush=True,
    )
    return 0


def serve_worker(cfg: TrainConfig, topology: Topology, rank: int, world_size: int) -> int:
    """Serve as the worker ``rank`` runs until the driver is done (the driver builds its stages here)."""
    if cfg.train.keep_host_memory:
        keep_freed_memory()
    if cfg.log.profile_steps:
        warm_up_profiler()
    init_rpc(worker_name(topology.worker_at(rank), topology.replica_at(rank)), rank, world_size, cfg.rpc)
    if _uses_collectives(cfg, topology):
        join_default_group(rank, world_size, cfg.rpc.timeout_s)
    shutdown_rpc(graceful=True)
    leave_default_group()
    return 0


def _uses_collectives(cfg: TrainConfig, topology: Topology) -> bool:
    """Whether the run needs c10d: replicas average gradients, the ``c10d`` data plane sends values."""
    return topology.num_replicas > 1 or cfg.rpc.data_plane == "c10d"


def _in_step(step: int | None) -> str:
    return f" in step {step}" if step is not None else ""


def _describe(failure: StageFailure | DataError) -> str:
    """The failure's line, then the traceback of where it happened (once)."""
    if isinstance(failure, StageFailure):
        return str(failure)
    if not failure.details:
        return failure.summary
    return f"{failure.summary}\n--- traceback in the data loader ---\n{failure.details.rstrip()}"
