"""Tests of pipetrain.schedule: builders, validator, simulator, rendering, CSV and CLI."""

import subprocess
import sys
import textwrap

import pytest

from pipetrain.schedule import (
    SCHEDULE_BUILDERS,
    Action,
    ActionKind,
    StageCosts,
    build_schedule,
    gpipe,
    load_schedule_csv,
    one_f_one_b,
    render_timeline,
    save_schedule_csv,
    simulate,
    validate_schedule,
)

F, B = ActionKind.FORWARD, ActionKind.BACKWARD


def _acts(text: str) -> list[Action]:
    return [Action.parse(t) for t in text.split()]


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


def test_builders_action_lists():
    assert gpipe(2, 2) == {0: _acts("0F0 0F1 0B0 0B1"), 1: _acts("1F0 1F1 1B0 1B1")}
    assert one_f_one_b(3, 2) == {
        0: _acts("0F0 0F1 0B0 0B1"),
        1: _acts("1F0 1F1 1B0 1B1"),
        2: _acts("2F0 2B0 2F1 2B1"),
    }
    assert set(SCHEDULE_BUILDERS) == {"gpipe", "1f1b"}


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


def test_stage_costs_validation():
    assert StageCosts.unit(3) == StageCosts((1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="2 forward costs but 1 backward"):
        StageCosts((1, 1), (1,))
    with pytest.raises(ValueError, match="backward cost of stage 1 must be finite and >= 0"):
        StageCosts((1, 1), (1, -2))
    with pytest.raises(ValueError, match="StageCosts describe 3 stages but the schedule has 2"):
        simulate(gpipe(2, 2), StageCosts.unit(3))


def test_simulate_validates_first():
    with pytest.raises(ValueError, match="stage 1: action 1B0 is missing"):
        simulate({0: _acts("0F0 0B0"), 1: _acts("1F0")})


# --- validator --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_builders_pass_validation(name):
    for s in range(1, 6):
        for m in range(1, 10):
            validate_schedule(build_schedule(name, s, m), s, m)


@pytest.mark.parametrize(
    "schedule,match",
    [
        ({0: _acts("0F0 0B0")}, r"schedule is missing stage 1"),
        ({0: _acts("0F0 0B0"), 1: _acts("1F0 1B0"), 2: []}, r"unexpected stage 2"),
        ({0: _acts("0F0 0B0 1F0"), 1: _acts("1F0 1B0")}, r"stage 0: action 1F0 belongs to stage 1"),
        ({0: _acts("0F0 0B0"), 1: _acts("1F0")}, r"stage 1: action 1B0 is missing"),
        ({0: _acts("0F0 0F0 0B0"), 1: _acts("1F0 1B0")}, r"stage 0: action 0F0 is duplicated \(2 times\)"),
        ({0: _acts("0F0 0B0 0F3"), 1: _acts("1F0 1B0")}, r"stage 0: action 0F3 has micro-batch 3"),
        ({0: _acts("0B0 0F0"), 1: _acts("1F0 1B0")}, r"stage 0: backward 0B0 comes before its forward 0F0"),
        ({0: ["0F0", "0B0"], 1: _acts("1F0 1B0")}, r"stage 0: '0F0' is not an Action"),
    ],
)
def test_validator_errors(schedule, match):
    with pytest.raises(ValueError, match=match):
        validate_schedule(schedule, 2, 1)


def test_validator_detects_deadlock():
    # Stage 0 wants 0B0 (needs 1B0) before 0F1; stage 1 wants 1F1 (needs 0F1) before 1B0.
    schedule = {0: _acts("0F0 0B0 0F1 0B1"), 1: _acts("1F1 1F0 1B0 1B1")}
    with pytest.raises(ValueError, match="deadlock") as err:
        validate_schedule(schedule, 2, 2)
    message = str(err.value)
    assert "stage 0 stuck at 0B0 (waiting for 1B0)" in message
    assert "stage 1 stuck at 1F1 (waiting for 0F1)" in message


def test_validator_bad_sizes():
    with pytest.raises(ValueError, match="pipeline.num_microbatches"):
        validate_schedule({0: []}, 1, 0)


# --- builders registry ------------------------------------------------------------------------------


def test_build_schedule_errors():
    with pytest.raises(ValueError, match=r"unknown schedule 'zb'.*`schedule`.*1f1b, gpipe"):
        build_schedule("zb", 2, 4)
    with pytest.raises(ValueError, match="pipeline.num_microbatches must be an int >= 1, got 0"):
        build_schedule("1f1b", 2, 0)
    with pytest.raises(ValueError, match="stages must be an int >= 1, got 0"):
        build_schedule("gpipe", 0, 4)


# --- text and CSV -----------------------------------------------------------------------------------


def test_action_text_round_trip():
    assert str(Action(2, F, 5)) == "2F5"
    assert str(Action(0, B, 3)) == "0B3"
    assert Action.parse("12B34") == Action(12, B, 34)
    for action in [a for acts in one_f_one_b(3, 4).values() for a in acts]:
        assert Action.parse(str(action)) == action
    assert Action(0, "F", 1) == Action(0, F, 1)


@pytest.mark.parametrize("text", ["", "F0", "0X1", "0F", "-1F0", "0F1x", "0 F 1"])
def test_action_parse_rejects_bad_text(text):
    with pytest.raises(ValueError, match="invalid action text"):
        Action.parse(text)


def test_csv_round_trip(tmp_path):
    path = tmp_path / "schedule.csv"
    schedule = one_f_one_b(3, 4)
    save_schedule_csv(schedule, path)
    assert path.read_text().splitlines()[:2] == [
        "stage,action_0,action_1,action_2,action_3,action_4,action_5,action_6,action_7",
        "0,0F0,0F1,0F2,0B0,0F3,0B1,0B2,0B3",
    ]
    assert load_schedule_csv(path) == schedule


def test_csv_header_labels_the_longest_row(tmp_path):
    path = tmp_path / "schedule.csv"
    save_schedule_csv({0: _acts("0F0 0B0"), 1: _acts("1F0 1B0 1F1 1B1")}, path)
    assert path.read_text() == "stage,action_0,action_1,action_2,action_3\n0,0F0,0B0\n1,1F0,1B0,1F1,1B1\n"


def test_csv_without_header_still_loads(tmp_path):
    """Files written before the header existed: every row is a stage."""
    path = tmp_path / "old.csv"
    path.write_text("0,0F0,0F1,0B0,0B1\n1,1F0,1B0,1F1,1B1\n")
    assert load_schedule_csv(path) == one_f_one_b(2, 2)


def test_csv_from_a_spreadsheet_loads(tmp_path):
    """A byte-order mark, the header in another case, rows padded with empty cells, blank lines."""
    path = tmp_path / "edited.csv"
    text = "\ufeff\nStage,action_0,action_1,action_2,action_3\n0,0F0,0B0,,\n\n1,1F0,1B0,,\n"
    path.write_text(text, encoding="utf-8")
    assert load_schedule_csv(path) == one_f_one_b(2, 1)


@pytest.mark.parametrize(
    "content,match",
    [
        ("0,0F0,0B0\n1,1F0,0B0\n", r"row 2 is stage 1 but holds action 0B0 of stage 0"),
        ("0,0F0,0X0\n", r"row 1 \(stage 0\): invalid action text '0X0'"),
        ("a,0F0\n", r"row 1: first cell must be a stage index \(or 'stage' in the header row\), got 'a'"),
        ("0,0F0\n0,0B0\n", r"row 2: stage 0 appears more than once"),
        ("stage,action_0\n0,0F0\nstage,action_0\n", r"row 3: first cell must be a stage index"),
    ],
)
def test_csv_rejects_bad_rows(tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_schedule_csv(path)


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
    assert out.read_text().startswith("stage,action_0,action_1,action_2,action_3\n0,0F0,0F1,0B0,0B1\n")
    assert load_schedule_csv(out) == gpipe(2, 2)


def test_cli_bad_input_exits_2():
    result = _cli("zigzag", "--stages", "2", "--microbatches", "4")
    assert result.returncode == 2
    assert "unknown schedule 'zigzag'" in result.stderr
    result = _cli("gpipe", "--stages", "2", "--microbatches", "4", "--forward-costs", "1")
    assert result.returncode == 2
    assert "--forward-costs has 1 values but --stages is 2" in result.stderr


def test_import_is_pure_python():
    code = (
        "import sys, pipetrain.schedule; "
        "assert not any(m.split('.')[0] in ('torch','hydra','omegaconf') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
