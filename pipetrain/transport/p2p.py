"""Boundary values between workers over c10d send/recv (``rpc.data_plane=c10d``).

With the default data plane (``rpc``), a consumer pulls each boundary value from its producer with an RPC
call, answered once the value exists: a request, a reply carried by TensorPipe, Python callbacks on the RPC
threads of both processes. Here the producer sends each value as soon as it exists (``isend``, from its
compute thread), the consumer posts its receives when the step arrives and waits for them on its own
compute thread; the bytes move in gloo's C++ threads. RPC still carries every request, reply and
reference; only the boundary values take this path, and it needs none of TensorPipe's data channels.
Values travel through host memory, as over RPC (a CUDA stage moves its outputs to the CPU and its inputs to
its device); sending device to device would take an NCCL group with the same calls.

**Two wire forms.** c10d receives need their sizes in advance, and a value is a pytree
(:mod:`pipetrain.boundary`) whose shapes the consumer cannot know the first time. So a value goes:

- **described**, when the consumer cannot predict its layout: a header of :data:`HEADER_BYTES` (its
  length, then the pickled ``(structure, produced_at)`` with each tensor leaf replaced by its shape and
  dtype, or the :class:`~pipetrain.failures.StageError` that stopped the producer), the rest of the header
  in a second message when it is longer, then one message per tensor leaf. The consumer posts the leaves'
  receives only once the header is in: every leaf waits for a round trip.
- **in one message**, when it can: a prefix of :data:`PREFIX_BYTES` (the same pickled description, or the
  error) followed by every tensor leaf's bytes. The consumer posts that one receive when the step arrives,
  so the producer's send goes out as soon as the value exists, and the leaves arrive as views into the
  message.

**The prediction** is the layout (tensor leaves' shapes and dtypes) of the same action's value two steps
earlier, which both sides know the same way: at most two steps are in flight (the driver hands out step
``n + 1`` ahead, but step ``n + 2`` only once step ``n`` is done everywhere), so when the consumer posts the
receives of step ``n`` it has received every value of step ``n - 2``. A value whose layout differs from the
prediction (the first steps, an evaluation batch of another size) first fills the predicted message with a
prefix that says so, then goes described; both sides then predict the new layout.

**Tags.** Messages match by sender and tag, so they may be posted in any order on either side: the tag of
a message is a function of the action (its kind, stage and micro-batch), the parity of the step and the
message's slot in the value.

**Failures.** A producer that died or stalled fails the consumer's wait (a closed connection, or the
process group's timeout: ``rpc.timeout_s``), which the wait returns as the error, never hanging.
"""

from __future__ import annotations

import pickle
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

__all__ = ["HEADER_BYTES", "PREFIX_BYTES", "P2PChannel", "message_tag"]

HEADER_BYTES = 4096
"""Size of the first message of a described value: room for the structure of any ordinary value."""
PREFIX_BYTES = 1024
"""Size of the description in front of the leaves of a value sent in one message."""
_ALIGN = 64
"""Each leaf starts at a multiple of this in a one-message value, so it can be viewed as its dtype."""
_PREFIX = struct.Struct("<BQ")
"""A one-message value's prefix starts with what follows (:data:`_VALUE`, ...) and the pickle's length."""
_VALUE, _ERROR, _DESCRIBED_NEXT = 1, 2, 3
_LENGTH = struct.Struct("<Q")

_SLOTS_PER_VALUE = 1024
"""Tags reserved per value: the one-message form, the header, its overflow, and up to 1021 tensor leaves."""
_WHOLE_SLOT, _HEADER_SLOT, _OVERFLOW_SLOT, _FIRST_LEAF_SLOT = 0, 1, 2, 3
_KINDS = tuple(ActionKind)


@dataclass(frozen=True)
class _TensorSlot:
    """Where a tensor leaf was: its shape and dtype (the receiver allocates it)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> _TensorSlot:
        return cls(tuple(tensor.shape), tensor.dtype)

    @property
    def nbytes(self) -> int:
        return _elements(self.shape) * self.dtype.itemsize


Layout = tuple[_TensorSlot, ...]
"""The shapes and dtypes of a value's tensor leaves, in flattening order."""


def message_tag(action: Action, step_id: int, slot: int, num_stages: int, num_microbatches: int) -> int:
    """The c10d tag of message ``slot`` (0: the one-message form, 1: header, 2: its overflow, 3...: tensor
    leaves) of ``action``'s output in step ``step_id``; distinct for every action of two consecutive
    steps."""
    if not 0 <= slot < _SLOTS_PER_VALUE:
        raise ValueError(
            f"a boundary value of {action} has more than {_SLOTS_PER_VALUE - _FIRST_LEAF_SLOT} tensor leaves"
        )
    key = (step_id % 2) * len(_KINDS) + _KINDS.index(action.kind)
    key = (key * num_stages + action.stage_idx) * num_microbatches + action.mb_idx
    return key * _SLOTS_PER_VALUE + slot


class P2PChannel:
    """A worker's sends and receives of boundary values over c10d (the default process group).

    ``rank_of(worker)`` is the global rank of a worker of this worker's replica. :meth:`send` is called
    from the producer's compute thread; :meth:`receive` for each input when its step starts, in step order,
    and the returned :class:`IncomingValue` is waited for on the consumer's compute thread.
    """

    def __init__(self, rank_of: Callable[[int], int], num_stages: int, num_microbatches: int) -> None:
        self._rank_of = rank_of
        self._num_stages = num_stages
        self._num_microbatches = num_microbatches
        self._in_flight: dict[int, list[tuple[Any, torch.Tensor]]] = {}
        """Step id -> its sends and their messages, kept until the sends are known to be complete."""
        self._sent_layouts: dict[tuple[int, Action], Layout | None] = {}
        self._received_layouts: dict[tuple[int, Action], Layout | None] = {}
        self._lock = threading.Lock()

    def send(self, step_id: int, worker: int, action: Action, payload: Any) -> None:
        """Send ``action``'s output to ``worker``: ``(value, produced_at)``, or the StageError that stopped
        its producer. Returns at once; the messages are kept until their sends complete."""
        key = (step_id % 2, action)
        predicted = self._sent_layouts.get(key)
        if isinstance(payload, StageError):
            described, leaves, layout = payload, [], None
        else:
            value, produced_at = payload
            value = boundary.to_cpu(value)  # gloo sends from host memory
            leaves = boundary.tensor_leaves(value)
            layout = tuple(_TensorSlot.of(leaf) for leaf in leaves)
            described = (boundary.map_tensors(_TensorSlot.of, value), produced_at)
        encoded = pickle.dumps(described, protocol=pickle.HIGHEST_PROTOCOL)
        fits = _PREFIX.size + len(encoded) <= PREFIX_BYTES
        messages: list[tuple[torch.Tensor, int]] = []
        if predicted is not None and fits and layout == predicted:
            messages.append((_whole_message(_VALUE, encoded, predicted, leaves), _WHOLE_SLOT))
        elif predicted is not None and fits and layout is None:
            messages.append((_whole_message(_ERROR, encoded, predicted), _WHOLE_SLOT))
        else:
            if predicted is not None:  # the consumer waits for a message of the predicted size first
                messages.append((_whole_message(_DESCRIBED_NEXT, b"", predicted), _WHOLE_SLOT))
            header, overflow = _header_messages(encoded)
            messages.append((header, _HEADER_SLOT))
            if overflow is not None:
                messages.append((overflow, _OVERFLOW_SLOT))
            messages += [(leaf.contiguous(), _FIRST_LEAF_SLOT + i) for i, leaf in enumerate(leaves)]
        self._sent_layouts[key] = layout
        destination = self._rank_of(worker)
        works = [
            dist.isend(message, destination, tag=self._tag(action, step_id, slot))
            for message, slot in messages
        ]
        with self._lock:
            self._in_flight.setdefault(step_id, []).extend(
                zip(works, [message for message, _ in messages], strict=True)
            )
            finished = [step for step in self._in_flight if step <= step_id - 2]
            done = [sent for step in finished for sent in self._in_flight.pop(step)]
        _retire(done)

    @property
    def pending_sends(self) -> int:
        """Sends whose messages this channel still holds: at most those of the last two steps."""
        with self._lock:
            return sum(len(sends) for sends in self._in_flight.values())

    def receive(self, step_id: int, worker: int, action: Action) -> IncomingValue:
        """``action``'s output from ``worker`` in step ``step_id``: its receive is posted now; wait for it
        with :meth:`IncomingValue.wait`. Call for a step's inputs once that step starts (after every input
        of the step two before it has been waited for)."""
        key = (step_id % 2, action)
        return IncomingValue(self, key, self._rank_of(worker), step_id, self._received_layouts.get(key))

    def _tag(self, action: Action, step_id: int, slot: int) -> int:
        return message_tag(action, step_id, slot, self._num_stages, self._num_microbatches)


class IncomingValue:
    """A value on its way to this worker; :meth:`wait` blocks the calling thread until it is in."""

    def __init__(
        self,
        channel: P2PChannel,
        key: tuple[int, Action],
        source: int,
        step_id: int,
        predicted: Layout | None,
    ) -> None:
        self._channel = channel
        self._key = key
        self._source = source
        self._step_id = step_id
        self._predicted = predicted
        self.came_in_one_message: bool | None = None
        """Once waited for: whether the value came in one message (its layout was predicted)."""
        if predicted is None:
            self._buffer = torch.empty(HEADER_BYTES, dtype=torch.uint8)
            self._work = dist.irecv(self._buffer, source, tag=self._tag(_HEADER_SLOT))
        else:
            self._buffer = torch.empty(_whole_size(predicted), dtype=torch.uint8)
            self._work = dist.irecv(self._buffer, source, tag=self._tag(_WHOLE_SLOT))

    def wait(self) -> Any:
        """``(value, produced_at)``, or the error as a value: a :class:`StageError` the producer sent, or the
        exception of a failed receive (the producer is gone, or the process group timed out)."""
        try:
            self._work.wait()
            if self._predicted is None:
                self.came_in_one_message = False
                result, layout = self._described(self._buffer)
            else:
                result, layout = self._whole(self._predicted)
        except Exception as error:
            return error
        self._channel._received_layouts[self._key] = layout
        return result

    def _whole(self, predicted: Layout) -> tuple[Any, Layout | None]:
        what, length = _PREFIX.unpack_from(self._buffer.numpy())
        self.came_in_one_message = what != _DESCRIBED_NEXT
        if what == _DESCRIBED_NEXT:
            header = torch.empty(HEADER_BYTES, dtype=torch.uint8)
            dist.recv(header, self._source, tag=self._tag(_HEADER_SLOT))
            return self._described(header)
        described = pickle.loads(self._buffer[_PREFIX.size : _PREFIX.size + length].numpy().tobytes())
        if what == _ERROR:
            return described, None
        structure, produced_at = described
        views = iter(_leaf_views(self._buffer, predicted))
        value = boundary.map_leaves(
            lambda leaf: next(views) if isinstance(leaf, _TensorSlot) else leaf, structure
        )
        return (value, produced_at), predicted

    def _described(self, header: torch.Tensor) -> tuple[Any, Layout | None]:
        length = _LENGTH.unpack_from(header.numpy())[0]
        encoded = header[_LENGTH.size : _LENGTH.size + length]
        if _LENGTH.size + length > HEADER_BYTES:
            rest = torch.empty(_LENGTH.size + length - HEADER_BYTES, dtype=torch.uint8)
            dist.recv(rest, self._source, tag=self._tag(_OVERFLOW_SLOT))
            encoded = torch.cat([encoded, rest])
        described = pickle.loads(encoded.numpy().tobytes())
        if isinstance(described, StageError):
            return described, None
        structure, produced_at = described
        value = boundary.map_leaves(
            lambda leaf: torch.empty(leaf.shape, dtype=leaf.dtype) if isinstance(leaf, _TensorSlot) else leaf,
            structure,
        )
        tensors = boundary.tensor_leaves(value)
        works = [
            dist.irecv(tensor, self._source, tag=self._tag(_FIRST_LEAF_SLOT + i))
            for i, tensor in enumerate(tensors)
        ]
        for work in works:
            work.wait()
        return (value, produced_at), tuple(_TensorSlot.of(tensor) for tensor in tensors)

    def _tag(self, slot: int) -> int:
        return self._channel._tag(self._key[1], self._step_id, slot)


def _retire(sends: list[tuple[Any, torch.Tensor]]) -> None:
    """Let go of the sends of a step two or more before the current one: their consumers have received
    them (that step is done everywhere), so each wait returns at once. A gloo send counts as complete only
    once waited for, so this is what frees their messages."""
    for work, _ in sends:
        try:
            work.wait()
        except Exception:  # the consumer is gone: its own failure is what the driver reports
            pass


def _elements(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _whole_size(layout: Layout) -> int:
    """Bytes of a one-message value of ``layout``: the prefix, then each leaf aligned."""
    return PREFIX_BYTES + sum(_aligned(slot.nbytes) for slot in layout)


def _leaf_views(message: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """The leaves of a one-message value, as views into ``message``."""
    views, offset = [], PREFIX_BYTES
    for slot in layout:
        views.append(message[offset : offset + slot.nbytes].view(slot.dtype).view(slot.shape))
        offset += _aligned(slot.nbytes)
    return views


def _whole_message(
    what: int, encoded: bytes, layout: Layout, leaves: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """A one-message value of ``layout``: the prefix (``what`` and ``encoded``), then ``leaves``' bytes;
    without leaves, zeros of the same size (the consumer's receive expects that size)."""
    size = _whole_size(layout)
    message = torch.zeros(size, dtype=torch.uint8) if leaves is None else torch.empty(size, dtype=torch.uint8)
    prefix = _PREFIX.pack(what, len(encoded)) + encoded
    message[: len(prefix)] = torch.frombuffer(bytearray(prefix), dtype=torch.uint8)
    for view, leaf in zip(_leaf_views(message, layout), leaves or [], strict=False):
        view.copy_(leaf)
    return message


def _header_messages(encoded: bytes) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A described value's header (length, then the pickle) and, for a long pickle, its overflow."""
    data = torch.frombuffer(bytearray(_LENGTH.pack(len(encoded)) + encoded), dtype=torch.uint8)
    header = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    header[: min(len(data), HEADER_BYTES)] = data[:HEADER_BYTES]
    overflow = data[HEADER_BYTES:].clone() if len(data) > HEADER_BYTES else None
    return header, overflow
