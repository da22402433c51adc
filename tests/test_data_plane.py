"""``rpc.data_plane=c10d``: boundary values sent over c10d send/recv between real processes.

The channel's own test runs two real processes in a gloo group on loopback; the training tests run
``python -m pipetrain.train`` and compare with the unsplit model, as every transport must.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
from conftest import SMALL_SGD_RUN, TESTS_DIR, train_equals_unsplit

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
    with pytest.raises(ValueError, match="more than 1022 tensor leaves"):
        message_tag(actions[0], 0, 1024, 4, 8)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _peer(rank: int, port: int, results: multiprocessing.Queue) -> None:
    """Rank 0 sends (in another order than rank 1 receives), then dies; rank 1 reports what it got."""
    import torch.distributed as dist

    from pipetrain.transport.p2p import P2PChannel

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=20)
    )
    channel = P2PChannel(f"rank{rank}", lambda worker: worker, num_stages=4, num_microbatches=4)
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
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_peer, args=(rank, port, results)) for rank in (0, 1)]
    for process in processes:
        process.start()
    try:
        (nested, at_nested), failure, (gradient, at_gradient) = results.get(timeout=60)
        lost_type, lost_is_error, waited_s = results.get(timeout=60)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    hidden, extra = nested
    assert at_nested == 1.5 and torch.equal(hidden, torch.ones(2, 3))
    assert torch.equal(extra["mask"], torch.tensor([True, False]))
    assert extra["depth"] == 3 and extra["none"] is None
    assert isinstance(failure, StageError) and failure.stage_idx == 1 and LONG_MESSAGE in str(failure)
    assert at_gradient == 2.5 and gradient[0] is None
    assert torch.equal(gradient[1], torch.arange(12, dtype=torch.float64).reshape(3, 4).t())
    assert lost_is_error, lost_type
    assert waited_s < 20, f"a receive from a dead producer took {waited_s:.1f} s to fail"


RUNS = {
    "1f1b-3-workers": ["schedule=1f1b", "pipeline.balance=[2,2,2]", "pipeline.num_microbatches=4"],
    "zb_v-2-workers": ["schedule=zb_v", "pipeline.balance=[2,1,2,1]"],
    "dict-boundaries": [
        "model._target_=nested_parts.make_model",
        "model.in_features=8",
        "model.depth=3",
        "model.num_classes=5",
        "+model.style=dict",
        "data.num_samples=256",
        "schedule=gpipe",
        "pipeline.balance=[1,2,2]",
        "pipeline.num_microbatches=4",
    ],
}


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("run", sorted(RUNS))
def test_training_over_the_c10d_data_plane_equals_unsplit(tmp_path, run):
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    train_equals_unsplit(tmp_path, [*SMALL_SGD_RUN, "rpc.data_plane=c10d", *RUNS[run]], env=env)
