"""Command line: build a schedule, simulate it and print its timeline, bubble and memory estimate.

Examples::

    python -m pipetrain.schedule 1f1b --stages 2 --microbatches 4
    python -m pipetrain.schedule interleaved_1f1b --stages 4 --stages-per-worker 2 --microbatches 8
    python -m pipetrain.schedule gpipe --stages 2 --microbatches 4 --forward-costs 1,1 --backward-costs 2,2
    python -m pipetrain.schedule 1f1b --stages 4 --microbatches 8 --csv s.csv --torch-csv s_torch.csv
    python -m pipetrain.schedule zb_h1 --stages 4 --microbatches 8
    python -m pipetrain.schedule zb_v --stages 8 --stages-per-worker 2 --microbatches 8 \
        --forward-costs 1,1,1,1,1,1,1,1 --input-grad-costs 1,1,1,1,1,1,1,1 --weight-grad-costs 1,1,1,1,1,1,1,1

Schedules that split the backward (zb_h1, zb_v) default to F = I = W = 1 (and B = 2).
"""

from __future__ import annotations

import argparse
import sys

from pipetrain.schedule.builders import SCHEDULE_BUILDERS, build_schedule
from pipetrain.schedule.csv_io import save_schedule_csv
from pipetrain.schedule.render import render_timeline
from pipetrain.schedule.schedule import Schedule
from pipetrain.schedule.simulate import StageCosts, simulate, splits_backward

__all__ = ["main"]


def _costs(
    option: str, text: str | None, num_stages: int, default: float | None = 1.0
) -> tuple[float, ...] | None:
    if text is None:
        return None if default is None else (default,) * num_stages
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{option} must be comma-separated numbers, got {text!r}") from None
    if len(values) != num_stages:
        raise ValueError(f"{option} has {len(values)} values but --stages is {num_stages}")
    return values


def _closed_form(schedule: Schedule) -> str | None:
    """The textbook unit-cost bubble of the schedule, when it has one."""
    s, w, m = schedule.num_stages, schedule.num_workers, schedule.num_microbatches
    if schedule.name in ("gpipe", "1f1b"):
        return f"(S-1)/(M+S-1) = {(s - 1) / (m + s - 1):.3f}"
    if schedule.name == "interleaved_1f1b" and m >= w:
        return f"(W-1)/(v*M+W-1) = {(w - 1) / (s // w * m + w - 1):.3f}"
    if schedule.name == "zb_h1" and m >= s:
        return f"(S-1)/(3M+S-1) = {(s - 1) / (3 * m + s - 1):.3f}"
    return None


def _run(args: argparse.Namespace) -> None:
    s, m = args.stages, args.microbatches
    schedule = build_schedule(args.name, s, m, args.stages_per_worker)
    split = splits_backward(schedule)
    costs = StageCosts(
        _costs("--forward-costs", args.forward_costs, s),
        _costs("--backward-costs", args.backward_costs, s, default=2.0 if split else 1.0),
        _costs("--input-grad-costs", args.input_grad_costs, s, default=1.0 if split else None),
        _costs("--weight-grad-costs", args.weight_grad_costs, s, default=1.0 if split else None),
    )
    timeline = simulate(schedule, costs)
    for path, format in ((args.csv, "pipetrain"), (args.torch_csv, "torch")):
        if path:
            save_schedule_csv(schedule, path, format)
    where = f" on {schedule.num_workers} workers ({args.stages_per_worker} per worker, "
    where += f"{SCHEDULE_BUILDERS[args.name].placement} placement)"
    print(f"{args.name}: {s} stages{'' if schedule.one_stage_per_worker else where}, {m} micro-batches")
    print(render_timeline(timeline))
    bubble = f"predicted bubble fraction: {timeline.bubble_fraction:.3f}"
    closed_form = _closed_form(schedule)
    if costs == StageCosts.unit(s, split) and closed_form:
        bubble += f" ({closed_form} under unit costs)"
    print(bubble)
    peaks = ", ".join(f"stage {j}: {p}" for j, p in sorted(timeline.peak_in_flight.items()))
    print(f"peak in-flight micro-batches: {peaks}")
    for path, format in ((args.csv, "pipetrain"), (args.torch_csv, "torch.distributed.pipelining")):
        if path:
            print(f"schedule written to {path} ({format} format)")


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run; returns the exit status (2 on bad input)."""
    parser = argparse.ArgumentParser(prog="python -m pipetrain.schedule", description=__doc__.splitlines()[0])
    known = "; ".join(f"{name} ({builder.summary})" for name, builder in SCHEDULE_BUILDERS.items())
    parser.add_argument("name", help=f"schedule name, one of: {known}")
    parser.add_argument("--stages", type=int, required=True, help="number of pipeline stages S")
    parser.add_argument("--stages-per-worker", type=int, default=1, help="stages per worker v (default 1)")
    parser.add_argument("--microbatches", type=int, required=True, help="micro-batches per step M")
    parser.add_argument("--forward-costs", help="per-stage forward durations, e.g. 1,1 (default: all 1)")
    parser.add_argument("--backward-costs", help="per-stage backward durations, e.g. 2,2 (default: all 1)")
    parser.add_argument(
        "--input-grad-costs", help="per-stage I durations (default: 1 for zb_h1/zb_v, else half the backward)"
    )
    parser.add_argument(
        "--weight-grad-costs",
        help="per-stage W durations (default: 1 for zb_h1/zb_v, else half the backward)",
    )
    parser.add_argument("--csv", help="also write the schedule to this CSV file (pipetrain format)")
    parser.add_argument("--torch-csv", help="also write it in torch.distributed.pipelining's CSV format")
    args = parser.parse_args(argv)
    try:
        _run(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
