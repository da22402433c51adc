"""Read and write schedules as CSV: a header row, then one row per stage, its index then its actions.

::

    stage,action_0,action_1,action_2,action_3
    0,0F0,0F1,0B0,0B1
    1,1F0,1B0,1F1,1B1

The header names one column per position in a stage's action list (``action_<k>``), so spreadsheets and
``pandas.read_csv`` see labelled columns. Files without the header (written by earlier versions) still load.
"""

from __future__ import annotations

import csv
import os

from pipetrain.schedule.actions import Action, Schedule

__all__ = ["load_schedule_csv", "save_schedule_csv"]

_STAGE_COLUMN = "stage"


def _header(schedule: Schedule) -> list[str]:
    """``stage`` then ``action_0 ... action_<n-1>``, for the longest action list ``n``."""
    longest = max((len(actions) for actions in schedule.values()), default=0)
    return [_STAGE_COLUMN, *(f"action_{k}" for k in range(longest))]


def save_schedule_csv(schedule: Schedule, path: str | os.PathLike[str]) -> None:
    """Write ``schedule`` to ``path``: the header row, then one row per stage in stage order."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(_header(schedule))
        for s in sorted(schedule):
            writer.writerow([s, *(str(a) for a in schedule[s])])


def _parse_row(path: str | os.PathLike[str], row_num: int, cells: list[str]) -> tuple[int, list[Action]]:
    """The stage index and actions of one data row; ``ValueError`` naming the row when it is bad."""
    if not cells[0].isdigit():
        raise ValueError(
            f"{path}: row {row_num}: first cell must be a stage index (or {_STAGE_COLUMN!r} in the header "
            f"row), got {cells[0]!r}"
        )
    stage = int(cells[0])
    actions = []
    for text in cells[1:]:
        if not text:  # a shorter stage row padded to the header's width
            continue
        try:
            action = Action.parse(text)
        except ValueError as e:
            raise ValueError(f"{path}: row {row_num} (stage {stage}): {e}") from None
        if action.stage_idx != stage:
            raise ValueError(
                f"{path}: row {row_num} is stage {stage} but holds action {action} of stage "
                f"{action.stage_idx}"
            )
        actions.append(action)
    return stage, actions


def load_schedule_csv(path: str | os.PathLike[str]) -> Schedule:
    """Read a schedule written by :func:`save_schedule_csv` (blank lines and empty cells are skipped).

    The header row is optional: a first row whose first cell is ``stage`` is the header, a first row
    starting with a stage index is data (the header-less format of earlier versions). Raises
    ``ValueError`` naming the row for a bad stage index, a repeated stage, unparsable action text, or
    an action whose stage differs from its row's stage.
    """
    schedule: Schedule = {}
    seen_first_row = False
    with open(path, newline="", encoding="utf-8-sig") as f:  # a spreadsheet's byte-order mark is skipped
        for row_num, row in enumerate(csv.reader(f), start=1):
            cells = [c.strip() for c in row]
            if not any(cells):
                continue
            is_header = not seen_first_row and cells[0].lower() == _STAGE_COLUMN
            seen_first_row = True
            if is_header:
                continue
            stage, actions = _parse_row(path, row_num, cells)
            if stage in schedule:
                raise ValueError(f"{path}: row {row_num}: stage {stage} appears more than once")
            schedule[stage] = actions
    return schedule
