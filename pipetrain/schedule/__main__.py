"""Command line: build a schedule, simulate it and print its timeline, bubble and memory estimate.

Example::

    python -m pipetrain.schedule 1f1b --stages 2 --microbatches 4
    python -m pipetrain.schedule gpipe --stages 2 --microbatches 4 --forward-costs 1,1 --backward-costs 2,2
"""

from __future__ import annotations

import argparse
import sys

from pipetrain.schedule.builders import SCHEDULE_BUILDERS, build_schedule
from pipetrain.schedule.csv_io import save_schedule_csv
from pipetrain.schedule.simulate import StageCosts, render_timeline, simulate

__all__ = ["main"]


def _costs(option: str, text: str | None, num_stages: int) -> tuple[float, ...]:
    if text is None:
        return (1.0,) * num_stages
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{option} must be comma-separated numbers, got {text!r}") from None
    if len(values) != num_stages:
        raise ValueError(f"{option} has {len(values)} values but --stages is {num_stages}")
    return values


def _run(args: argparse.Namespace) -> None:
    schedule = build_schedule(args.name, args.stages, args.microbatches)
    costs = StageCosts(
        _costs("--forward-costs", args.forward_costs, args.stages),
        _costs("--backward-costs", args.backward_costs, args.stages),
    )
    timeline = simulate(schedule, costs)
    if args.csv:
        save_schedule_csv(schedule, args.csv)

    s, m = args.stages, args.microbatches
    print(f"{args.name}: {s} stages, {m} micro-batches")
    print(render_timeline(timeline))
    bubble = f"predicted bubble fraction: {timeline.bubble_fraction:.3f}"
    if costs == StageCosts.unit(s):
        bubble += f" ((S-1)/(M+S-1) = {(s - 1) / (m + s - 1):.3f} under unit costs)"
    print(bubble)
    peaks = ", ".join(f"stage {j}: {p}" for j, p in sorted(timeline.peak_in_flight.items()))
    print(f"peak in-flight micro-batches: {peaks}")
    if args.csv:
        print(f"schedule written to {args.csv}")


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run; returns the exit status (2 on bad input)."""
    parser = argparse.ArgumentParser(prog="python -m pipetrain.schedule", description=__doc__.splitlines()[0])
    parser.add_argument("name", help=f"schedule name, one of: {', '.join(sorted(SCHEDULE_BUILDERS))}")
    parser.add_argument("--stages", type=int, required=True, help="number of pipeline stages S")
    parser.add_argument("--microbatches", type=int, required=True, help="micro-batches per step M")
    parser.add_argument("--forward-costs", help="per-stage forward durations, e.g. 1,1 (default: all 1)")
    parser.add_argument("--backward-costs", help="per-stage backward durations, e.g. 2,2 (default: all 1)")
    parser.add_argument("--csv", help="also write the schedule to this CSV file")
    args = parser.parse_args(argv)
    try:
        _run(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
