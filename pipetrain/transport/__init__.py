"""How the driver reaches its stages: the :class:`StageHandle` protocol and its implementations.

``local`` runs every stage in the driver's process (tests, debugging a split); ``rpc`` reaches stage
workers through ``torch.distributed.rpc`` and is the only module that imports it.
"""

from pipetrain.transport.handle import IssuedAction, StageHandle
from pipetrain.transport.local import LocalStageHandle

__all__ = ["IssuedAction", "StageHandle", "LocalStageHandle"]
