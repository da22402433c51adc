"""What averaging gradients across replicas costs per step, and how much of it the drain hides.

    python scripts/replica_overlap.py --steps 12 --hidden 1024

Trains the MLP with ``pipeline.replicas=2`` (2 workers each, 1F1B) through ``python -m pipetrain.train``,
then reads the figures the run logged for every step after the first two (warm-up): per worker, how long
its stages' all-reduce took from start to end (``worker<k>/allreduce_s``) and the part its optimizer step
waited for (``worker<k>/allreduce_exposed_s``); the rest ran while other stages were still computing.
Also prints the step time next to one replica on half the batch (the same work per replica).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _train(run_dir: Path, replicas: int, args: argparse.Namespace) -> list[dict]:
    overrides = [
        f"run_dir={run_dir}",
        f"model.hidden={args.hidden}",
        "schedule=1f1b",
        f"pipeline.replicas={replicas}",
        f"train.batch_size={args.batch_size * replicas}",
        f"train.steps={args.steps}",
        "train.log_every=1",
        "optim=sgd",
        "checkpoint.at_end=false",
    ]
    subprocess.run([sys.executable, "-m", "pipetrain.train", *overrides], check=True, capture_output=True)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines][2:]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64, help="samples per replica and step")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        replicated = _train(Path(scratch) / "replicas2", 2, args)
        single = _train(Path(scratch) / "replicas1", 1, args)
    print(f"MLP hidden={args.hidden}, 2 workers per replica, 1F1B, {args.batch_size} samples per replica")
    for worker in (0, 1):
        total = statistics.median(step[f"worker{worker}/allreduce_s"] for step in replicated)
        exposed = statistics.median(step[f"worker{worker}/allreduce_exposed_s"] for step in replicated)
        hidden = 1 - exposed / total if total > 0 else 0.0
        print(
            f"worker {worker}: all-reduce {total * 1e3:.1f} ms per step, {exposed * 1e3:.1f} ms of it "
            f"waited for ({hidden:.0%} overlapped)"
        )
    for name, steps in (("2 replicas", replicated), ("1 replica", single)):
        step_time = statistics.median(step["perf/step_time_s"] for step in steps)
        rate = statistics.median(step["perf/samples_per_sec"] for step in steps)
        print(f"{name}: step {step_time * 1e3:.1f} ms, {rate:.0f} samples/s (median)")


if __name__ == "__main__":
    main()
