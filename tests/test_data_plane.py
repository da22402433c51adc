"""``rpc.data_plane=c10d``: boundary values sent over c10d send/recv between real processes.

The channel's own test runs two real processes in a gloo group on loopback; the training tests run
``python -m pipetrain.train`` and compare with the unsplit model, as every transport must.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import torch
from conftest import DATA_PLANE_RUNS, SMALL_SGD_RUN, TESTS_DIR, train_equals_unsplit

from pipetrain import boundary
from pipetrain.failures import StageError
from pipetrain.schedule import Action, ActionKind, build_schedule
from pipetrain.transport.p2p import HEADER_BYTES, message_tag

NESTED = Action(1, ActionKind.FORWARD, 0)
FAILED = Action(1, ActionKind.FORWARD, 1)
GRADIENT = Action(2, ActionKind.INPUT_GRAD, 3)
NEVER_SENT = Action(1, ActionKind.FORWARD, 2)
LONG_MESSAGE = "x" * (3 * HEADER_BYTES)


def test_message_tags_differ_for_every_action_of_two_consecutive_steps():
    schedule = build_schedule("zb_v", 4, 8, 2)
    actions = [action for _, row in schedule.items() for action in row]
    tags = [
        message_tag(action, step_id, slot, schedule.num_stages, schedule.num_microbatches)
        for step_id in (6, 7)
        for action in actions
        for slot in range(4)
    ]
    assert len(set(tags)) == len(tags) == 2 * len(actions) * 4
    assert all(0 <= tag < 2**31 for tag in tags)
    with pytest.raises(ValueError, match="more than 1021 tensor leaves"):
        message_tag(actions[0], 0, 1024, 4, 8)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_pair(target: Callable[[int, int, multiprocessing.Queue], None], num_results: int) -> list[Any]:
    """Run ``target(rank, port, results)`` as ranks 0 and 1 in two fresh processes; the first
    ``num_results`` things they put in ``results``. Both processes are gone when it returns."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=target, args=(rank, port, results)) for rank in (0, 1)]
    for process in processes:
        process.start()
    try:
        return [results.get(timeout=60) for _ in range(num_results)]
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


def _peer(rank: int, port: int, results: multiprocessing.Queue) -> None:
    """Rank 0 sends (in another order than rank 1 receives), then dies; rank 1 reports what it got."""
    import torch.distributed as dist

    from pipetrain.transport.p2p import P2PChannel

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=20)
    )
    channel = P2PChannel(lambda worker: worker, num_stages=4, num_microbatches=4)
    if rank == 0:
        transposed = torch.arange(12, dtype=torch.float64).reshape(3, 4).t()  # not contiguous
        channel.send(5, 1, GRADIENT, ((None, transposed), 2.5))
        channel.send(5, 1, FAILED, StageError(1, "action 1F1 (stage 1)", LONG_MESSAGE))
        nested = (torch.ones(2, 3), {"mask": torch.tensor([True, False]), "depth": 3, "none": None})
        channel.send(5, 1, NESTED, (nested, 1.5))
        time.sleep(1.0)  # the sends complete in gloo's threads; then the producer dies without a goodbye
        os._exit(0)
    received = [channel.receive(5, 0, action) for action in (NESTED, FAILED, GRADIENT)]
    results.put([future.wait() for future in received])
    started = time.monotonic()
    lost = channel.receive(5, 0, NEVER_SENT).wait()
    results.put((type(lost).__name__, isinstance(lost, Exception), time.monotonic() - started))
    results.close()
    results.join_thread()  # flushed before the hard exit (a clean one would wait for the dead peer)
    os._exit(0)


@pytest.mark.distributed
@pytest.mark.timeout(90)
def test_channel_carries_nested_values_errors_and_long_headers_and_fails_when_the_producer_dies():
    received, lost = _run_pair(_peer, num_results=2)
    (nested, at_nested), failure, (gradient, at_gradient) = received
    lost_type, lost_is_error, waited_s = lost
    hidden, extra = nested
    assert at_nested == 1.5 and torch.equal(hidden, torch.ones(2, 3))
    assert torch.equal(extra["mask"], torch.tensor([True, False]))
    assert extra["depth"] == 3 and extra["none"] is None
    assert isinstance(failure, StageError) and failure.stage_idx == 1 and LONG_MESSAGE in str(failure)
    assert at_gradient == 2.5 and gradient[0] is None
    assert torch.equal(gradient[1], torch.arange(12, dtype=torch.float64).reshape(3, 4).t())
    assert lost_is_error, lost_type
    assert waited_s < 20, f"a receive from a dead producer took {waited_s:.1f} s to fail"


def _changing_values(step: int) -> object:
    """What the producer of ``_layouts_peer`` sends at ``step`` (odd steps: one parity, one prediction)."""
    rows = 4 if step < 5 else 2  # the layout changes at step 5, and again after the error at 9
    if step == 9:
        return StageError(1, "action 1F0 (stage 1)", "boom")
    floats = torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3) + step
    mask = torch.tensor([True, False, step % 3 == 0, True, False])
    return (
        (floats, {"mask": mask, "depth": step, "weights": torch.full((3,), step / 2, dtype=torch.float64)}),
        step,
    )


def _layouts_peer(rank: int, port: int, results: multiprocessing.Queue) -> None:
    """Rank 0 sends one action's value at steps 1, 3, ..., 13 and reports how many sends it still holds;
    rank 1 receives each after the previous one was waited for, as a worker does, and reports what came and
    in which form."""
    import torch.distributed as dist

    from pipetrain.transport.p2p import P2PChannel

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=20)
    )
    channel = P2PChannel(lambda worker: worker, num_stages=4, num_microbatches=4)
    if rank == 0:
        for step in range(1, 15, 2):
            channel.send(step, 1, NESTED, _changing_values(step))
        results.put(channel.pending_sends)
    else:
        came = []
        for step in range(1, 15, 2):
            incoming = channel.receive(step, 0, NESTED)
            received = incoming.wait()
            if not isinstance(received, Exception):  # plain lists: the queue would share tensors' memory
                received = boundary.map_tensors(lambda tensor: (tensor.tolist(), tensor.dtype), received)
            came.append((step, received, incoming.came_in_one_message))
        results.put(came)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(90)
def test_a_value_of_the_layout_predicted_from_two_steps_before_comes_in_one_message():
    first, second = _run_pair(_layouts_peer, num_results=2)
    pending_sends, came = (first, second) if isinstance(first, int) else (second, first)
    assert pending_sends == 1, "the producer still holds the messages of steps its consumer has received"
    forms = {step: in_one for step, _, in_one in came}
    # 1: nothing to predict; 5: the layout changed; 9: an error; 11: nothing predicted after the error
    assert forms == {1: False, 3: True, 5: False, 7: True, 9: True, 11: False, 13: True}
    for step, received, _ in came:
        expected = _changing_values(step)
        if isinstance(expected, StageError):
            assert isinstance(received, StageError) and "boom" in str(received)
            continue
        assert received == boundary.map_tensors(lambda tensor: (tensor.tolist(), tensor.dtype), expected)


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("run", sorted(DATA_PLANE_RUNS))
def test_training_over_the_c10d_data_plane_equals_unsplit(tmp_path, run):
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    train_equals_unsplit(tmp_path, [*SMALL_SGD_RUN, "rpc.data_plane=c10d", *DATA_PLANE_RUNS[run]], env=env)
