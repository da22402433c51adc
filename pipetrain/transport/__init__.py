"""How the driver reaches its workers: the :class:`WorkerHandle` protocol and its implementations.

``local`` runs every worker in the driver's process, each on a thread of its own (tests, debugging a
split); ``rpc`` reaches worker processes through ``torch.distributed.rpc`` and is the only module that
imports it; ``collectives`` holds the c10d process groups that average gradients across replicas;
``progress_store`` carries worker processes' progress to the driver through the run's rendezvous store.
Both transports drive the same :class:`~pipetrain.runner.WorkerRunner`.
"""

from pipetrain.transport.handle import ProgressTracker, WorkerHandle
from pipetrain.transport.local import LocalWorkerHandle, local_replicas, local_workers

__all__ = ["LocalWorkerHandle", "ProgressTracker", "WorkerHandle", "local_replicas", "local_workers"]
