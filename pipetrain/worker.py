"""torchrun entry point: every rank composes the same config; rank 0 drives, rank k+1 serves stage k.

    torchrun --nproc-per-node=4 -m pipetrain.worker pipeline.balance=[2,2,2] pipeline.num_microbatches=8
    torchrun --nnodes=2 --nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        -m pipetrain.worker pipeline.balance=[2,2,2]         # multi-node: same command on every node

Arguments are Hydra overrides, exactly as for ``python -m pipetrain.train``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from pipetrain.compose import compose_config, to_train_config
from pipetrain.preflight import preflight
from pipetrain.roles import check_world_size, drive, serve_stage

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run this process's role; return its exit status."""
    overrides = sys.argv[1:] if argv is None else argv
    _exit_with_launcher()
    _stay_on_loopback()
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    try:
        composed = compose_config(overrides)
        cfg = to_train_config(composed)
        plan = preflight(cfg, check_data=rank == 0)  # only the driver reads data
        check_world_size(plan, world_size)
    except Exception as error:  # configuration errors: one line, on every rank, then a clean exit
        print(f"pipetrain [rank {rank}]: configuration error: {error}", file=sys.stderr, flush=True)
        return 2
    if rank > 0:
        return serve_stage(cfg, plan, rank, local_rank, world_size)
    run_dir = Path(cfg.run_dir or Path("runs") / time.strftime("%Y-%m-%d/%H-%M-%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    composed.run_dir = str(run_dir)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(composed, resolve=True))
    return drive(cfg, plan, world_size, run_dir)


def _stay_on_loopback() -> None:
    """A rendezvous on loopback keeps RPC's own sockets on loopback too (unless told otherwise)."""
    if os.environ.get("MASTER_ADDR", "127.0.0.1") in ("127.0.0.1", "localhost", "::1"):
        os.environ.setdefault("TP_SOCKET_IFNAME", "lo")
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def _exit_with_launcher() -> None:
    """Have the kernel kill this process if its launcher (torchrun) dies, so no worker is orphaned."""
    if sys.platform != "linux":
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
