"""The rendezvous of one attempt of a run: torchrun's store, with the attempt's keys apart from the others'.

torchrun's agent keeps one key-value store for all attempts of a job: after a restart (``--max-restarts``)
the restarted processes get the same store, still holding what the failed attempt's processes wrote there
(the RPC group's and Gloo's addresses), and a group that reads those connects to processes that are gone.
:data:`INIT_METHOD` is ``env://`` with every key under the attempt's own prefix
(``TORCHELASTIC_RESTART_COUNT``), so each attempt meets only itself; pass it as the ``init_method`` of
``rpc.init_rpc`` or ``torch.distributed.init_process_group``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from urllib.parse import urlparse

import torch.distributed as dist
from torch.distributed.rendezvous import register_rendezvous_handler

__all__ = ["INIT_METHOD", "attempt_prefix"]

_SCHEME = "pipetrain-attempt"
INIT_METHOD = f"{_SCHEME}://"
"""``env://`` (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``), one key space per attempt."""


def attempt_prefix() -> str:
    """The key prefix of this process's attempt: ``pipetrain/attempt_<restart count>/``."""
    return f"pipetrain/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def _attempt_rendezvous(url: str, **kwargs) -> Iterator[tuple[dist.Store, int, int]]:
    query = urlparse(url).query
    store, rank, world_size = next(dist.rendezvous(f"env://?{query}" if query else "env://", **kwargs))
    yield dist.PrefixStore(attempt_prefix(), store), rank, world_size


register_rendezvous_handler(_SCHEME, _attempt_rendezvous)
