"""``rpc.data_plane=shm``: boundary values through shared memory and Unix sockets between workers of a host.

The channel's tests use real sockets and shared memory, with the producer in another process where its
death matters; the training tests run ``python -m pipetrain.train`` and compare with the unsplit model.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
import uuid

import pytest
import torch
from conftest import DATA_PLANE_RUNS, SMALL_SGD_RUN, TESTS_DIR, train_equals_unsplit

from pipetrain.failures import StageError
from pipetrain.schedule import Action, ActionKind
from pipetrain.transport.shm import ShmChannel

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="shared memory plane: Linux")

NESTED = Action(1, ActionKind.FORWARD, 0)
FAILED = Action(1, ActionKind.FORWARD, 1)
GRADIENT = Action(2, ActionKind.INPUT_GRAD, 3)
NEVER_SENT = Action(1, ActionKind.FORWARD, 2)


def _nested(step: int, rows: int) -> tuple:
    hidden = torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3) + step
    return (hidden, {"mask": torch.tensor([True, False, step % 2 == 0]), "depth": step, "none": None})


def _pair(timeout_s: float = 30.0) -> tuple[ShmChannel, ShmChannel]:
    name = uuid.uuid4().hex[:16]
    return ShmChannel(name, 0, 0, timeout_s), ShmChannel(name, 0, 1, timeout_s)


def test_values_of_any_structure_come_in_whatever_order_they_were_sent():
    producer, consumer = _pair()
    transposed = torch.arange(12, dtype=torch.float64).reshape(3, 4).t()  # not contiguous
    producer.send(5, 1, GRADIENT, ((None, transposed), 2.5))
    producer.send(5, 1, FAILED, StageError(1, "action 1F1 (stage 1)", "boom"))
    producer.send(5, 1, NESTED, (_nested(5, 2), 1.5))
    (hidden, extra), at = consumer.receive(5, 0, NESTED).wait()
    assert at == 1.5 and torch.equal(hidden, _nested(5, 2)[0])
    assert torch.equal(extra["mask"], torch.tensor([True, False, False]))
    assert extra["depth"] == 5 and extra["none"] is None
    failure = consumer.receive(5, 0, FAILED).wait()
    assert isinstance(failure, StageError) and failure.stage_idx == 1 and "boom" in str(failure)
    (none, gradient), at = consumer.receive(5, 0, GRADIENT).wait()
    assert none is None and at == 2.5 and torch.equal(gradient, transposed)


def test_segments_are_reused_two_steps_later_and_replaced_when_a_value_outgrows_them():
    producer, consumer = _pair()
    received = []
    for step, rows in [(1, 4), (2, 4), (3, 4), (4, 4), (5, 64), (6, 2), (7, 2)]:
        producer.send(step, 1, NESTED, (_nested(step, rows), float(step)))
        received.append((step, rows, consumer.receive(step, 0, NESTED).wait()))
    for step, rows, ((hidden, extra), at) in received:
        assert at == float(step) and extra["depth"] == step
        assert torch.equal(hidden, _nested(step, rows)[0]), step
    # Two segments (one per step parity), a third in place of one when step 5's value outgrew it.
    assert len(producer._segments_out) == 2 and producer._segment_ids == 3
    assert len(consumer._segments_in) == 2, "the consumer still maps the segment that was replaced"


def test_received_values_do_not_change_when_the_segment_is_written_again():
    producer, consumer = _pair()
    producer.send(1, 1, NESTED, (_nested(1, 4), 1.0))
    (hidden, _), _ = consumer.receive(1, 0, NESTED).wait()
    producer.send(3, 1, NESTED, (_nested(3, 4), 3.0))  # the same segment
    assert torch.equal(hidden, _nested(1, 4)[0])


def test_a_producer_that_sends_nothing_fails_the_wait_after_the_timeout():
    _, consumer = _pair(timeout_s=1.0)
    started = time.monotonic()
    outcome = consumer.receive(1, 0, NEVER_SENT).wait()
    assert isinstance(outcome, TimeoutError) and "2 x rpc.timeout_s" in str(outcome)
    assert 1.0 <= time.monotonic() - started < 5


def test_a_worker_that_cannot_be_reached_is_an_error_naming_the_key():
    lonely = ShmChannel(uuid.uuid4().hex[:16], 0, 0, 5.0)
    with pytest.raises(RuntimeError, match=r"rpc.data_plane=shm: cannot reach worker 1 of replica 0"):
        lonely.send(1, 1, NESTED, (_nested(1, 2), 1.0))


def _send_once_and_die(name: str, uid: int | None) -> None:
    """Worker 0 (run as user ``uid`` when given): sends one value to worker 1, then dies without a
    goodbye."""
    if uid is not None:
        os.setuid(uid)
    channel = ShmChannel(name, 0, 0, 30.0)
    channel.send(5, 1, NESTED, (_nested(5, 2), 1.5))
    os._exit(0)


def _consumer_after_a_send(timeout_s: float, uid: int | None = None) -> ShmChannel:
    """Worker 1's channel, once a producer process (:func:`_send_once_and_die`) has sent to it and ended."""
    name = uuid.uuid4().hex[:16]
    consumer = ShmChannel(name, 0, 1, timeout_s)
    process = multiprocessing.get_context("spawn").Process(target=_send_once_and_die, args=(name, uid))
    process.start()
    process.join(timeout=30)
    assert process.exitcode == 0
    return consumer


@pytest.mark.timeout(60)
def test_the_wait_for_a_dead_producer_fails_at_once_and_what_it_sent_stays_readable():
    consumer = _consumer_after_a_send(timeout_s=30.0)
    (hidden, _), at = consumer.receive(5, 0, NESTED).wait()
    assert at == 1.5 and torch.equal(hidden, _nested(5, 2)[0])
    started = time.monotonic()
    lost = consumer.receive(5, 0, NEVER_SENT).wait()
    assert isinstance(lost, ConnectionError) and "worker 0 closed its connection" in str(lost)
    assert time.monotonic() - started < 2


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a process as another user")
@pytest.mark.timeout(60)
def test_a_connection_from_another_user_is_closed_unread():
    consumer = _consumer_after_a_send(timeout_s=1.0, uid=65534)
    outcome = consumer.receive(5, 0, NESTED).wait()
    assert isinstance(outcome, TimeoutError), outcome


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("run", sorted(DATA_PLANE_RUNS))
def test_training_over_the_shm_data_plane_equals_unsplit(tmp_path, run):
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    train_equals_unsplit(tmp_path, [*SMALL_SGD_RUN, "rpc.data_plane=shm", *DATA_PLANE_RUNS[run]], env=env)
