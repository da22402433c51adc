"""Start one run's processes with torchrun on this machine, stream their output, return their status.

Single-node runs rendezvous on a free loopback port and keep RPC (TensorPipe, Gloo) on the loopback
interface: RPC executes pickled calls, so it must never listen where untrusted hosts can reach it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence

__all__ = ["free_loopback_port", "torchrun_command", "run_torchrun"]

_STOP_GRACE_S = 10.0


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(num_processes: int, overrides: Sequence[str], port: int) -> list[str]:
    """The torchrun command line for one driver plus ``num_processes - 1`` stage workers."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={num_processes}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        "-m",
        "pipetrain.worker",
        *overrides,
    ]


def run_torchrun(num_processes: int, overrides: Sequence[str]) -> int:
    """Run torchrun to completion in its own process group; Ctrl-C stops every process of the run."""
    env = dict(os.environ)
    env.setdefault("TP_SOCKET_IFNAME", "lo")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.setdefault("OMP_NUM_THREADS", "1")
    command = torchrun_command(num_processes, overrides, free_loopback_port())
    process = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        return process.wait()
    except KeyboardInterrupt:
        _stop(process)
        return 130
    finally:
        if process.poll() is None:
            _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the whole group (torchrun forwards it to the workers), SIGKILL what is left after a grace."""
    for sig, grace in ((signal.SIGTERM, _STOP_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
