"""Boundary values between workers of one host through shared memory (``rpc.data_plane=shm``).

Over RPC, every boundary value is a request and a reply that wake the transport and RPC threads of both
workers; over c10d, gloo's threads. On a host whose cores all compute, each of those wake-ups takes a core
from a compute thread. Here no other thread takes part: the producer's compute thread copies the value
into shared memory and writes a short notice to the consumer's socket; the consumer's compute thread
reads the notice when it needs the value (the kernel wakes it if it is already waiting, and nobody if it
is not) and copies the value out.

- **Memory.** Each value goes into a segment of its own (``memfd_create``: no file, freed when the last
  process holding it ends, however it ends), kept for the same action two steps later: at most two steps
  are in flight (the driver hands out step ``n + 2`` only once step ``n`` is done everywhere), so by then
  the consumer has copied the old value out. A segment's descriptor crosses to the consumer once, with the
  first notice that uses it (``SCM_RIGHTS``); a value that outgrows its segment gets a new one.
- **Notices.** Each worker listens on a Unix socket in Linux's abstract namespace (no file either), named
  by the run and the worker. A producer connects on its first send. A notice is a length-prefixed pickle:
  the value's structure with each tensor leaf replaced by its place in the segment, or the
  :class:`~pipetrain.failures.StageError` that stopped the producer.
- **Who may send.** The socket can be reached by any process of the host that knows its name; a
  connection from another user is closed unread (``SO_PEERCRED``).
- **Failures.** A producer whose connection closes (its process died) fails the wait for its values at
  once; one that stalls fails it after ``timeout_s`` without news (twice ``rpc.timeout_s``: the driver's
  watchdog names a stalled worker first). Either way the wait returns the error as a value, never
  hanging.

Linux only, and only where every worker of a replica runs on one host (the abstract socket of a worker on
another host cannot be reached: the first send says so).
"""

from __future__ import annotations

import math
import mmap
import os
import pickle
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from pipetrain import boundary
from pipetrain.failures import StageError
from pipetrain.schedule import Action

__all__ = ["ShmChannel", "socket_address"]

_FRAME = struct.Struct("<II")
"""A notice's prefix: the pickle's length and the number of segment descriptors sent with it."""
_ALIGN = 64
"""Each tensor leaf starts at a multiple of this in its segment, so it can be viewed as its dtype."""
_POLL_S = 0.5
"""How often a wait looks at the clock while no notice comes."""
_MAX_FDS = 64
_CREDENTIALS = struct.Struct("3i")
"""``SO_PEERCRED``: the peer's pid, uid and gid."""


def socket_address(run_name: str, replica_idx: int, worker_idx: int) -> bytes:
    """The abstract-namespace address a worker listens on for notices."""
    return f"\0pipetrain-{run_name}-{replica_idx}-{worker_idx}".encode()


@dataclass(frozen=True)
class _Leaf:
    """Where a tensor leaf lies: in segment ``segment``, at ``offset``, with its shape and dtype."""

    segment: int
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class _Segment:
    """Shared memory holding one action's values of one step parity (a producer's), or a view of it (a
    consumer's)."""

    memory: mmap.mmap
    bytes: torch.Tensor
    fd: int = -1
    """The producer's descriptor of it, sent with the first notice that uses it."""


class _Incoming:
    """A value on its way from another worker: :meth:`wait` gives ``(value, produced_at)`` or the error."""

    def __init__(self, channel: ShmChannel, key: tuple[int, int, str]) -> None:
        self._channel = channel
        self._key = key

    def wait(self) -> Any:
        return self._channel.wait_for(self._key)


class ShmChannel:
    """A worker's sends and receives of boundary values through shared memory and Unix sockets.

    :meth:`send` runs on the producer's compute thread; the :class:`_Incoming` that :meth:`receive` returns
    is waited for on the consumer's compute thread (one thread reads the sockets at a time). Values come in
    on ``device``, the consumer's stages' one: on a GPU, each tensor is copied once each way, device to
    segment and segment to device.
    """

    def __init__(
        self,
        run_name: str,
        replica_idx: int,
        worker_idx: int,
        timeout_s: float,
        device: torch.device | str = "cpu",
    ) -> None:
        self._run_name = run_name
        self._replica_idx = replica_idx
        self._worker_idx = worker_idx
        self._timeout_s = timeout_s
        self._device = torch.device(device)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(socket_address(run_name, replica_idx, worker_idx))
        self._listener.listen(64)
        self._send_lock = threading.Lock()
        self._outgoing: dict[int, socket.socket] = {}
        self._segments_out: dict[tuple[int, int, Action], tuple[int, _Segment]] = {}
        self._segment_ids = 0
        self._receive_lock = threading.Lock()
        self._readers: dict[socket.socket, _Reader] = {}
        self._segments_in: dict[tuple[int, int], _Segment] = {}
        self._arrived: dict[tuple[int, int, str], Any] = {}
        self._gone: set[int] = set()

    # -- the producer's side --------------------------------------------------------------------------

    def send(self, step_id: int, worker: int, action: Action, payload: Any) -> None:
        """Give ``action``'s output to ``worker``: ``(value, produced_at)``, or the StageError that stopped
        its producer. The value's tensors may lie on any device: each is copied straight into the segment."""
        with self._send_lock:
            new: list[tuple[int, int]] = []  # segments the consumer has not seen: (id, descriptor)
            retired: list[int] = []
            if isinstance(payload, StageError):
                described: Any = payload
            else:
                value, produced_at = payload
                leaves = [leaf.detach().contiguous() for leaf in boundary.tensor_leaves(value)]
                key = (worker, step_id % 2, action)
                held = self._segments_out.get(key)
                if held is None or held[1].bytes.numel() < _aligned_size(leaves):
                    if held is not None:  # outgrown: the consumer lets go of it too
                        retired.append(held[0])
                        os.close(held[1].fd)
                    held = self._segments_out[key] = self._new_segment(action, _aligned_size(leaves))
                    new.append((held[0], held[1].fd))
                places = iter(_place_leaves(*held, leaves))
                described = (boundary.map_tensors(lambda _leaf: next(places), value), produced_at)
            notice = pickle.dumps(
                (self._worker_idx, step_id, str(action), described, [sid for sid, _ in new], retired),
                protocol=pickle.HIGHEST_PROTOCOL,
            )
            frame = _FRAME.pack(len(notice), len(new)) + notice
            connection = self._connection_to(worker)
            sent = socket.send_fds(connection, [frame], [fd for _, fd in new])
            if sent < len(frame):
                connection.sendall(frame[sent:])

    def _new_segment(self, action: Action, size: int) -> tuple[int, _Segment]:
        fd = os.memfd_create(f"pipetrain-{action}", os.MFD_CLOEXEC)
        os.ftruncate(fd, max(size, 1))
        memory = mmap.mmap(fd, max(size, 1))
        self._segment_ids += 1
        return self._segment_ids, _Segment(memory, torch.frombuffer(memory, dtype=torch.uint8), fd)

    def _connection_to(self, worker: int) -> socket.socket:
        connection = self._outgoing.get(worker)
        if connection is None:
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                connection.connect(socket_address(self._run_name, self._replica_idx, worker))
            except OSError as error:
                connection.close()
                raise RuntimeError(
                    f"rpc.data_plane=shm: cannot reach worker {worker} of replica {self._replica_idx} "
                    f"through a local socket ({error}); shared memory needs every worker of a replica on "
                    "one host: use rpc.data_plane=rpc or c10d across hosts"
                ) from error
            self._outgoing[worker] = connection
        return connection

    # -- the consumer's side --------------------------------------------------------------------------

    def receive(self, step_id: int, worker: int, action: Action) -> _Incoming:
        """``action``'s output of step ``step_id`` from ``worker``, to wait for."""
        return _Incoming(self, (worker, step_id, str(action)))

    def wait_for(self, key: tuple[int, int, str]) -> Any:
        """Read notices until the one of ``key`` (producer, step, action) is in; its value, or the error
        that stopped it (as a value)."""
        producer, step_id, action_text = key
        with self._receive_lock:
            last_news = time.monotonic()
            while key not in self._arrived:
                if producer in self._gone:
                    return ConnectionError(
                        f"worker {producer} closed its connection before it sent {action_text} of step "
                        f"{step_id}"
                    )
                if time.monotonic() - last_news > self._timeout_s:
                    return TimeoutError(
                        f"nothing came from the other workers in {self._timeout_s:.0f} s (2 x rpc.timeout_s) "
                        f"while waiting for {action_text} of step {step_id} from worker {producer}"
                    )
                if self._read_notices(_POLL_S):
                    last_news = time.monotonic()
            return self._arrived.pop(key)

    def _read_notices(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a socket to be readable, and take in what came; whether anything
        did."""
        readable, _, _ = select.select([self._listener, *self._readers], [], [], timeout_s)
        for ready in readable:
            if ready is self._listener:
                connection, _ = self._listener.accept()
                if _peer_uid(connection) != os.getuid():  # anyone on the host can reach the socket
                    connection.close()
                    continue
                self._readers[connection] = _Reader(connection)
                continue
            reader = self._readers[ready]
            for notice, fds in reader.read():
                reader.producer = self._take_in(notice, fds)
            if reader.closed:
                del self._readers[ready]
                ready.close()
                if reader.producer is not None:
                    self._gone.add(reader.producer)
        return bool(readable)

    def _take_in(self, notice: bytes, fds: list[int]) -> int:
        """Store the value or error a notice brings; the producer's worker index."""
        producer, step_id, action_text, described, segment_ids, retired = pickle.loads(notice)
        for segment_id in retired:
            del self._segments_in[(producer, segment_id)]
        for segment_id, fd in zip(segment_ids, fds, strict=True):
            memory = mmap.mmap(fd, os.fstat(fd).st_size)
            os.close(fd)
            self._segments_in[(producer, segment_id)] = _Segment(
                memory, torch.frombuffer(memory, dtype=torch.uint8)
            )
        if not isinstance(described, StageError):
            structure, produced_at = described
            value = boundary.map_leaves(
                lambda leaf: self._copy_out(producer, leaf) if isinstance(leaf, _Leaf) else leaf, structure
            )
            described = (value, produced_at)
        self._arrived[(producer, step_id, action_text)] = described
        return producer

    def _copy_out(self, producer: int, leaf: _Leaf) -> torch.Tensor:
        memory = self._segments_in[(producer, leaf.segment)].bytes
        nbytes = math.prod(leaf.shape) * leaf.dtype.itemsize
        placed = memory[leaf.offset : leaf.offset + nbytes].view(leaf.dtype).reshape(leaf.shape)
        return placed.to(self._device, copy=True)


class _Reader:
    """What comes in on one connection: bytes and segment descriptors, split into notices."""

    def __init__(self, connection: socket.socket) -> None:
        self._connection = connection
        self._buffer = bytearray()
        self._fds: list[int] = []
        self.closed = False
        self.producer: int | None = None

    def read(self) -> list[tuple[bytes, list[int]]]:
        """The notices that are complete after one read, each with its descriptors."""
        data, fds, _, _ = socket.recv_fds(self._connection, 1 << 16, _MAX_FDS)
        self.closed = not data
        self._buffer += data
        self._fds += fds
        notices = []
        while len(self._buffer) >= _FRAME.size:
            length, count = _FRAME.unpack_from(self._buffer)
            if len(self._buffer) < _FRAME.size + length:
                break
            notice = bytes(self._buffer[_FRAME.size : _FRAME.size + length])
            del self._buffer[: _FRAME.size + length]
            notices.append((notice, self._fds[:count]))
            del self._fds[:count]
        return notices


def _peer_uid(connection: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket."""
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
    return _CREDENTIALS.unpack(credentials)[1]


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _aligned_size(leaves: list[torch.Tensor]) -> int:
    return sum(_aligned(leaf.numel() * leaf.element_size()) for leaf in leaves)


def _place_leaves(segment_id: int, segment: _Segment, leaves: list[torch.Tensor]) -> list[_Leaf]:
    """Copy ``leaves`` into ``segment``, one after another at aligned offsets; where each went."""
    places = []
    offset = 0
    for leaf in leaves:
        nbytes = leaf.numel() * leaf.element_size()
        if nbytes:
            segment.bytes[offset : offset + nbytes].copy_(leaf.reshape(-1).view(torch.uint8))
        places.append(_Leaf(segment_id, offset, tuple(leaf.shape), leaf.dtype))
        offset += _aligned(nbytes)
    return places
