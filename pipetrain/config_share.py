"""Hand-launched runs: rank 0 composes and checks the config once; every other rank receives its text.

Under ``torchrun`` the ranks share the launcher agent's key-value store (``MASTER_ADDR:MASTER_PORT``).
Rank 0 publishes the resolved ``config.yaml`` there (or the one-line error that stopped it); the other
ranks wait for it, so a run launched by hand with ``torchrun -m pipetrain.worker`` trains exactly the
configuration that rank 0 checked and wrote, on every node.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta

import torch.distributed as dist

__all__ = ["ConfigRefused", "has_shared_store", "publish_config", "receive_config", "published_config"]

_WAIT_S = 600.0


class ConfigRefused(RuntimeError):
    """Rank 0 refused the run's configuration (it prints why)."""


def has_shared_store() -> bool:
    """Whether this process runs under torchrun's agent, whose store every rank can reach."""
    port = os.environ.get("MASTER_PORT", "0")
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and port.isdigit() and int(port) > 0


def _key(attempt: int | None = None) -> str:
    """The store key of one attempt's config (torchrun's restarts of a run are its attempts 1, 2, ...)."""
    if attempt is None:
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return f"pipetrain/run_config/{attempt}"


def _store(timeout_s: float) -> dist.Store:
    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
    )


def publish_config(text: str | None = None, error: str | None = None) -> None:
    """Rank 0: share the run's resolved config ``text``, or the ``error`` that stopped rank 0."""
    _store(_WAIT_S).set(_key(), json.dumps({"config": text, "error": error}))


def receive_config(timeout_s: float = _WAIT_S) -> str:
    """Other ranks: the config text rank 0 published; :class:`ConfigRefused` when rank 0 refused it."""
    message = json.loads(_store(timeout_s).get(_key()))
    if message["error"] is not None:
        raise ConfigRefused(message["error"])
    return message["config"]


def published_config(attempt: int) -> str | None:
    """The config text rank 0 published in ``attempt`` of this run (``None``: it published none);
    :class:`ConfigRefused` when rank 0 refused the configuration then. Does not wait."""
    store = _store(_WAIT_S)
    if not store.check([_key(attempt)]):
        return None
    message = json.loads(store.get(_key(attempt)))
    if message["error"] is not None:
        raise ConfigRefused(message["error"])
    return message["config"]
