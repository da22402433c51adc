"""Read and write schedules as CSV, in pipetrain's format or in ``torch.distributed.pipelining``'s.

pipetrain's format has a header row, then one row per worker: its index, then its actions::

    worker,action_0,action_1,action_2,action_3
    0,0F0,0F1,0B0,0B1
    1,1F0,1B0,1F1,1B1

The header names one column per position in a worker's action list (``action_<k>``), so spreadsheets and
``pandas.read_csv`` see labelled columns. Files of earlier versions, one row per stage under a ``stage``
header or without a header, still load (stage ``k`` on worker ``k``).

torch's compute-only format (``PipelineScheduleMulti._dump_csv`` / ``_load_csv``) has no header and no
index column: row ``r`` is rank ``r``'s actions, empty cells are idle slots::

    0F0,0F1,2F0,2F1,,,0F2,2B0,...
    ,1F0,1F1,,3F0,3B0,...

Either way the placement is read off the rows: each stage lives on the worker whose row holds its
actions. The number of micro-batches is one more than the largest micro-batch index.
"""

from __future__ import annotations

import csv
import os

from pipetrain.schedule.actions import Action
from pipetrain.schedule.schedule import Schedule

__all__ = ["CSV_FORMATS", "load_schedule_csv", "save_schedule_csv"]

CSV_FORMATS = ("pipetrain", "torch")
"""The formats :func:`save_schedule_csv` writes and :func:`load_schedule_csv` reads."""

_WORKER_COLUMN = "worker"
_STAGE_COLUMN = "stage"  # the header of earlier versions: one row per stage


def _check_format(format: str, allowed: tuple[str, ...]) -> None:
    if format not in allowed:
        raise ValueError(f"CSV format must be one of {', '.join(allowed)}, got {format!r}")


def save_schedule_csv(schedule: Schedule, path: str | os.PathLike[str], format: str = "pipetrain") -> None:
    """Write ``schedule`` to ``path`` in ``format`` (``"pipetrain"``: header, then one row per worker;
    ``"torch"``: one row of actions per rank, as ``torch.distributed.pipelining`` writes them)."""
    _check_format(format, CSV_FORMATS)
    with open(path, "w", newline="") as f:
        if format == "torch":
            csv.writer(f).writerows([str(a) for a in row] for row in schedule.actions)
            return
        writer = csv.writer(f, lineterminator="\n")
        longest = max((len(row) for row in schedule.actions), default=0)
        writer.writerow([_WORKER_COLUMN, *(f"action_{k}" for k in range(longest))])
        for w, row in schedule.items():
            writer.writerow([w, *(str(a) for a in row)])


def _read_rows(path: str | os.PathLike[str]) -> list[tuple[int, list[str]]]:
    """``(row number, stripped cells)`` of every row (a spreadsheet's byte-order mark is skipped)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [(num, [c.strip() for c in row]) for num, row in enumerate(csv.reader(f), start=1)]


def _parse(path: str | os.PathLike[str], where: str, text: str) -> Action:
    try:
        return Action.parse(text)
    except ValueError as e:
        raise ValueError(f"{path}: {where}: {e}") from None


def _load_torch(path: str | os.PathLike[str], rows: list[tuple[int, list[str]]]) -> list[list[Action]]:
    """Rank ``r``'s actions from row ``r`` (trailing blank rows dropped; empty cells are idle slots)."""
    while rows and not any(rows[-1][1]):
        rows = rows[:-1]
    return [
        [_parse(path, f"row {num} (rank {rank})", text) for text in cells if text]
        for rank, (num, cells) in enumerate(rows)
    ]


def _load_pipetrain(path: str | os.PathLike[str], rows: list[tuple[int, list[str]]]) -> list[list[Action]]:
    """Worker rows under a ``worker`` header; stage rows under a ``stage`` header or none (blank rows and
    empty cells skipped)."""
    rows = [(num, cells) for num, cells in rows if any(cells)]
    column = _STAGE_COLUMN
    if rows and rows[0][1][0].lower() in (_WORKER_COLUMN, _STAGE_COLUMN):
        column = rows[0][1][0].lower()
        rows = rows[1:]
    by_index: dict[int, list[Action]] = {}
    for num, cells in rows:
        if not cells[0].isdigit():
            raise ValueError(
                f"{path}: row {num}: first cell must be a {column} index (or {column!r} in the header row), "
                f"got {cells[0]!r}"
            )
        index = int(cells[0])
        if index in by_index:
            raise ValueError(f"{path}: row {num}: {column} {index} appears more than once")
        actions = [_parse(path, f"row {num} ({column} {index})", text) for text in cells[1:] if text]
        for action in actions:
            if column == _STAGE_COLUMN and action.stage_idx != index:
                raise ValueError(
                    f"{path}: row {num} is stage {index} but holds action {action} of stage "
                    f"{action.stage_idx}"
                )
        by_index[index] = actions
    missing = [k for k in range(len(by_index)) if k not in by_index]
    if missing:
        raise ValueError(f"{path}: no row for {column} {missing[0]} ({column}s must be numbered from 0)")
    return [by_index[k] for k in range(len(by_index))]


def _detect(rows: list[tuple[int, list[str]]]) -> str:
    """``"pipetrain"`` when the first non-blank row starts with a header word or an index, else
    ``"torch"``."""
    first = next((cells for _, cells in rows if any(cells)), [""])
    return (
        "pipetrain" if first[0].lower() in (_WORKER_COLUMN, _STAGE_COLUMN) or first[0].isdigit() else "torch"
    )


def load_schedule_csv(path: str | os.PathLike[str], format: str = "auto", name: str = "custom") -> Schedule:
    """Read a schedule written by :func:`save_schedule_csv` or by ``torch.distributed.pipelining``.

    ``format`` is ``"pipetrain"``, ``"torch"`` or ``"auto"`` (pipetrain's when the first row starts with
    ``worker`` / ``stage`` or an index, torch's otherwise). Raises ``ValueError`` naming the row for a bad
    or repeated index, unparsable action text, an action of another stage on a ``stage`` row, or a stage
    whose actions are on two rows.
    """
    _check_format(format, ("auto", *CSV_FORMATS))
    rows = _read_rows(path)
    if format == "auto":
        format = _detect(rows)
    actions = _load_torch(path, rows) if format == "torch" else _load_pipetrain(path, rows)
    try:
        return Schedule.from_rows(actions, name=name)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
