"""Boundary values between workers over c10d send/recv (``rpc.data_plane=c10d``).

With the default data plane (``rpc``), a consumer pulls each boundary value from its producer with an RPC
call, answered once the value exists: a request, a reply carried by TensorPipe, Python callbacks on the RPC
threads of both processes. Here the producer sends each value as soon as it exists (``isend``, from its
compute thread) and the consumer posts its receives when the step arrives; the bytes move in gloo's C++
threads. RPC still carries every request, reply and reference; only the boundary values take this path, and
it needs none of TensorPipe's data channels. Values travel through host memory, as over RPC (a CUDA stage
moves its outputs to the CPU and its inputs to its device); sending device to device would take an NCCL
group with the same calls.

**Wire format of one value.** c10d receives need their sizes in advance, and a value is a pytree
(:mod:`pipetrain.boundary`) whose shapes the consumer does not know. So a value goes as:

1. a header of :data:`HEADER_BYTES`: its length, then the pickled ``(structure, produced_at)`` with each
   tensor leaf replaced by its shape and dtype, or the :class:`~pipetrain.failures.StageError` that stopped
   the producer before it could make the value;
2. the rest of the header in a second message, only when it is longer than one header;
3. one message per tensor leaf, in flattening order.

**Tags.** Messages match by sender and tag, so they may be posted in any order on either side: the tag of
a message is a function of the action (its kind, stage and micro-batch), the parity of the step and the
message's slot in the value. At most two steps are in flight (the driver hands out step ``n + 1`` ahead,
but step ``n + 2`` only once step ``n`` is done everywhere), so the parity keeps them apart.

**Receiving.** Gloo's receives have no completion future, so one thread per worker (:class:`P2PChannel`'s
receiver) waits on them in the order the worker needs its inputs, posts the leaves' receives as each
header arrives, and completes the input's future. A producer that died or stalled fails the header's wait
(a closed connection, or the process group's timeout: ``rpc.timeout_s``), which completes the future with
the error, never leaving it pending.
"""

from __future__ import annotations

import pickle
import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipetrain import boundary
from pipetrain.failures import StageError
from pipetrain.schedule import Action, ActionKind

__all__ = ["HEADER_BYTES", "P2PChannel", "message_tag"]

HEADER_BYTES = 4096
"""Size of the first message of every value: room for the structure of any ordinary boundary value."""
_LENGTH = struct.Struct("<Q")
_SLOTS_PER_VALUE = 1024
"""Tags reserved per value: the header, its overflow, and up to 1022 tensor leaves."""
_KINDS = tuple(ActionKind)


@dataclass(frozen=True)
class _TensorSlot:
    """Where a tensor leaf was: its shape and dtype (the receiver allocates it)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> _TensorSlot:
        return cls(tuple(tensor.shape), tensor.dtype)


def message_tag(action: Action, step_id: int, slot: int, num_stages: int, num_microbatches: int) -> int:
    """The c10d tag of message ``slot`` (0: header, 1: its overflow, 2...: tensor leaves) of ``action``'s
    output in step ``step_id``; distinct for every action of two consecutive steps."""
    if not 0 <= slot < _SLOTS_PER_VALUE:
        raise ValueError(f"a boundary value of {action} has more than {_SLOTS_PER_VALUE - 2} tensor leaves")
    key = (step_id % 2) * len(_KINDS) + _KINDS.index(action.kind)
    key = (key * num_stages + action.stage_idx) * num_microbatches + action.mb_idx
    return key * _SLOTS_PER_VALUE + slot


@dataclass
class _Receive:
    """One value in flight towards this worker."""

    action: Action
    source: int
    step_id: int
    header: torch.Tensor
    header_work: Any
    result: torch.futures.Future


class P2PChannel:
    """A worker's sends and receives of boundary values over c10d (the default process group).

    ``rank_of(worker)`` is the global rank of a worker of this worker's replica.
    """

    def __init__(
        self, name: str, rank_of: Callable[[int], int], num_stages: int, num_microbatches: int
    ) -> None:
        self._rank_of = rank_of
        self._num_stages = num_stages
        self._num_microbatches = num_microbatches
        self._in_flight: list[tuple[list[Any], list[torch.Tensor]]] = []
        self._lock = threading.Lock()
        self._receives: queue.SimpleQueue[_Receive] = queue.SimpleQueue()
        self._receiver = threading.Thread(target=self._receive_in_order, name=f"{name}-receiver", daemon=True)
        self._receiver.start()

    def send(self, step_id: int, worker: int, action: Action, payload: Any) -> None:
        """Send ``action``'s output to ``worker``: ``(value, produced_at)``, or the StageError that stopped
        its producer. Returns at once; the tensors are kept until the sends complete."""
        destination = self._rank_of(worker)
        if isinstance(payload, StageError):
            described, leaves = payload, []
        else:
            value, produced_at = payload
            leaves = [leaf.contiguous() for leaf in boundary.tensor_leaves(value)]
            described = (boundary.map_tensors(_TensorSlot.of, value), produced_at)
        header, overflow = _encode(described)
        messages = [header, *([overflow] if overflow is not None else []), *leaves]
        slots_used = [0, *([1] if overflow is not None else []), *range(2, 2 + len(leaves))]
        works = [
            dist.isend(message, destination, tag=self._tag(action, step_id, slot))
            for message, slot in zip(messages, slots_used, strict=True)
        ]
        with self._lock:
            self._in_flight = [(w, m) for w, m in self._in_flight if not all(x.is_completed() for x in w)]
            self._in_flight.append((works, messages))

    def receive(self, step_id: int, worker: int, action: Action) -> torch.futures.Future:
        """A future of ``(value, produced_at)`` of ``action``'s output from ``worker``, or of the error
        (a :class:`StageError` its producer sent, or the exception of a failed receive), as a value.

        Call in the order the inputs are needed, a step's after the previous step's: they are completed
        in that order."""
        source = self._rank_of(worker)
        header = torch.empty(HEADER_BYTES, dtype=torch.uint8)
        work = dist.irecv(header, source, tag=self._tag(action, step_id, 0))
        result: torch.futures.Future = torch.futures.Future()
        self._receives.put(_Receive(action, source, step_id, header, work, result))
        return result

    def _tag(self, action: Action, step_id: int, slot: int) -> int:
        return message_tag(action, step_id, slot, self._num_stages, self._num_microbatches)

    def _receive_in_order(self) -> None:
        while True:
            pending = self._receives.get()
            try:
                value = self._complete(pending)
            except Exception as error:  # the producer is gone, or the group timed out
                value = error
            pending.result.set_result(value)

    def _complete(self, pending: _Receive) -> Any:
        pending.header_work.wait()
        length = _LENGTH.unpack_from(pending.header.numpy())[0]
        encoded = pending.header[_LENGTH.size : _LENGTH.size + length]
        if _LENGTH.size + length > HEADER_BYTES:
            rest = torch.empty(_LENGTH.size + length - HEADER_BYTES, dtype=torch.uint8)
            dist.recv(rest, pending.source, tag=self._tag(pending.action, pending.step_id, 1))
            encoded = torch.cat([encoded, rest])
        described = pickle.loads(encoded.numpy().tobytes())
        if isinstance(described, StageError):
            return described
        structure, produced_at = described
        value = boundary.map_leaves(
            lambda leaf: torch.empty(leaf.shape, dtype=leaf.dtype) if isinstance(leaf, _TensorSlot) else leaf,
            structure,
        )
        tensors = boundary.tensor_leaves(value)
        works = [
            dist.irecv(tensor, pending.source, tag=self._tag(pending.action, pending.step_id, 2 + i))
            for i, tensor in enumerate(tensors)
        ]
        for work in works:
            work.wait()
        return value, produced_at


def _encode(described: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The header message (length, then the pickle) and, for a long pickle, the overflow message."""
    encoded = _LENGTH.pack(0) + pickle.dumps(described, protocol=pickle.HIGHEST_PROTOCOL)
    encoded = _LENGTH.pack(len(encoded) - _LENGTH.size) + encoded[_LENGTH.size :]
    data = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
    header = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    header[: min(len(data), HEADER_BYTES)] = data[:HEADER_BYTES]
    overflow = data[HEADER_BYTES:].clone() if len(data) > HEADER_BYTES else None
    return header, overflow
