"""Pipeline schedules as plain data: build, validate, simulate, render and store them.

Pure Python (no torch), so schedules can be inspected and tested without any devices::

    >>> from pipetrain.schedule import build_schedule, render_timeline, simulate
    >>> print(render_timeline(simulate(build_schedule("1f1b", 2, 4))))
    stage 0: 0F0 0F1 .   0B0 0F2 0B1 0F3 0B2 .   0B3
    stage 1: .   1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3 .
"""

from pipetrain.schedule.actions import Action, ActionKind, Schedule
from pipetrain.schedule.builders import SCHEDULE_BUILDERS, build_schedule, gpipe, one_f_one_b
from pipetrain.schedule.csv_io import load_schedule_csv, save_schedule_csv
from pipetrain.schedule.order import dependencies, execution_order, input_dependency, output_consumer
from pipetrain.schedule.simulate import StageCosts, TimedAction, Timeline, render_timeline, simulate
from pipetrain.schedule.validate import validate_schedule

__all__ = [
    "SCHEDULE_BUILDERS",
    "Action",
    "ActionKind",
    "Schedule",
    "StageCosts",
    "TimedAction",
    "Timeline",
    "build_schedule",
    "dependencies",
    "execution_order",
    "gpipe",
    "input_dependency",
    "load_schedule_csv",
    "one_f_one_b",
    "output_consumer",
    "render_timeline",
    "save_schedule_csv",
    "simulate",
    "validate_schedule",
]
