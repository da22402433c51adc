"""How the processes of a run are tied to each other, so that a stop reaches the right ones.

- Every process torchrun starts dies with torchrun (:func:`die_with_parent`): none is orphaned.
- The driver's loader processes leave the driver's process group (:func:`detach_loader_process`):
  torchrun stops a run by sending SIGTERM to each process's group. The driver treats it as a request to
  stop and says why the run ended; were its loader processes killed by it too, the ``DataLoader`` would
  raise their deaths in the driver's main thread first, and the driver would die of that, silently, before
  naming the stage that failed. They still die with the driver.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

__all__ = ["die_with_parent", "detach_loader_process"]

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the thread that started it exits (Linux; elsewhere
    nothing)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def detach_loader_process(worker_id: int) -> None:
    """``DataLoader`` ``worker_init_fn``: leave the driver's process group, die with the driver."""
    os.setpgid(0, 0)
    die_with_parent()
