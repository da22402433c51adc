"""Zero-bubble schedules as data: ZB-H1 and ZB-V timelines, bubbles, memory, errors and the command line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types

import pytest

from pipetrain.schedule import (
    Action,
    ActionKind,
    Schedule,
    build_schedule,
    dependencies,
    render_timeline,
    simulate,
    v_placement,
    validate_schedule,
    workers_needed,
    zb_h1,
    zb_v,
)


def _picture(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


# Unit costs F = I = W = 1. ZB-H1: 1F1B's warm-up, then F/I pairs; stage s holds back its first s weight
# gradients and runs them in the drain, where it would otherwise wait for the next input gradient.
GOLDEN_H1 = {
    (2, 4): """
        stage 0: 0F0 0F1 .   0I0 0W0 0F2 0I1 0W1 0F3 0I2 0W2 0I3 0W3
        stage 1: .   1F0 1I0 1F1 1I1 1W0 1F2 1I2 1W1 1F3 1I3 1W2 1W3
    """,
    # The example: every stage idles (S-1)(F+I-W) = 3 of 27 units (1F1B: 9 of 33).
    (4, 8): """
        stage 0: 0F0 0F1 0F2 0F3 .   .   .   0I0 0W0 0F4 0I1 0W1 0F5 0I2 0W2 0F6 0I3 0W3 0F7 0I4 0W4 0I5 0W5 0I6 0W6 0I7 0W7
        stage 1: .   1F0 1F1 1F2 .   .   1I0 1F3 1I1 1W0 1F4 1I2 1W1 1F5 1I3 1W2 1F6 1I4 1W3 1F7 1I5 1W4 1I6 1W5 1I7 1W6 1W7
        stage 2: .   .   2F0 2F1 .   2I0 2F2 2I1 2F3 2I2 2W0 2F4 2I3 2W1 2F5 2I4 2W2 2F6 2I5 2W3 2F7 2I6 2W4 2I7 2W5 2W6 2W7
        stage 3: .   .   .   3F0 3I0 3F1 3I1 3F2 3I2 3F3 3I3 3W0 3F4 3I4 3W1 3F5 3I5 3W2 3F6 3I6 3W3 3F7 3I7 3W4 3W5 3W6 3W7
    """,  # noqa: E501
}

# ZB-V, V placement: worker 0 hosts stages 0 and 2W-1, so it starts and ends the pipeline. Beyond W
# micro-batches, the paper's order: warm-up forwards, then F I W triples on each stage in turn.
GOLDEN_V = {
    (2, 4): """
        worker 0: 0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 3W1 0F3 0I0 0W0 3F2 3I2 3W2 0I1 0W1 3F3 3I3 3W3 0I2 0W2 0I3 0W3 .
        worker 1: .   1F0 2F0 1F1 2F1 2I0 2W0 1F2 1I0 1W0 2F2 2I1 2W1 1F3 1I1 1W1 2F3 2I2 2W2 1I2 2I3 1I3 1W2 2W3 1W3
    """,  # noqa: E501
    # Up to W micro-batches, list scheduling: whenever a worker is free it runs an I, else a W, else an F
    # (the later stage first).
    (3, 3): """
        worker 0: 0F0 0F1 0F2 .   .   5F0 5I0 5W0 5F1 5I1 5W1 5F2 5I2 0I0 5W2 0I1 0W0 0I2 0W1 0W2
        worker 1: .   1F0 1F1 1F2 4F0 .   4F1 4I0 4W0 4F2 4I1 1I0 4W1 4I2 1I1 4W2 1I2 1W0 1W1 1W2
        worker 2: .   .   2F0 3F0 2F1 3F1 2F2 3F2 3I0 2I0 3W0 3I1 2I1 3W1 3I2 2I2 3W2 2W0 2W1 2W2
    """,
}


def _check_picture(schedule: Schedule, picture: str) -> None:
    assert render_timeline(simulate(schedule)) == picture
    # The picture without its idle columns is each worker's action list.
    for w, line in enumerate(picture.splitlines()):
        assert " ".join(map(str, schedule[w])) == " ".join(line.split(": ", 1)[1].replace(".", "").split())


@pytest.mark.parametrize("key", list(GOLDEN_H1), ids=lambda k: f"S{k[0]}-m{k[1]}")
def test_golden_zb_h1(key):
    _check_picture(build_schedule("zb_h1", *key), _picture(GOLDEN_H1[key]))


@pytest.mark.parametrize("key", list(GOLDEN_V), ids=lambda k: f"W{k[0]}-m{k[1]}")
def test_golden_zb_v(key):
    num_workers, m = key
    schedule = build_schedule("zb_v", 2 * num_workers, m, stages_per_worker=2)
    assert schedule.placement == v_placement(2 * num_workers, num_workers)
    _check_picture(schedule, _picture(GOLDEN_V[key]))


def test_zb_h1_unit_bubble_and_memory_against_1f1b():
    for s in range(2, 6):
        for m in range(s, 3 * s + 1):
            ours, plain = simulate(zb_h1(s, m)), simulate(build_schedule("1f1b", s, m))
            assert ours.bubble_fraction == pytest.approx((s - 1) / (3 * m + s - 1))
            assert plain.bubble_fraction == pytest.approx((s - 1) / (m + s - 1))
            # Held from F to W: never more micro-batches than 1F1B's peak (its first stage's).
            assert max(ours.peak_in_flight.values()) == max(plain.peak_in_flight.values()) == s
            assert ours.peak_in_flight[0] == plain.peak_in_flight[0]


def test_zb_v_bubble_below_zb_h1_and_interleaved():
    for num_workers, m in [(2, 4), (2, 8), (3, 6), (4, 8), (4, 12)]:
        v = simulate(zb_v(2 * num_workers, m))
        h1 = simulate(zb_h1(num_workers, m))
        interleaved = simulate(build_schedule("interleaved_1f1b", 2 * num_workers, m, 2))
        assert v.bubble_fraction < h1.bubble_fraction
        assert v.bubble_fraction < interleaved.bubble_fraction
        # Worker w starts after w units; the last worker's 6m units end no earlier than W - 1 + 6m.
        assert v.makespan == 6 * m + num_workers - 1
        for w in range(num_workers):  # a worker holds at most 2W half-size micro-batches (1F1B's peak)
            assert _peak_held_by_worker(v.schedule, w) <= 2 * num_workers
    assert simulate(zb_v(8, 8)).bubble_fraction == pytest.approx(12 / 204)  # 0.059


def _torch_zbv(num_workers: int, m: int) -> Schedule:
    """PyTorch's ScheduleZBVZeroBubble order per rank, built from stand-in stages (no processes)."""
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    nn = pytest.importorskip("torch.nn")
    rows = []
    for rank in range(num_workers):
        stages = [
            types.SimpleNamespace(
                num_stages=2 * num_workers,
                group_size=num_workers,
                group_rank=rank,
                stage_index=s,
                submod=nn.Identity(),
            )
            for s in (rank, 2 * num_workers - 1 - rank)
        ]
        order = schedules.ScheduleZBVZeroBubble(stages, m).pipeline_order[rank]
        rows.append(tuple(Action.parse(str(a)) for a in order if a is not None))
    return Schedule(tuple(rows), v_placement(2 * num_workers, num_workers), m, "torch_zbv")


def _peak_held_by_worker(schedule: Schedule, worker: int) -> int:
    """The most micro-batches a worker holds at once, its stages together (from each F to its W)."""
    held = peak = 0
    for action in schedule[worker]:
        held += {ActionKind.FORWARD: 1, ActionKind.WEIGHT_GRAD: -1}.get(action.kind, 0)
        peak = max(peak, held)
    return peak


def test_zb_v_is_pytorchs_order_beyond_w_microbatches():
    for num_workers in (2, 3, 4):
        for m in range(num_workers + 1, 13):
            assert zb_v(2 * num_workers, m).actions == _torch_zbv(num_workers, m).actions, (num_workers, m)


def test_zb_v_against_pytorch_at_every_microbatch_count():
    """Unit costs, 2-4 workers, 1-12 micro-batches: never longer than PyTorch's order, and shorter up to W
    micro-batches, where list scheduling wins."""
    longer, shorter = [], []
    for num_workers in (2, 3, 4):
        for m in range(1, 13):
            ours = simulate(zb_v(2 * num_workers, m)).makespan
            theirs = simulate(_torch_zbv(num_workers, m)).makespan
            if ours > theirs:
                longer.append((num_workers, m))
            if ours < theirs:
                shorter.append((num_workers, m))
    assert longer == []
    assert shorter == [(w, m) for w in (2, 3, 4) for m in range(1, w + 1)]


def test_zb_v_keeps_the_order_that_a_transfer_between_workers_delays_least():
    """At 2 workers and 8 micro-batches the best list-scheduled order ties the paper's with unit costs,
    but a quarter-unit transfer between workers costs it 2.5 units and the paper's order 0.75."""
    packed_rows = (  # what list scheduling with priority I, W, F runs
        "0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 0I0 3W1 0I1 0W0 0W1 0F3 0F4 3F2 3I2 3W2 3F3 3I3 0I2 3W3 0I3 0W2 "
        "0W3 0F5 0F6 3F4 3I4 3W4 3F5 3I5 0I4 3W5 0I5 0W4 0W5 0F7 3F6 3I6 3W6 3F7 3I7 0I6 3W7 0I7 0W6 0W7",
        "1F0 2F0 1F1 2F1 2I0 1I0 2W0 2I1 1I1 2W1 1W0 1W1 1F2 2F2 1F3 2F3 2I2 1I2 2W2 2I3 1I3 2W3 1W2 1W3 "
        "1F4 2F4 1F5 2F5 2I4 1I4 2W4 2I5 1I5 2W5 1W4 1W5 1F6 2F6 1F7 2F7 2I6 1I6 2W6 2I7 1I7 2W7 1W6 1W7",
    )
    rows = tuple(tuple(map(Action.parse, row.split())) for row in packed_rows)
    packed = Schedule(rows, v_placement(4, 2), 8, "zb_v")
    chosen = zb_v(4, 8)
    assert simulate(packed).makespan == simulate(chosen).makespan == 49
    assert simulate(packed, transfer=0.25).makespan == 51.5
    assert simulate(chosen, transfer=0.25).makespan == 49.75
    with pytest.raises(ValueError, match="transfer must be finite and >= 0"):
        simulate(chosen, transfer=-0.25)


def test_zero_bubble_schedules_validate_at_every_size():
    for s in range(1, 7):
        for m in range(1, 13):
            validate_schedule(zb_h1(s, m))
            validate_schedule(zb_v(2 * s, m))


def test_the_previous_stage_waits_for_i_not_w():
    schedule = zb_h1(2, 4)
    assert dependencies(Action.parse("0I1"), schedule) == [Action.parse("0F1"), Action.parse("1I1")]
    assert dependencies(Action.parse("1W1"), schedule) == [Action.parse("1I1")]


def test_zero_bubble_layout_errors():
    with pytest.raises(ValueError, match=r"stages_per_worker=2: schedule=zb_h1 runs one stage per worker"):
        build_schedule("zb_h1", 4, 4, stages_per_worker=2)
    with pytest.raises(ValueError, match=r"stages_per_worker=1: schedule=zb_v hosts exactly two stages"):
        build_schedule("zb_v", 4, 4)
    with pytest.raises(ValueError, match=r"set pipeline.stages_per_worker=2"):
        workers_needed("zb_v", 6, 3)
    with pytest.raises(ValueError, match=r"pipeline.stages_per_worker=2 does not divide the 3 stages"):
        workers_needed("zb_v", 3, 2)
    assert workers_needed("zb_v", 6, 2) == 3
    assert workers_needed("zb_h1", 3) == 3


def _cli(*args: str) -> str:
    cmd = [sys.executable, "-m", "pipetrain.schedule", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    return result.stdout


def _bubble(output: str) -> float:
    line = next(line for line in output.splitlines() if line.startswith("predicted bubble fraction"))
    return float(line.split(": ")[1].split()[0])


def test_cli_zero_bubble_figures():
    h1 = _cli("zb_h1", "--stages", "4", "--microbatches", "8")
    assert _picture(GOLDEN_H1[(4, 8)]) in h1
    assert "predicted bubble fraction: 0.111 ((S-1)/(3M+S-1) = 0.111 under unit costs)" in h1
    assert "peak in-flight micro-batches: stage 0: 4, stage 1: 4, stage 2: 4, stage 3: 4" in h1
    plain = _cli("1f1b", "--stages", "4", "--microbatches", "8")
    assert "predicted bubble fraction: 0.273" in plain
    v = _cli("zb_v", "--stages", "8", "--stages-per-worker", "2", "--microbatches", "8")
    assert "zb_v: 8 stages on 4 workers (2 per worker, v placement), 8 micro-batches" in v
    assert _bubble(v) == 0.059 < _bubble(h1)
    # Measured costs: a slow W on every stage moves the bubble.
    slow_w = _cli("zb_h1", "--stages", "2", "--microbatches", "4", "--weight-grad-costs", "3,3")
    assert _bubble(slow_w) != _bubble(_cli("zb_h1", "--stages", "2", "--microbatches", "4"))
