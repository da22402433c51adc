"""torchrun entry point: rank 0 drives, the others serve as workers, all of them one checked configuration.

    torchrun --nproc-per-node=4 -m pipetrain.worker pipeline.balance=[2,2,2] pipeline.num_microbatches=8
    torchrun --nproc-per-node=5 -m pipetrain.worker pipeline.replicas=2      # 2 replicas x 2 workers + 1
    torchrun --nnodes=2 --nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        -m pipetrain.worker pipeline.balance=[2,2,2]         # multi-node: same command on every node
    torchrun ... -m pipetrain.worker --config runs/.../config.yaml     # a resolved config, as written
    torchrun --nproc-per-node=4 --max-restarts=2 -m pipetrain.worker checkpoint.every=50   # restarts resume

Arguments are Hydra overrides, exactly as for ``python -m pipetrain.train``: rank 0 composes and checks
them, writes ``<run_dir>/config.yaml`` and shares it with the other ranks through torchrun's store.
``python -m pipetrain.train`` runs this module with ``--config``.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from pipetrain.build import build_schedule_for, resume_step
from pipetrain.checkpoint import check_run_dir_checkpoints
from pipetrain.compose import compose_config, load_run_config, to_train_config, write_run_config
from pipetrain.config_share import ConfigRefused, has_shared_store, publish_config, receive_config
from pipetrain.failures import request_interrupt, request_stop
from pipetrain.fast_exit import exit_now
from pipetrain.preflight import preflight, stage_plan
from pipetrain.process_ties import die_with_parent
from pipetrain.restart import LOCK_WAIT_S, driver_exit_status, rejoin_config, restart_count, resume_on_restart
from pipetrain.roles import check_world_size, drive, serve_worker
from pipetrain.run_dir import RunLock, check_writable, default_run_dir
from pipetrain.topology import Topology

__all__ = ["LOCK_HELD_ENV", "main"]

LOCK_HELD_ENV = "PIPETRAIN_RUN_LOCK_HELD"
"""Set by ``pipetrain.train``, which holds the run directory's lock for the whole run."""

WORKER_CONFIG_ERROR_WAIT_S = 10.0
"""How long a worker that stops on a configuration error waits for torchrun to stop it (see
:func:`_leave_the_exit_to_rank_0`)."""


def main(argv: list[str] | None = None) -> int:
    """Run this process's role; return its exit status."""
    args = sys.argv[1:] if argv is None else argv
    faulthandler.enable()  # a fatal signal leaves every thread's Python stack in the process's log
    die_with_parent()  # no worker outlives torchrun
    _stay_on_loopback()
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    _handle_signals(is_driver=rank == 0)
    lock = None
    try:
        if args[:1] == ["--config"]:
            composed = load_run_config(Path(args[1]))
        elif rank == 0:
            rejoined = rejoin_config()
            composed, lock = (load_run_config(rejoined), None) if rejoined else _compose_and_write(args)
        else:
            composed = load_run_config(receive_config()) if has_shared_store() else compose_config(args)
        cfg = to_train_config(composed)
        plan = stage_plan(cfg)
        topology = Topology.of(build_schedule_for(cfg, plan.num_stages), cfg.pipeline.replicas)
        check_world_size(topology, world_size)
        if rank == 0 and lock is None and not os.environ.get(LOCK_HELD_ENV):
            lock = RunLock(cfg.run_dir).acquire(wait_s=LOCK_WAIT_S if restart_count() else 0.0)
    except ValueError as error:  # configuration errors: one line, then a clean exit
        print(f"pipetrain [rank {rank}]: configuration error: {error}", flush=True)
        if rank > 0:
            _leave_the_exit_to_rank_0()
        return 2
    except ConfigRefused:  # rank 0 refused the configuration and said why
        return 2
    if rank > 0:
        return serve_worker(cfg, topology, rank, world_size)
    cfg = resume_on_restart(cfg)
    with lock or nullcontext():
        return driver_exit_status(drive(cfg, plan, world_size, Path(cfg.run_dir)))


def _compose_and_write(overrides: list[str]):
    """Rank 0 of a hand-launched run: compose and check once, claim the run directory, share the config."""
    shared = has_shared_store()
    try:
        composed = compose_config(overrides)
        cfg = to_train_config(composed)
        preflight(cfg)
        run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir()
        check_writable(run_dir)
        lock = RunLock(run_dir).acquire()
        check_run_dir_checkpoints(run_dir, resume_step(cfg), cfg.checkpoint.resume)
    except ValueError as error:
        if shared:
            publish_config(error=str(error))
        raise
    path = write_run_config(run_dir.resolve(), composed)
    if shared:
        publish_config(path.read_text())
    return load_run_config(path), lock


def _leave_the_exit_to_rank_0() -> None:
    """A worker that stops on a configuration error waits, a bounded time, for torchrun to stop it.

    torchrun stops every process as soon as one exits with a failure. A worker can find an error before
    rank 0 does (rank 0 also checks and writes the run directory; it may simply start later), and its exit
    would stop rank 0 before rank 0 says why, or before rank 0 handles the signal at all. Rank 0's exit on
    the same error ends this wait.
    """
    time.sleep(WORKER_CONFIG_ERROR_WAIT_S)


def _handle_signals(is_driver: bool) -> None:
    """Ctrl-C is the driver's to handle: it finishes the step and saves; the workers ignore it."""
    if not is_driver:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return
    signal.signal(signal.SIGINT, _on_interrupt)
    signal.signal(signal.SIGTERM, lambda signum, frame: request_stop())


def _on_interrupt(signum: int, frame: object) -> None:
    if request_interrupt():
        print("pipetrain: interrupted again: stopping at once", flush=True)
        os._exit(130)
    print(
        "pipetrain: interrupted: finishing the current step, then saving a checkpoint "
        "(interrupt again to stop at once)",
        flush=True,
    )


def _stay_on_loopback() -> None:
    """A rendezvous on loopback keeps RPC's own sockets on loopback too (unless told otherwise)."""
    if os.environ.get("MASTER_ADDR", "127.0.0.1") in ("127.0.0.1", "localhost", "::1"):
        os.environ.setdefault("TP_SOCKET_IFNAME", "lo")
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


if __name__ == "__main__":
    exit_now(main())
