"""Measure an automatic restart: kill a worker mid-run, time until the restarted run completes a step.

    python scripts/restart_time.py                          # the default example, 3 repeats
    python scripts/restart_time.py --repeats 5 --kill-after 12 checkpoint.every=10 experiment=gpt

Each repeat trains ``python -m pipetrain.train`` with ``train.max_restarts=1`` into a new run directory,
SIGKILLs its last worker as soon as the driver has logged step ``--kill-after``, and reads the driver's
lines as they arrive. Per repeat it reports the seconds from the kill to the restart line (failure found,
processes stopped and started again, checkpoint chosen) and to the first step the restarted run
completes, the step it resumed from, and the steps lost: completed before the kill, then done again.
Then the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_RESUMED = re.compile(r"restart 1 of \d+ \(torchrun\): (?:resuming from step (\d+)|no checkpoint yet)")
_STEP = re.compile(r"^step\s+(\d+)/")
_DEFAULTS = ["checkpoint.every=5", "train.steps=40", "train.log_every=1"]


def _first_attempt_pids(run_dir: Path) -> dict[int, int]:
    """Rank -> pid of the run's first-attempt processes (found through the config path they load)."""
    config = str(run_dir / "config.yaml").encode()
    pids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            environ = dict(
                item.split(b"=", 1)
                for item in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                if b"=" in item
            )
        except OSError:
            continue
        if config in cmdline and environ.get(b"TORCHELASTIC_RESTART_COUNT") == b"0" and b"RANK" in environ:
            pids[int(environ[b"RANK"])] = int(entry)
    return pids


def _last_logged_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


def measure_once(
    run_dir: Path, kill_after: int, overrides: list[str], show: bool = False
) -> dict[str, float]:
    """One run killed after step ``kill_after``: its restart figures (``show``: print the driver's lines
    from the kill on, with their seconds after it)."""
    args = [sys.executable, "-m", "pipetrain.train", f"hydra.run.dir={run_dir}", "train.max_restarts=1"]
    process = subprocess.Popen(
        [*args, *_DEFAULTS, *overrides], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(
        target=lambda: lines.extend((time.monotonic(), line) for line in process.stdout)
    )
    reader.start()
    while not any((m := _STEP.match(line)) and int(m.group(1)) >= kill_after for _, line in list(lines)):
        if process.poll() is not None:
            raise RuntimeError(
                f"the run ended before step {kill_after}:\n{''.join(line for _, line in lines)}"
            )
        time.sleep(0.005)
    pids = _first_attempt_pids(run_dir)
    pid = pids[max(pids)]  # the last worker
    completed = _last_logged_step(run_dir)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    status = process.wait()
    reader.join()
    if status != 0:
        raise RuntimeError(f"the restarted run failed ({status}):\n{''.join(line for _, line in lines)}")
    after = [(at, line) for at, line in lines if at >= killed_at]
    if show:
        print("".join(f"{at - killed_at:7.2f} s  {line}" for at, line in after), end="")
    restart_at, resumed = next((at, _RESUMED.search(line)) for at, line in after if _RESUMED.search(line))
    resumed_step = int(resumed.group(1) or 0)
    first_step_at = next(
        at
        for at, line in after
        if at > restart_at and (m := _STEP.match(line)) and int(m.group(1)) > resumed_step
    )
    return {
        "kill_to_restart_line_s": restart_at - killed_at,
        "kill_to_first_resumed_step_s": first_step_at - killed_at,
        "resumed_from_step": resumed_step,
        "completed_before_kill": completed,
        "steps_lost": completed - resumed_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kill-after", type=int, default=7, help="kill once the driver has logged this step")
    parser.add_argument("--show", action="store_true", help="print the driver's lines after each kill")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the run")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="restart_time_") as scratch:
        for repeat in range(args.repeats):
            figures = measure_once(Path(scratch) / f"run{repeat}", args.kill_after, args.overrides, args.show)
            print(json.dumps(figures), flush=True)
            results.append(figures)
    medians = {key: statistics.median(figures[key] for figures in results) for key in results[0]}
    print(f"median of {len(results)}: {json.dumps(medians)}")


if __name__ == "__main__":
    main()
