"""Benchmark pipetrain against one process and against torch.distributed.pipelining, on one model.

    python scripts/bench.py --model mlp --repeats 3 --out bench_results/mlp
    python scripts/bench.py --model gpt --microbatches 2,4,8 --repeats 3 --out bench_results/gpt
    python scripts/bench.py --quick --out /tmp/bench                  # smoke test (tests/test_bench.py)
    python scripts/bench.py --model mlp --stages 3 --microbatches 4   # p = 3 (functional, not a timing)
    python scripts/bench.py --schedules interleaved_1f1b --microbatches 4,8   # the interleaved rows only
    python scripts/bench.py --model gpt --schedules 1f1b,interleaved_1f1b,zb_h1,zb_v --microbatches 8

Every method trains the same model (same config, seed and initial weights), on the same batches of the
same batch size, with the same optimizer (pipetrain's configured one, AdamW by default), on ``p`` worker
processes (``--stages``, 2):

``single-1t`` / ``single-2t``
    The whole model in this process with ``torch.set_num_threads(1)`` / ``(2)``: forward on the full batch,
    loss, backward, optimizer step. No micro-batches.
``pipetrain-gpipe`` / ``pipetrain-1f1b``
    ``python -m pipetrain.train hydra.run.dir=<tmp> schedule=<s> pipeline.num_microbatches=<m>
    train.steps=<S> train.log_every=1 checkpoint.at_end=false device=cpu <model and split overrides>``: one
    driver plus one worker per stage, ``p`` stages (RPC over loopback); figures from ``<tmp>/metrics.jsonl``.
``pipetrain-interleaved``
    The same with ``schedule=interleaved_1f1b pipeline.stages_per_worker=<v>`` (``--stages-per-worker``, 2):
    the same model cut into ``p * v`` stages (the blocks spread evenly), stage ``s`` on worker ``s mod p``.
``pipetrain-zb_h1`` / ``pipetrain-zb_v`` (only with ``--schedules``)
    The zero-bubble schedules: ``schedule=zb_h1`` on the ``p`` stages, ``schedule=zb_v`` on the same model
    cut into ``2 p`` stages, stages ``r`` and ``2p-1-r`` on worker ``r``.
``pipetrain+rpc-<schedule>`` / ``pipetrain+c10d-<schedule>`` (only with ``--data-planes auto,rpc,c10d``)
    The same pipetrain runs with ``rpc.data_plane=rpc`` (each boundary value fetched with an RPC call) or
    ``c10d`` (sent over gloo send/recv); the plain rows use the default, ``auto`` (shared memory here).
``pipelining-gpipe`` / ``pipelining-1f1b`` / ``pipelining-interleaved`` / ``pipelining-zb_h1`` / ``-zb_v``
    ``torch.distributed.pipelining`` ``ScheduleGPipe`` / ``Schedule1F1B`` / ``ScheduleInterleaved1F1B`` /
    ``ScheduleInterleavedZeroBubble`` (one stage per rank) / ``ScheduleZBVZeroBubble`` on gloo with the same
    stage modules (``pipetrain.partition.partition``) on the same ranks as pipetrain's workers (``v``
    stages each for the interleaved one, the V pair for ZB-V), launched with torchrun on
    ``scripts/pipelining_baseline.py``, which logs its steps with pipetrain's metrics code into the same
    ``metrics.jsonl`` figures (see its docstring).

Worker processes run with ``OMP_NUM_THREADS=--stage-threads`` (1), on loopback (``TP_SOCKET_IFNAME=lo``,
``GLOO_SOCKET_IFNAME=lo``). Configurations are measured round-robin, ``--repeats`` times (single-1t,
single-2t, then per m: pipetrain-gpipe, -1f1b, -interleaved, pipelining-gpipe, -1f1b, -interleaved;
repeat), so slow drifts of the machine hit every configuration alike. Each run trains ``--steps`` steps;
the first ``--warmup`` are dropped and every figure is the median over the remaining steps; a
configuration's figure is the median over its repeats (samples/s: ``B`` over that median step time). A
configuration that cannot run is shown as ``n/a`` with a note under the table (``Schedule1F1B`` needs
``m >= p``; interleaved 1F1B runs ``m`` in rounds of ``m // p`` micro-batches, which must divide ``m``, in
pipetrain as in PyTorch).

Columns (per configuration; ``W`` workers hosting ``v`` stages each, ``S = v W`` stages, ``m``
micro-batches, batch ``B``; ``v = 1``, ``S = W = p`` for gpipe and 1f1b; figures as ``metrics.jsonl`` logs
them, for both frameworks):

``step_s``      wall time of one optimizer step (``perf/step_time_s``; pipetrain: since the previous step
                ended, so taking the batch and logging count too; pipelining: ``schedule.step`` plus the
                optimizer steps, slowest rank, after a barrier).
``samples/s``   ``B / step_s``.
``x_1t``        samples/s relative to ``single-1t``.
``t_mb_ms``     the slowest worker's measured forward+backward time per micro-batch and stage it hosts:
                ``max_k busy_k / (v m)``, where ``busy_k`` is worker k's compute time in the step, all its
                stages together (``worker{k}/busy_s``: pipetrain's COMPUTE spans; pipelining: each
                ``forward_one_chunk`` (+ loss) and ``backward_one_chunk``, recorded as such spans).
``E_mb``        pipeline efficiency ``L * t_mb / step_s``, where ``L`` is the schedule's makespan under unit
                costs in micro-batch forward+backward times (``pipetrain.schedule.simulate`` of
                ``build_schedule(name, S, m, v)``, halved): ``m + p - 1`` for gpipe and 1f1b,
                ``v m + W - 1`` for interleaved 1F1B (``m >= W``). 1.0 is the schedule run with every action
                taking the slowest worker's mean time and no other cost; its ideal bubble is already
                accounted for.
``bubble``      measured bubble, ``sum_k idle_k / sum_k (idle_k + busy_k)`` with ``idle_k = window - busy_k``
                (``pipeline/bubble_fraction``, ``pipetrain.metrics.measured_bubble_fraction`` over the
                workers); ``window`` is the schedule's execution, without the optimizer steps.
``pred_u``      bubble predicted by ``pipetrain.schedule.simulate`` with unit forward/backward costs
                (``pipeline/bubble_fraction_predicted``): ``(W-1)/(v m+W-1)`` for interleaved 1F1B.
``pred_m``      the same with the step's measured per-stage mean forward and backward times
                (``pipeline/bubble_fraction_predicted_measured_costs``).
``ovh_ms``      overhead per action, in ms: ``(window - makespan) / (2 v m)``, where ``makespan`` is the
                simulated makespan of the schedule with the step's measured per-stage mean forward and
                backward times (``sum_k busy_k / (W (1 - pred_m))``: the simulation keeps each worker's busy
                time, so its bubble gives its makespan back). It is what the step's window spends beyond
                the compute and the dependencies between the actions (for pipetrain: RPC issue, tensor
                pulls between workers, scheduling on the RPC thread pool; for pipelining: gloo
                send/recv), spread over the ``2 v m`` actions of a worker. It can come out slightly
                negative when action times vary within a step (the simulation uses their means), e.g. when
                workers slow each other down by sharing cores.
``cp_xfer``     on the step's critical path (``pipetrain.critical_path``), the time actions waited for inputs
                from the other worker beyond their producers' ends, in ms per step
                (``pipeline/critical_path/transfer_s``); pipelining's path follows pipetrain's order of the
                same schedule.
``cp_gap``      the same for the gaps after an action on the same worker: the runtime's own time between
                two actions (``pipeline/critical_path/overhead_s``).
``rt_ms``       the runtime's own time per action on the critical path, in ms: ``(cp_xfer + cp_gap)`` over
                the actions on the path (``pipeline/critical_path/actions``). Unlike ``ovh_ms``, it leaves
                out compute running slower than its means.
``cpu_ms``      CPU time of all the run's processes per step, in ms (``perf/cpu_s``): pipetrain's driver and
                workers, every thread (compute, RPC, progress reports), from one step's end to the next;
                pipelining: its ranks', measured the same way. Neither counts a data loader's processes.
                Above ``step_s`` times the cores, the processes wait for each other's CPU.
``peak_MiB``    peak activation memory autograd held for backward, per worker, all its stages together
                (``worker{k}/peak_activation_mib``; pipelining: counted the same way, with a saved-tensor
                hook around each forward).
``vs_pp``       pipetrain samples/s relative to pipelining with the same schedule and m.

The table is printed and written to ``<out>.json`` (settings, rows, per-repeat figures) and ``<out>.csv``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench_report import build_rows, check_losses, describe, format_table, summarize_run, write_outputs
from bench_runs import RunFailed, run_config
from bench_settings import Config, Settings, configurations, parse_args, settings_from_args, unsupported


def measure(settings: Settings, scratch: Path) -> tuple[list[dict[str, Any]], int]:
    """Run every configuration ``settings.repeats`` times, round-robin; return each run's medians
    (with ``repeat`` and ``config``) and the number of runs that failed."""
    runs: list[dict[str, Any]] = []
    failures = 0
    for repeat in range(settings.repeats):
        for config in configurations(settings):
            label = f"[{repeat + 1}/{settings.repeats}] {config.name:<22} m={config.num_microbatches}"
            reason = unsupported(settings, config)
            if reason:
                print(f"bench: {label} skipped: {reason}", flush=True)
                continue
            start = time.monotonic()
            run_dir = scratch / f"r{repeat}-{config.name}-m{config.num_microbatches}"
            try:
                summary = summarize_run(run_config(settings, config, run_dir), settings, config)
            except RunFailed as error:
                failures += 1
                print(f"bench: {label} FAILED: {error}\n{error.log_tail}", file=sys.stderr, flush=True)
                continue
            runs.append({"repeat": repeat, "config": config, **summary})
            wall = time.monotonic() - start
            print(f"bench: {label} step {summary['step_time_s']:.4f} s ({wall:.1f} s wall)", flush=True)
    return runs, failures


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every configuration round-robin, print the table, write JSON and CSV."""
    args = parse_args(argv, description=__doc__.splitlines()[0])
    settings = settings_from_args(args)
    print(f"bench: {describe(settings)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="pipetrain-bench-") as scratch:
        runs, failures = measure(settings, Path(scratch))
    results: dict[Config, list[dict[str, Any]]] = {}
    for run in runs:
        results.setdefault(run["config"], []).append(
            {k: v for k, v in run.items() if k not in ("repeat", "config")}
        )
    rows = build_rows(settings, results)
    print(f"\nbench: {describe(settings)}")
    print(format_table(rows))
    warning = check_losses(rows)
    if warning:
        print(warning)
    raw = [{**run, "config": asdict(run["config"])} for run in runs]
    json_path, csv_path = write_outputs(args.out, settings, rows, raw)
    print(f"\nbench: wrote {json_path} and {csv_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
