"""Tests of pipetrain.schedule: builders, placements, validator, simulator, rendering, CSV and CLI."""

import pickle
import subprocess
import sys
import textwrap
import types

import pytest

from pipetrain.schedule import (
    SCHEDULE_BUILDERS,
    Action,
    ActionKind,
    Schedule,
    StageCosts,
    build_schedule,
    dependencies,
    execution_order,
    gpipe,
    input_dependency,
    interleaved_1f1b,
    load_schedule_csv,
    loop_placement,
    make_placement,
    one_f_one_b,
    one_placement,
    output_consumer,
    placement_kind,
    render_schedule,
    render_timeline,
    save_schedule_csv,
    simulate,
    v_placement,
    validate_schedule,
    workers_needed,
)

F, B, IG, WG = ActionKind.FORWARD, ActionKind.BACKWARD, ActionKind.INPUT_GRAD, ActionKind.WEIGHT_GRAD


def _acts(text: str) -> tuple[Action, ...]:
    return tuple(Action.parse(t) for t in text.split())


def _rows(*texts: str) -> Schedule:
    """A schedule from one text row per worker, its placement read off the rows."""
    return Schedule.from_rows([_acts(t) for t in texts])


def _schedule(rows: dict[int, str], placement=None, num_microbatches: int = 1) -> Schedule:
    """A schedule with an explicit placement (identity by default), for the validator's error cases."""
    actions = [_acts(rows[w]) if isinstance(rows[w], str) else rows[w] for w in sorted(rows)]
    placement = tuple(range(len(actions))) if placement is None else placement
    return Schedule(actions, placement, num_microbatches)


def _picture(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


# --- golden timelines -------------------------------------------------------------------------------

GOLDEN = {
    ("gpipe", 2, 4): """
        stage 0: 0F0 0F1 0F2 0F3 .   .   0B0 0B1 0B2 0B3
        stage 1: .   1F0 1F1 1F2 1F3 1B0 1B1 1B2 1B3 .
    """,
    ("1f1b", 2, 4): """
        stage 0: 0F0 0F1 .   0B0 0F2 0B1 0F3 0B2 .   0B3
        stage 1: .   1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3 .
    """,
    ("1f1b", 4, 8): """
        stage 0: 0F0 0F1 0F2 0F3 .   .   .   0B0 0F4 0B1 0F5 0B2 0F6 0B3 0F7 0B4 .   0B5 .   0B6 .   0B7
        stage 1: .   1F0 1F1 1F2 .   .   1B0 1F3 1B1 1F4 1B2 1F5 1B3 1F6 1B4 1F7 1B5 .   1B6 .   1B7 .
        stage 2: .   .   2F0 2F1 .   2B0 2F2 2B1 2F3 2B2 2F4 2B3 2F5 2B4 2F6 2B5 2F7 2B6 .   2B7 .   .
        stage 3: .   .   .   3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3F4 3B4 3F5 3B5 3F6 3B6 3F7 3B7 .   .   .
    """,
    ("gpipe", 3, 2): """
        stage 0: 0F0 0F1 .   .   .   .   0B0 0B1
        stage 1: .   1F0 1F1 .   .   1B0 1B1 .
        stage 2: .   .   2F0 2F1 2B0 2B1 .   .
    """,
    ("gpipe", 1, 3): """
        stage 0: 0F0 0F1 0F2 0B0 0B1 0B2
    """,
    ("1f1b", 1, 3): """
        stage 0: 0F0 0B0 0F1 0B1 0F2 0B2
    """,
}


@pytest.mark.parametrize("key", list(GOLDEN), ids=lambda k: f"{k[0]}-{k[1]}x{k[2]}")
def test_golden_timeline(key):
    name, stages, mbs = key
    assert render_timeline(simulate(build_schedule(name, stages, mbs))) == _picture(GOLDEN[key])


# Interleaved 1F1B, loop placement: worker r hosts stages r, r+W, ... Megatron-LM's order, worked by hand
# for 2 workers x 2 stages, 4 micro-batches (rounds of W=2 micro-batches, virtual micro-batch k ->
# chunk (k // 2) % 2, micro-batch 2 * (k // 4) + k % 2; worker r warms up with (v-1)*W + 2*(W-1-r)
# forwards: 4 on worker 0, 2 on worker 1):
#   worker 0: F 0F0 0F1 2F0 2F1 | F/B 0F2 2B0, 0F3 2B1, 2F2 0B0, 2F3 0B1 | B 2B2 2B3 0B2 0B3
#   worker 1: F 1F0 1F1 | F/B 3F0 3B0, 3F1 3B1, 1F2 1B0, 1F3 1B1, 3F2 3B2, 3F3 3B3 | B 1B2 1B3
# Timed under unit costs: worker 0 idles while 3B2 and 3B3 run, waiting for their gradients; worker 1
# idles first (for 0F0) and last (while 0B3 runs).
GOLDEN_INTERLEAVED = {
    (2, 2, 4): """
        worker 0: 0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 .   2B2 .   2B3 0B2 0B3
        worker 1: .   1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3 .
    """,
    # Two rounds of W=2 micro-batches per chunk: the steady phase repeats, the fill and drain stay the same.
    (2, 2, 8): """
        worker 0: 0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 0F4 2B2 0F5 2B3 2F4 0B2 2F5 0B3 0F6 2B4 0F7 2B5 2F6 0B4 2F7 0B5 .   2B6 .   2B7 0B6 0B7
        worker 1: .   1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1F4 1B2 1F5 1B3 3F4 3B4 3F5 3B5 1F6 1B4 1F7 1B5 3F6 3B6 3F7 3B7 1B6 1B7 .
    """,  # noqa: E501
    # 3 workers: worker 0 warms up with 3 + 4 = 7 forwards (0F0-0F2, 3F0-3F2, 0F3), worker 2 with 3.
    (3, 2, 6): """
        worker 0: 0F0 0F1 0F2 3F0 3F1 3F2 0F3 0F4 3B0 0F5 3B1 .   3F3 3B2 3F4 0B0 3F5 0B1 0B2 .   3B3 .   3B4 .   3B5 0B3 0B4 0B5
        worker 1: .   1F0 1F1 1F2 4F0 4F1 4F2 4B0 1F3 4B1 1F4 4B2 1F5 1B0 4F3 1B1 4F4 1B2 4F5 4B3 .   4B4 .   4B5 1B3 1B4 1B5 .
        worker 2: .   .   2F0 2F1 2F2 5F0 5B0 5F1 5B1 5F2 5B2 2F3 2B0 2F4 2B1 2F5 2B2 5F3 5B3 5F4 5B4 5F5 5B5 2B3 2B4 2B5 .   .
    """,  # noqa: E501
}


@pytest.mark.parametrize("key", list(GOLDEN_INTERLEAVED), ids=lambda k: f"W{k[0]}xv{k[1]}-m{k[2]}")
def test_golden_interleaved_timeline(key):
    num_workers, v, m = key
    schedule = build_schedule("interleaved_1f1b", num_workers * v, m, stages_per_worker=v)
    picture = _picture(GOLDEN_INTERLEAVED[key])
    assert render_timeline(simulate(schedule)) == picture
    # The picture without its idle columns is each worker's action list.
    for w, line in enumerate(picture.splitlines()):
        assert " ".join(map(str, schedule[w])) == " ".join(line.split(": ", 1)[1].replace(".", "").split())


def test_interleaved_bubble_below_1f1b():
    interleaved = simulate(build_schedule("interleaved_1f1b", 4, 8, stages_per_worker=2))
    plain = simulate(build_schedule("1f1b", 2, 8))
    assert interleaved.bubble_fraction == pytest.approx(1 / 17)  # (W-1)/(v*m+W-1) = 0.059
    assert plain.bubble_fraction == pytest.approx(1 / 9)  # (S-1)/(m+S-1) = 0.111
    assert interleaved.bubble_fraction < plain.bubble_fraction


def test_interleaved_unit_bubble_formula():
    """Under unit costs the bubble is (W-1)/(v*m+W-1) whenever m >= W."""
    for num_workers in range(1, 5):
        for v in range(2, 4):
            for m in range(num_workers, 17):
                try:
                    schedule = interleaved_1f1b(num_workers * v, m, v)
                except ValueError:
                    continue
                expected = (num_workers - 1) / (v * m + num_workers - 1)
                assert simulate(schedule).bubble_fraction == pytest.approx(expected), (num_workers, v, m)


def _torch_interleaved(num_workers: int, v: int, m: int, rank: int = 0):
    """PyTorch's ScheduleInterleaved1F1B for rank ``rank``, built from stand-in stages (no processes)."""
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    stages = [
        types.SimpleNamespace(
            num_stages=num_workers * v,
            group_size=num_workers,
            group_rank=rank,
            stage_index=c * num_workers + rank,
        )
        for c in range(v)
    ]
    return schedules.ScheduleInterleaved1F1B(stages, m)


def test_interleaved_order_matches_pytorch():
    """Per rank, the compute actions of PyTorch's ScheduleInterleaved1F1B, its idle slots dropped."""
    compared = 0
    for num_workers in range(1, 5):
        for v in range(2, 4):
            for m in range(1, 13):
                try:
                    ours = interleaved_1f1b(num_workers * v, m, v)
                except ValueError as ours_error:
                    with pytest.raises(ValueError, match="multiple of the number of rounds"):
                        _torch_interleaved(num_workers, v, m)
                    assert "pipeline.num_microbatches" in str(ours_error)
                    continue
                theirs = _torch_interleaved(num_workers, v, m).pipeline_order
                for w in range(num_workers):
                    assert [str(a) for a in ours[w]] == [str(a) for a in theirs[w] if a is not None], (
                        num_workers,
                        v,
                        m,
                        w,
                    )
                compared += 1
    assert compared > 60


@pytest.mark.parametrize("num_workers", range(1, 6))
@pytest.mark.parametrize("v", range(2, 5))
def test_interleaved_builds_valid_schedules(num_workers, v):
    for m in range(1, 25):
        try:
            schedule = interleaved_1f1b(num_workers * v, m, v)
        except ValueError as error:
            assert m > num_workers and m % max(1, m // num_workers), (m, error)
            continue
        validate_schedule(schedule)
        assert schedule.placement == loop_placement(num_workers * v, num_workers)
        assert schedule.num_workers == num_workers and schedule.name == "interleaved_1f1b"


def test_interleaved_peak_in_flight():
    peaks = simulate(interleaved_1f1b(4, 8, 2)).peak_in_flight
    assert peaks == {0: 4, 1: 3, 2: 2, 3: 1}


def test_builders_action_lists():
    assert gpipe(2, 2) == Schedule((_acts("0F0 0F1 0B0 0B1"), _acts("1F0 1F1 1B0 1B1")), (0, 1), 2, "gpipe")
    assert one_f_one_b(3, 2).actions == (
        _acts("0F0 0F1 0B0 0B1"),
        _acts("1F0 1F1 1B0 1B1"),
        _acts("2F0 2B0 2F1 2B1"),
    )
    assert one_f_one_b(3, 2).placement == (0, 1, 2)
    assert set(SCHEDULE_BUILDERS) == {"gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zb_v"}
    assert {name: b.placement for name, b in SCHEDULE_BUILDERS.items()} == {
        "gpipe": "one",
        "1f1b": "one",
        "interleaved_1f1b": "loop",
        "zb_h1": "one",
        "zb_v": "v",
    }


# --- schedule data and placements -------------------------------------------------------------------


def test_schedule_is_frozen_hashable_data():
    schedule = one_f_one_b(2, 2)
    assert schedule.num_stages == 2 and schedule.num_workers == 2 and schedule.num_microbatches == 2
    assert schedule[1] == _acts("1F0 1B0 1F1 1B1")
    assert [w for w, _ in schedule.items()] == [0, 1]
    assert hash(schedule) == hash(one_f_one_b(2, 2)) and schedule == one_f_one_b(2, 2)
    assert {schedule: 1}[one_f_one_b(2, 2)] == 1
    assert pickle.loads(pickle.dumps(schedule)) == schedule
    with pytest.raises(AttributeError):
        schedule.num_microbatches = 3  # type: ignore[misc]
    lists = Schedule([list(_acts("0F0 0B0"))], [0], 1)
    assert lists.actions == (_acts("0F0 0B0"),) and lists.placement == (0,)


def test_schedule_workers_and_stages():
    schedule = interleaved_1f1b(6, 6, 2)
    assert schedule.placement == (0, 1, 2, 0, 1, 2)
    assert [schedule.worker_of(s) for s in range(6)] == [0, 1, 2, 0, 1, 2]
    assert schedule.stages_of(1) == (1, 4)
    assert not schedule.one_stage_per_worker and gpipe(3, 1).one_stage_per_worker


def test_schedule_from_rows_infers_placement():
    schedule = _rows("0F0 3F0 3B0 0B0", "1F0 2F0 2B0 1B0")
    assert schedule.placement == (0, 1, 1, 0) and schedule.num_microbatches == 1
    assert placement_kind(schedule.placement) == "v"
    with pytest.raises(ValueError, match=r"stage 1 has actions on worker 0 and on worker 1 \(e.g. 1B0\)"):
        _rows("0F0 1F0 0B0", "1B0")
    with pytest.raises(ValueError, match="stage 1 has no actions on any worker"):
        _rows("0F0 0B0", "2F0 2B0")
    with pytest.raises(ValueError, match="pipeline.num_microbatches must be an int >= 1, got 0"):
        Schedule([], (), 0)
    with pytest.raises(ValueError, match=r"placement\[1\] must be a worker index"):
        Schedule([()], (0, -1), 1)


def test_placements():
    assert one_placement(3) == (0, 1, 2)
    assert loop_placement(6, 3) == (0, 1, 2, 0, 1, 2)
    assert v_placement(6, 3) == (0, 1, 2, 2, 1, 0)  # stages s and 2W-1-s on worker s
    assert v_placement(6, 2) == (0, 1, 1, 0, 0, 1)  # a zigzag over three stages per worker
    assert make_placement("loop", 4, 2) == (0, 1, 0, 1)
    assert placement_kind((0, 1, 2)) == "one"
    assert placement_kind((0, 1, 0, 1)) == "loop"
    assert placement_kind((1, 0)) is None
    with pytest.raises(ValueError, match="cannot be shared evenly by 2 workers"):
        loop_placement(5, 2)
    with pytest.raises(ValueError, match="unknown placement 'ring'"):
        make_placement("ring", 2, 2)


# --- dependency rules -------------------------------------------------------------------------------

SPLIT = ("0F0 0F1 0I0 0I1 0W0 0W1", "1F0 1I0 1F1 1I1 1W0 1W1")
"""Two stages, two micro-batches, backward split into I and W (W deferred to fill the drain)."""


def test_dependencies_full_backward():
    schedule = interleaved_1f1b(4, 2, 2)
    a = Action.parse
    assert input_dependency(a("2F1"), schedule) == a("1F1")
    assert input_dependency(a("0F1"), schedule) is None
    assert input_dependency(a("3B1"), schedule) is None
    assert input_dependency(a("2B1"), schedule) == a("3B1")
    assert output_consumer(a("1F0"), schedule) == a("2F0")
    assert output_consumer(a("3F0"), schedule) is None
    assert output_consumer(a("1B0"), schedule) == a("0B0")
    assert output_consumer(a("0B0"), schedule) is None
    assert dependencies(a("2B1"), schedule) == [a("2F1"), a("3B1")]
    assert dependencies(a("2F1"), schedule) == [a("1F1")]


def test_dependencies_split_backward():
    schedule = _rows(*SPLIT)
    a = Action.parse
    assert input_dependency(a("0I0"), schedule) == a("1I0")
    assert output_consumer(a("1I0"), schedule) == a("0I0")
    assert input_dependency(a("1W0"), schedule) is None
    assert output_consumer(a("1W0"), schedule) is None
    assert dependencies(a("0W1"), schedule) == [a("0I1")]
    assert dependencies(a("0I1"), schedule) == [a("0F1"), a("1I1")]
    # A stage's full backward consumes the next stage's I when that stage splits its backward.
    mixed = _rows("0F0 0B0", "1F0 1I0 1W0")
    assert input_dependency(a("0B0"), mixed) == a("1I0")
    assert output_consumer(a("1I0"), mixed) == a("0B0")


def test_execution_order_is_feasible_and_cached():
    schedule = interleaved_1f1b(4, 4, 2)
    order, stuck = execution_order(schedule)
    assert stuck == {} and sorted(order) == sorted(a for row in schedule.actions for a in row)
    position = {a: k for k, a in enumerate(order)}
    for a in order:
        assert all(position[d] < position[a] for d in dependencies(a, schedule))
    order.clear()  # callers get copies
    assert execution_order(schedule)[0]


# --- bubble and memory ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("forward,backward", [(1.0, 1.0), (1.0, 2.0), (0.5, 1.5)])
def test_bubble_fraction_matches_formula(name, forward, backward):
    for s in range(1, 6):
        for m in range(1, 10):
            costs = StageCosts((forward,) * s, (backward,) * s)
            timeline = simulate(build_schedule(name, s, m), costs)
            assert timeline.bubble_fraction == pytest.approx((s - 1) / (m + s - 1)), (s, m)
            assert timeline.makespan == pytest.approx((m + s - 1) * (forward + backward)), (s, m)


def test_peak_in_flight():
    for s in range(1, 6):
        for m in range(1, 10):
            assert simulate(gpipe(s, m)).peak_in_flight == dict.fromkeys(range(s), m)
            assert simulate(one_f_one_b(s, m)).peak_in_flight == {j: min(s - j, m) for j in range(s)}


# --- simulator with non-uniform costs ---------------------------------------------------------------


def test_simulate_non_uniform_costs():
    costs = StageCosts(forward=(1, 2), backward=(3, 1))
    timeline = simulate(one_f_one_b(2, 3), costs)
    # Worked by hand: 0B0 waits for 1B0 (ends 4), 0B2 waits for 1B2 (ends 11).
    assert render_timeline(timeline) == _picture("""
        stage 0: 0F0 0F1 .   .   0B0-------- 0F2 0B1-------- 0B2--------
        stage 1: .   1F0---- 1B0 1F1---- 1B1 .   1F2---- 1B2 .   .   .
        (one column = 1 time unit)
    """)
    times = " ".join(f"{t.action}@{t.start:g}-{t.end:g}" for t in timeline.entries[0])
    assert times == "0F0@0-1 0F1@1-2 0B0@4-7 0F2@7-8 0B1@8-11 0B2@11-14"
    assert timeline.makespan == 14
    assert (timeline.busy(0), timeline.idle(0)) == (12, 2)
    assert (timeline.busy(1), timeline.idle(1)) == (9, 5)
    assert timeline.bubble_fraction == pytest.approx(7 / 28)
    assert [(t.start, t.end) for t in timeline.entries[1]][:2] == [(1, 3), (3, 4)]


def test_simulate_two_stages_on_one_worker_share_it():
    """The worker is the resource: its stages' actions never overlap, and each takes its stage's cost."""
    schedule = _rows("0F0 1F0 1B0 0B0")
    timeline = simulate(schedule, StageCosts((1, 2), (3, 4)))
    assert [(str(t.action), t.start, t.end) for t in timeline.entries[0]] == [
        ("0F0", 0, 1),
        ("1F0", 1, 3),
        ("1B0", 3, 7),
        ("0B0", 7, 10),
    ]
    assert timeline.bubble_fraction == 0
    assert render_timeline(timeline) == _picture("""
        worker 0: 0F0 1F0---- 1B0------------ 0B0--------
        (one column = 1 time unit)
    """)


def test_simulate_split_backward():
    schedule = _rows(*SPLIT)
    # With I and W costing 1 each: 0I0 waits for 1I0 (ends 3), 0I1 for 1I1 (ends 5); W fills the drain.
    timeline = simulate(schedule, StageCosts((1, 1), (2, 2), input_grad=(1, 1), weight_grad=(1, 1)))
    assert render_timeline(timeline) == _picture("""
        stage 0: 0F0 0F1 .   0I0 .   0I1 0W0 0W1
        stage 1: .   1F0 1I0 1F1 1I1 1W0 1W1 .
    """)
    assert timeline.bubble_fraction == pytest.approx(4 / 16)  # 1f1b with B = 2: 1/3
    assert timeline.peak_in_flight == {0: 2, 1: 2}  # a micro-batch is in flight until its W
    # By default I and W each take half the backward.
    halves = simulate(schedule, StageCosts((1, 1), (2, 2)))
    assert [t.end - t.start for t in halves.entries[0]] == [1, 1, 1, 1, 1, 1]
    assert StageCosts.unit(2).cost(Action.parse("1W0")) == 0.5


# Scaled grids: an action spans as many columns as it lasts; the last line says what a column is.
GOLDEN_SCALED = {
    # --forward-costs 1,2 --backward-costs 2,4: stage 1 is twice as slow, backward twice the forward.
    ("1f1b", 2, 3, (1, 2), (2, 4)): """
        stage 0: 0F0 0F1 .   .   .   .   .   0B0---- 0F2 .   .   .   0B1---- .   .   .   .   0B2----
        stage 1: .   1F0---- 1B0------------ 1F1---- 1B1------------ 1F2---- 1B2------------ .   .
        (one column = 1 time unit)
    """,
    ("gpipe", 2, 2, (1, 2), (2, 4)): """
        stage 0: 0F0 0F1 .   .   .   .   .   .   .   0B0---- .   .   0B1----
        stage 1: .   1F0---- 1F1---- 1B0------------ 1B1------------ .   .
        (one column = 1 time unit)
    """,
    # Uniform costs of 2: the unit picture, with the column's length said.
    ("1f1b", 2, 3, (2, 2), (2, 2)): """
        stage 0: 0F0 0F1 .   0B0 0F2 0B1 .   0B2
        stage 1: .   1F0 1B0 1F1 1B1 1F2 1B2 .
        (one column = 2 time units)
    """,
    # Fractional times: one column is the longest step every start and end is a multiple of.
    ("gpipe", 1, 2, (0.5,), (1.25,)): """
        stage 0: 0F0---- 0F1---- 0B0---------------- 0B1----------------
        (one column = 0.25 time units)
    """,
    # 0.1 + 0.2 is not exactly 0.3 in floating point; the grid still is exact.
    ("1f1b", 2, 2, (0.1, 0.1), (0.2, 0.2)): """
        stage 0: 0F0 0F1 .   .   0B0---- .   0B1----
        stage 1: .   1F0 1B0---- 1F1 1B1---- .   .
        (one column = 0.1 time units)
    """,
    # An exact grid would need 137 columns for 1.37: one column is the shortest action, times rounded.
    ("1f1b", 2, 2, (1, 1.37), (2, 2.5)): """
        stage 0: 0F0 0F1 .   .   .   0B0---- .   .   0B1----
        stage 1: .   1F0 1B0-------- 1F1 1B1-------- .   .
        (one column = 1 time unit; starts and ends rounded to the nearest column)
    """,
}


@pytest.mark.parametrize("key", list(GOLDEN_SCALED), ids=lambda k: f"{k[0]}-{k[1]}x{k[2]}-{k[3]}-{k[4]}")
def test_golden_scaled_timeline(key):
    name, stages, mbs, forward, backward = key
    timeline = simulate(build_schedule(name, stages, mbs), StageCosts(forward, backward))
    assert render_timeline(timeline) == _picture(GOLDEN_SCALED[key])


@pytest.mark.parametrize(
    "costs,num_microbatches",
    [
        (StageCosts((1, 2), (2, 4)), 5),
        (StageCosts((1, 3), (2, 1)), 5),
        (StageCosts((0.5, 0.75), (1, 1.5)), 5),
        (StageCosts((1, 1), (2, 2)), 12),  # two-digit micro-batches: wider columns
    ],
)
def test_scaled_grid_draws_the_simulated_times(costs, num_microbatches):
    """Each action's cell starts at column start / quantum and spans (end - start) / quantum columns,
    its label followed by ``-`` (or by spaces when it spans one column)."""
    timeline = simulate(one_f_one_b(2, num_microbatches), costs)
    *rows, legend = render_timeline(timeline).splitlines()
    quantum = float(legend.removeprefix("(one column = ").split()[0])
    width = len(str(Action(1, B, num_microbatches - 1))) + 1
    for stage_idx, row in enumerate(rows):
        cells = row.split(": ", 1)[1].ljust(width * round(timeline.makespan / quantum))
        for t in timeline.entries[stage_idx]:
            column = round(t.start / quantum)
            span = round((t.end - t.start) / quantum)
            cell = cells[width * column : width * (column + span) - 1]
            label = str(t.action)
            fill = "-" if span > 1 else " "
            assert cell == label + fill * (len(cell) - len(label)), (t, cell)


def test_render_zero_duration_actions_as_a_list():
    timeline = simulate(gpipe(1, 2), StageCosts((0.0,), (1.0,)))
    assert render_timeline(timeline) == "stage 0: 0F0@0-0 0F1@0-0 0B0@0-1 0B1@1-2"


def test_render_schedule_marks_an_action():
    schedule = one_f_one_b(2, 2)
    assert render_schedule(schedule, {0: Action.parse("0B0")}) == _picture("""
        stage 0: 0F0 0F1 [0B0] 0B1  <-- here
        stage 1: 1F0 1B0 1F1 1B1
    """)
    assert (
        render_schedule(interleaved_1f1b(4, 2, 2)).splitlines()[1]
        == "worker 1: 1F0 1F1 3F0 3B0 3F1 3B1 1B0 1B1"
    )


def test_stage_costs_validation():
    assert StageCosts.unit(3) == StageCosts((1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="2 forward costs but 1 backward"):
        StageCosts((1, 1), (1,))
    with pytest.raises(ValueError, match="backward cost of stage 1 must be finite and >= 0"):
        StageCosts((1, 1), (1, -2))
    with pytest.raises(ValueError, match="1 input_grad costs but 2 stages"):
        StageCosts((1, 1), (1, 1), input_grad=(1,))
    with pytest.raises(ValueError, match="weight_grad cost of stage 0 must be finite"):
        StageCosts((1,), (1,), weight_grad=(float("nan"),))
    with pytest.raises(ValueError, match="StageCosts describe 3 stages but the schedule has 2"):
        simulate(gpipe(2, 2), StageCosts.unit(3))


def test_simulate_validates_first():
    with pytest.raises(ValueError, match="stage 1: action 1B0 is missing"):
        simulate(_schedule({0: "0F0 0B0", 1: "1F0"}))


# --- validator --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_builders_pass_validation(name):
    for s in range(1, 6):
        for m in range(1, 10):
            validate_schedule(build_schedule(name, s, m))


@pytest.mark.parametrize(
    "schedule,match",
    [
        (
            _schedule({0: "0F0 0B0"}, placement=(0, 1)),
            r"placement puts stage 1 on worker 1, but the schedule has 1",
        ),
        (_schedule({0: "0F0 0B0", 1: ""}, placement=(0,)), r"worker 1 hosts no stage"),
        (
            _schedule({0: "0F0 0B0 1F0", 1: "1F0 1B0"}),
            r"worker 0: action 1F0 belongs to stage 1, which the placement",
        ),
        (
            _schedule({0: "0F0 0B0 2F0", 1: "1F0 1B0"}),
            r"worker 0: action 2F0 is of stage 2, but the schedule has 2",
        ),
        (
            _schedule({0: "0F0 0B0", 1: "1F0"}),
            r"stage 1: action 1B0 is missing \(a full backward, or 1I0 and 1W0\)",
        ),
        (_schedule({0: "0B0", 1: "1F0 1B0"}), r"stage 0: action 0F0 is missing"),
        (_schedule({0: "0F0 0F0 0B0", 1: "1F0 1B0"}), r"stage 0: action 0F0 is duplicated \(2 times\)"),
        (_schedule({0: "0F0 0B0 0F3", 1: "1F0 1B0"}), r"worker 0: action 0F3 has micro-batch 3"),
        (_schedule({0: "0B0 0F0", 1: "1F0 1B0"}), r"worker 0: backward 0B0 comes before its forward 0F0"),
        (_schedule({0: ("0F0", "0B0"), 1: "1F0 1B0"}), r"worker 0: '0F0' is not an Action"),
        (
            _schedule({0: "0F0 0B0", 1: "1F0 1I0"}),
            r"stage 1: action 1W0 is missing \(1I0 needs its other half\)",
        ),
        (_schedule({0: "0F0 0B0", 1: "1F0 1W0"}), r"stage 1: action 1I0 is missing"),
        (_schedule({0: "0F0 0B0", 1: "1F0 1B0 1W0"}), r"stage 1: micro-batch 0 has both 1B0 and 1W0"),
        (
            _schedule({0: "0F0 0B0", 1: "1F0 1W0 1I0"}),
            r"worker 1: weight gradient 1W0 comes before its input",
        ),
        (_schedule({0: "0F0 1F0 1B0 0B0"}, placement=(0, 0)), None),  # two stages on one worker: fine
    ],
)
def test_validator_errors(schedule, match):
    if match is None:
        validate_schedule(schedule)
        return
    with pytest.raises(ValueError, match=match):
        validate_schedule(schedule)


def test_validator_detects_deadlock():
    # Worker 0 wants 0B0 (needs 1B0) before 0F1; worker 1 wants 1F1 (needs 0F1) before 1B0.
    schedule = _schedule({0: "0F0 0B0 0F1 0B1", 1: "1F1 1F0 1B0 1B1"}, num_microbatches=2)
    with pytest.raises(ValueError, match="deadlock") as err:
        validate_schedule(schedule)
    message = str(err.value)
    assert "worker 0 stuck at 0B0 (waiting for 1B0)" in message
    assert "worker 1 stuck at 1F1 (waiting for 0F1)" in message
    assert message.endswith("stage 0: 0F0 [0B0] 0F1 0B1  <-- here\nstage 1: [1F1] 1F0 1B0 1B1  <-- here")


def test_validator_detects_deadlock_within_a_worker():
    # Stage 0's backward of micro-batch 0 needs stage 1's, which its own worker runs later.
    schedule = _schedule({0: "0F0 1F0 0B0 1B0"}, placement=(0, 0))
    with pytest.raises(ValueError, match=r"worker 0 stuck at 0B0 \(waiting for 1B0\)"):
        validate_schedule(schedule)


def test_validator_bad_input():
    with pytest.raises(ValueError, match="expected a Schedule, got dict"):
        validate_schedule({0: []})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="schedule has no workers"):
        validate_schedule(Schedule((), (), 1))


# --- builders registry ------------------------------------------------------------------------------


def test_build_schedule_errors():
    with pytest.raises(
        ValueError, match=r"unknown schedule 'zb'.*`schedule`.*1f1b, gpipe, interleaved_1f1b, zb_h1, zb_v"
    ):
        build_schedule("zb", 2, 4)
    with pytest.raises(ValueError, match="pipeline.num_microbatches must be an int >= 1, got 0"):
        build_schedule("1f1b", 2, 0)
    with pytest.raises(ValueError, match="stages must be an int >= 1, got 0"):
        build_schedule("gpipe", 0, 4)
    with pytest.raises(ValueError, match="pipeline.stages_per_worker must be an int >= 1, got 0"):
        build_schedule("interleaved_1f1b", 4, 4, 0)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_one_stage_per_worker_schedules_refuse_several(name):
    pattern = (
        rf"pipeline.stages_per_worker=2: schedule={name} runs one stage per worker; set "
        r"pipeline.stages_per_worker=1, or pick a schedule that hosts several stages per worker "
        r"\(interleaved_1f1b, zb_v\)"
    )
    with pytest.raises(ValueError, match=pattern):
        build_schedule(name, 4, 4, stages_per_worker=2)
    with pytest.raises(ValueError, match=pattern):
        workers_needed(name, 4, 2)


def test_interleaved_errors():
    with pytest.raises(
        ValueError, match=r"schedule=interleaved_1f1b needs pipeline.stages_per_worker >= 2.*schedule=1f1b"
    ):
        build_schedule("interleaved_1f1b", 4, 4)
    with pytest.raises(
        ValueError, match=r"pipeline.stages_per_worker=4 does not divide the 6 stages \(pipeline.balance"
    ):
        build_schedule("interleaved_1f1b", 6, 6, stages_per_worker=4)
    message = (
        r"pipeline.num_microbatches=9: interleaved_1f1b on 4 workers runs micro-batches in equal rounds "
        r"of at least 4 \(one per worker\), and 2 rounds cannot split 9 evenly; set it to e.g. 8 or 10"
    )
    with pytest.raises(ValueError, match=message):
        build_schedule("interleaved_1f1b", 8, 9, stages_per_worker=2)
    # Accepted: multiples of W, counts below W, and equal rounds of more than W (10 = 2 rounds of 5).
    for m in (3, 4, 8, 10, 12, 15):
        validate_schedule(build_schedule("interleaved_1f1b", 8, m, stages_per_worker=2))


def test_workers_needed():
    assert workers_needed("1f1b", 4) == 4
    assert workers_needed("interleaved_1f1b", 8, 2) == 4
    assert workers_needed("interleaved_1f1b", 6, 3) == 2
    with pytest.raises(ValueError, match="pipeline.stages_per_worker=4 does not divide the 6 stages"):
        workers_needed("interleaved_1f1b", 6, 4)
    with pytest.raises(ValueError, match="needs pipeline.stages_per_worker >= 2"):
        workers_needed("interleaved_1f1b", 6, 1)
    with pytest.raises(ValueError, match="unknown schedule"):
        workers_needed("zigzag", 2)


# --- text and CSV -----------------------------------------------------------------------------------


def test_action_text_round_trip():
    assert str(Action(2, F, 5)) == "2F5"
    assert str(Action(0, B, 3)) == "0B3"
    assert str(Action(1, IG, 2)) == "1I2" and str(Action(1, WG, 2)) == "1W2"
    assert Action.parse("12B34") == Action(12, B, 34)
    assert Action.parse("1I2") == Action(1, IG, 2) and Action.parse("1W2") == Action(1, WG, 2)
    for action in [a for _, acts in interleaved_1f1b(4, 4, 2).items() for a in acts]:
        assert Action.parse(str(action)) == action
    assert Action(0, "F", 1) == Action(0, F, 1)


@pytest.mark.parametrize("text", ["", "F0", "0X1", "0F", "-1F0", "0F1x", "0 F 1", "1SEND_F0"])
def test_action_parse_rejects_bad_text(text):
    with pytest.raises(ValueError, match="invalid action text"):
        Action.parse(text)


def test_csv_round_trip(tmp_path):
    path = tmp_path / "schedule.csv"
    schedule = one_f_one_b(3, 4)
    save_schedule_csv(schedule, path)
    assert path.read_text().splitlines()[:2] == [
        "worker,action_0,action_1,action_2,action_3,action_4,action_5,action_6,action_7",
        "0,0F0,0F1,0F2,0B0,0F3,0B1,0B2,0B3",
    ]
    loaded = load_schedule_csv(path)
    assert (loaded.actions, loaded.placement, loaded.num_microbatches) == (
        schedule.actions,
        schedule.placement,
        schedule.num_microbatches,
    )
    assert load_schedule_csv(path, name="1f1b") == schedule


def test_csv_round_trip_several_stages_per_worker(tmp_path):
    path = tmp_path / "schedule.csv"
    schedule = interleaved_1f1b(6, 6, 2)
    save_schedule_csv(schedule, path)
    assert path.read_text().splitlines()[2].startswith("1,1F0,1F1,1F2,4F0")
    assert load_schedule_csv(path, name="interleaved_1f1b") == schedule
    split = _rows(*SPLIT)
    save_schedule_csv(split, path)
    assert load_schedule_csv(path) == split


def test_csv_header_labels_the_longest_row(tmp_path):
    path = tmp_path / "schedule.csv"
    save_schedule_csv(_rows("0F0 0B0", "1F0 1B0 1F1 1B1"), path)
    assert path.read_text() == "worker,action_0,action_1,action_2,action_3\n0,0F0,0B0\n1,1F0,1B0,1F1,1B1\n"


def test_csv_of_earlier_versions_still_loads(tmp_path):
    """One row per stage, under a ``stage`` header or none: stage k on worker k."""
    path = tmp_path / "old.csv"
    path.write_text("0,0F0,0F1,0B0,0B1\n1,1F0,1B0,1F1,1B1\n")
    assert load_schedule_csv(path, name="1f1b") == one_f_one_b(2, 2)
    path.write_text("stage,action_0,action_1,action_2,action_3\n1,1F0,1B0,1F1,1B1\n0,0F0,0F1,0B0,0B1\n")
    assert load_schedule_csv(path, name="1f1b") == one_f_one_b(2, 2)


def test_csv_from_a_spreadsheet_loads(tmp_path):
    """A byte-order mark, the header in another case, rows padded with empty cells, blank lines."""
    path = tmp_path / "edited.csv"
    text = "\ufeff\nWorker,action_0,action_1,action_2,action_3\n0,0F0,0B0,,\n\n1,1F0,1B0,,\n"
    path.write_text(text, encoding="utf-8")
    assert load_schedule_csv(path, name="1f1b") == one_f_one_b(2, 1)


@pytest.mark.parametrize(
    "content,match",
    [
        ("0,0F0,0B0\n1,1F0,0B0\n", r"row 2 is stage 1 but holds action 0B0 of stage 0"),
        ("0,0F0,0X0\n", r"row 1 \(stage 0\): invalid action text '0X0'"),
        (
            "worker,action_0\na,0F0\n",
            r"row 2: first cell must be a worker index \(or 'worker' in the header row\)",
        ),
        ("0,0F0\n0,0B0\n", r"row 2: stage 0 appears more than once"),
        ("worker,action_0\n0,0F0\nworker,action_0\n", r"row 3: first cell must be a worker index"),
        ("worker,a\n0,0F0,1F0\n1,1B0,0B0\n", r"stage 1 has actions on worker 0 and on worker 1 \(e.g. 1B0\)"),
        ("worker,a\n1,1F0,1B0\n", r"no row for worker 0 \(workers must be numbered from 0\)"),
        ("0F0,1SEND_F0\n", r"row 1 \(rank 0\): invalid action text '1SEND_F0'"),
    ],
)
def test_csv_rejects_bad_rows(tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_schedule_csv(path)


def test_torch_csv_format(tmp_path):
    """torch.distributed.pipelining's compute-only CSV: a row of actions per rank, empty cells idle."""
    path = tmp_path / "torch.csv"
    schedule = interleaved_1f1b(4, 2, 2)
    save_schedule_csv(schedule, path, format="torch")
    assert path.read_bytes() == b"0F0,0F1,2F0,2F1,2B0,2B1,0B0,0B1\r\n1F0,1F1,3F0,3B0,3F1,3B1,1B0,1B1\r\n"
    assert load_schedule_csv(path, name="interleaved_1f1b") == schedule
    assert load_schedule_csv(path, format="torch", name="interleaved_1f1b") == schedule
    path.write_text("0F0,,0B0\n,1F0,1B0\n")  # idle slots, a rank starting idle
    assert load_schedule_csv(path, name="1f1b") == one_f_one_b(2, 1)
    with pytest.raises(ValueError, match="CSV format must be one of pipetrain, torch, got 'json'"):
        save_schedule_csv(schedule, path, format="json")


@pytest.mark.parametrize(
    "schedule",
    [interleaved_1f1b(4, 4, 2), interleaved_1f1b(6, 6, 2), one_f_one_b(3, 4), _rows(*SPLIT)],
    ids=["interleaved-W2", "interleaved-W3", "1f1b", "split-backward"],
)
def test_torch_csv_round_trips_through_torch(tmp_path, schedule):
    """torch's own ``_load_csv`` reads what we write (validating it and inferring the same placement), and
    we read what its ``_dump_csv`` writes back."""
    num_workers = schedule.num_workers
    v = schedule.num_stages // num_workers
    ours = tmp_path / "ours.csv"
    save_schedule_csv(schedule, ours, format="torch")
    torch_schedule = _torch_interleaved(num_workers, v, schedule.num_microbatches)
    torch_schedule._load_csv(str(ours))
    assert {w: [str(a) for a in acts] for w, acts in torch_schedule.pipeline_order.items()} == {
        w: [str(a) for a in acts] for w, acts in schedule.items()
    }
    assert dict(torch_schedule.stage_index_to_group_rank) == dict(enumerate(schedule.placement))
    theirs = tmp_path / "theirs.csv"
    torch_schedule._dump_csv(str(theirs), format="compute_only")
    assert theirs.read_bytes() == ours.read_bytes()
    loaded = load_schedule_csv(theirs)
    assert (loaded.actions, loaded.placement, loaded.num_microbatches) == (
        schedule.actions,
        schedule.placement,
        schedule.num_microbatches,
    )


def test_torch_built_schedule_loads(tmp_path):
    """PyTorch's own interleaved schedule, idle slots included, loads as ours."""
    path = tmp_path / "theirs.csv"
    _torch_interleaved(3, 2, 6)._dump_csv(str(path), format="compute_only")
    assert path.read_text().startswith("0F0,0F1,0F2,3F0,3F1,3F2,0F3,,,,0F4")
    assert load_schedule_csv(path, name="interleaved_1f1b") == interleaved_1f1b(6, 6, 2)


# --- command line and import purity -----------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipetrain.schedule", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_cli_prints_timeline_bubble_and_peak():
    result = _cli("1f1b", "--stages", "2", "--microbatches", "4")
    assert result.returncode == 0, result.stderr
    assert "1f1b: 2 stages, 4 micro-batches" in result.stdout
    assert _picture(GOLDEN[("1f1b", 2, 4)]) in result.stdout
    assert "predicted bubble fraction: 0.200 ((S-1)/(M+S-1) = 0.200 under unit costs)" in result.stdout
    assert "peak in-flight micro-batches: stage 0: 2, stage 1: 1" in result.stdout


def test_cli_interleaved(tmp_path):
    out = tmp_path / "torch.csv"
    args = ("--stages", "4", "--stages-per-worker", "2", "--microbatches", "8", "--torch-csv", str(out))
    result = _cli("interleaved_1f1b", *args)
    assert result.returncode == 0, result.stderr
    assert (
        "interleaved_1f1b: 4 stages on 2 workers (2 per worker, loop placement), 8 micro-batches"
        in result.stdout
    )
    assert _picture(GOLDEN_INTERLEAVED[(2, 2, 8)]) in result.stdout
    assert "predicted bubble fraction: 0.059 ((W-1)/(v*M+W-1) = 0.059 under unit costs)" in result.stdout
    assert "peak in-flight micro-batches: stage 0: 4, stage 1: 3, stage 2: 2, stage 3: 1" in result.stdout
    assert f"schedule written to {out} (torch.distributed.pipelining format)" in result.stdout
    assert load_schedule_csv(out, name="interleaved_1f1b") == interleaved_1f1b(4, 8, 2)


def test_cli_costs_and_csv(tmp_path):
    out = tmp_path / "s.csv"
    result = _cli(
        "gpipe",
        "--stages",
        "2",
        "--microbatches",
        "2",
        "--forward-costs",
        "1,1",
        "--backward-costs",
        "2,2",
        "--csv",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    expected = _picture("""
        stage 0: 0F0 0F1 .   .   .   0B0---- 0B1----
        stage 1: .   1F0 1F1 1B0---- 1B1---- .   .
        (one column = 1 time unit)
        predicted bubble fraction: 0.333
    """)
    assert expected in result.stdout
    assert out.read_text().startswith("worker,action_0,action_1,action_2,action_3\n0,0F0,0F1,0B0,0B1\n")
    assert load_schedule_csv(out, name="gpipe") == gpipe(2, 2)


def test_cli_bad_input_exits_2():
    result = _cli("zigzag", "--stages", "2", "--microbatches", "4")
    assert result.returncode == 2
    assert "unknown schedule 'zigzag'" in result.stderr
    result = _cli("gpipe", "--stages", "2", "--microbatches", "4", "--forward-costs", "1")
    assert result.returncode == 2
    assert "--forward-costs has 1 values but --stages is 2" in result.stderr
    result = _cli("1f1b", "--stages", "2", "--microbatches", "4", "--weight-grad-costs", "1,x")
    assert result.returncode == 2
    assert "--weight-grad-costs must be comma-separated numbers" in result.stderr
    result = _cli("interleaved_1f1b", "--stages", "8", "--stages-per-worker", "2", "--microbatches", "9")
    assert result.returncode == 2
    assert "pipeline.num_microbatches=9" in result.stderr


def test_import_is_pure_python():
    code = (
        "import sys, pipetrain.schedule; "
        "assert not any(m.split('.')[0] in ('torch','hydra','omegaconf') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
