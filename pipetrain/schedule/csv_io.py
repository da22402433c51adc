"""Read and write schedules as CSV: one row per stage, its index then its actions (``0,0F0,0F1,...``)."""

from __future__ import annotations

import csv
import os

from pipetrain.schedule.actions import Action, Schedule

__all__ = ["load_schedule_csv", "save_schedule_csv"]


def save_schedule_csv(schedule: Schedule, path: str | os.PathLike[str]) -> None:
    """Write ``schedule`` to ``path``, one row per stage in stage order."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        for s in sorted(schedule):
            writer.writerow([s, *(str(a) for a in schedule[s])])


def load_schedule_csv(path: str | os.PathLike[str]) -> Schedule:
    """Read a schedule written by :func:`save_schedule_csv` (blank lines are skipped).

    Raises ``ValueError`` naming the row for a bad stage index, a repeated stage, unparsable
    action text, or an action whose stage differs from its row's stage.
    """
    schedule: Schedule = {}
    with open(path, newline="") as f:
        for row_num, row in enumerate(csv.reader(f), start=1):
            cells = [c.strip() for c in row]
            if not any(cells):
                continue
            if not cells[0].isdigit():
                raise ValueError(f"{path}: row {row_num}: first cell must be a stage index, got {cells[0]!r}")
            stage = int(cells[0])
            if stage in schedule:
                raise ValueError(f"{path}: row {row_num}: stage {stage} appears more than once")
            actions = []
            for text in cells[1:]:
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
            schedule[stage] = actions
    return schedule
