"""Pipeline schedules as plain data: build, validate, simulate, render and store them.

A :class:`Schedule` lists, per worker, the actions it runs in order (``F``, ``B``, ``I``, ``W`` of a
stage and micro-batch) and declares where each stage lives (its placement). Pure Python (no torch), so
schedules can be inspected and tested without any devices::

    >>> from pipetrain.schedule import build_schedule, render_timeline, simulate
    >>> print(render_timeline(simulate(build_schedule("1f1b", 2, 4))))
    stage 0: 0F0 0F1 .   0B0 0F2 0B1 0F3 0B2 .   0B3
    stage 1: .   1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3 .
    >>> print(render_timeline(simulate(build_schedule("interleaved_1f1b", 4, 4, stages_per_worker=2))))
    worker 0: 0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 .   2B2 .   2B3 0B2 0B3
    worker 1: .   1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3 .
"""

from pipetrain.schedule.actions import Action, ActionKind
from pipetrain.schedule.builders import (
    SCHEDULE_BUILDERS,
    ScheduleBuilder,
    build_schedule,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    workers_needed,
    zb_h1,
    zb_v,
)
from pipetrain.schedule.csv_io import CSV_FORMATS, load_schedule_csv, save_schedule_csv
from pipetrain.schedule.order import dependencies, execution_order, input_dependency, output_consumer
from pipetrain.schedule.placement import (
    PLACEMENTS,
    loop_placement,
    make_placement,
    one_placement,
    placement_kind,
    v_placement,
)
from pipetrain.schedule.render import render_schedule, render_timeline
from pipetrain.schedule.schedule import Schedule
from pipetrain.schedule.simulate import StageCosts, TimedAction, Timeline, simulate, splits_backward
from pipetrain.schedule.validate import validate_schedule

__all__ = [
    "CSV_FORMATS",
    "PLACEMENTS",
    "SCHEDULE_BUILDERS",
    "Action",
    "ActionKind",
    "Schedule",
    "ScheduleBuilder",
    "StageCosts",
    "TimedAction",
    "Timeline",
    "build_schedule",
    "dependencies",
    "execution_order",
    "gpipe",
    "input_dependency",
    "interleaved_1f1b",
    "load_schedule_csv",
    "loop_placement",
    "make_placement",
    "one_f_one_b",
    "one_placement",
    "output_consumer",
    "placement_kind",
    "render_schedule",
    "render_timeline",
    "save_schedule_csv",
    "simulate",
    "splits_backward",
    "v_placement",
    "validate_schedule",
    "workers_needed",
    "zb_h1",
    "zb_v",
]
