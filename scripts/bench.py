"""Benchmark pipetrain against one process and against torch.distributed.pipelining, on one model.

    python scripts/bench.py --model mlp --repeats 3 --out bench_results/mlp
    python scripts/bench.py --model gpt --microbatches 2,4,8 --repeats 3 --out bench_results/gpt
    python scripts/bench.py --quick --out /tmp/bench                  # smoke test (tests/test_bench.py)
    python scripts/bench.py --model mlp --stages 3 --microbatches 4   # p = 3 (functional, not a timing)

Every method trains the same model (same config, seed and initial weights), on the same batches of the
same batch size, with the same optimizer (pipetrain's configured one, AdamW by default):

``single-1t`` / ``single-2t``
    The whole model in this process with ``torch.set_num_threads(1)`` / ``(2)``: forward on the full batch,
    loss, backward, optimizer step. No micro-batches.
``pipetrain-gpipe`` / ``pipetrain-1f1b``
    ``python -m pipetrain.train hydra.run.dir=<tmp> schedule=<s> pipeline.num_microbatches=<m>
    train.steps=<S> train.log_every=1 log.trace_every=1 device=cpu <model overrides>``: one driver plus one
    process per stage (RPC over loopback); figures from ``<tmp>/metrics.jsonl`` and ``<tmp>/traces/``.
``pipelining-gpipe`` / ``pipelining-1f1b``
    ``torch.distributed.pipelining`` ``ScheduleGPipe`` / ``Schedule1F1B`` on gloo with the same stage modules
    (``pipetrain.partition.partition``), one process per stage, launched with torchrun on
    ``scripts/pipelining_baseline.py`` (see its docstring).

Stage processes run with ``OMP_NUM_THREADS=--stage-threads`` (1), on loopback (``TP_SOCKET_IFNAME=lo``,
``GLOO_SOCKET_IFNAME=lo``). Configurations are measured round-robin, ``--repeats`` times (single-1t,
single-2t, then per m: pipetrain-gpipe, pipetrain-1f1b, pipelining-gpipe, pipelining-1f1b; repeat), so slow
drifts of the machine hit every configuration alike. Each run trains ``--steps`` steps; the first ``--warmup``
are dropped and every figure is the median over the remaining steps; a configuration's figure is the median
over its repeats.

Columns (per configuration; ``p`` stages, ``m`` micro-batches, batch ``B``):

``step_s``      wall time of one optimizer step (pipetrain: ``perf/step_time_s``, from issuing the first
                action to every stage's optimizer step reported back; pipelining: ``schedule.step`` plus
                the optimizer step, slowest rank, after a barrier).
``samples/s``   ``B / step_s``.
``x_1t``        samples/s relative to ``single-1t``.
``t_mb_ms``     the slowest stage's measured forward+backward time per micro-batch: ``max_k busy_k / m``,
                where ``busy_k`` is stage k's compute time in the step (pipetrain: ``worker{k}/busy_s``;
                pipelining: timed ``forward_one_chunk`` + loss + ``backward_one_chunk``).
``E_mb``        pipeline efficiency ``(m + p - 1) * t_mb / step_s``: 1.0 is an ideal fill-drain pipeline
                with the measured compute and no other cost; the ideal bubble is already accounted for.
``bubble``      measured bubble, ``sum_k idle_k / sum_k (idle_k + busy_k)`` with ``idle_k = window - busy_k``
                (``pipetrain.metrics.measured_bubble_fraction``); ``window`` is the schedule's execution,
                without the optimizer step.
``pred_u``      bubble predicted by ``pipetrain.schedule.simulate`` with unit forward/backward costs.
``pred_m``      the same with the step's measured per-stage mean forward and backward times.
``ovh_ms``      overhead per micro-batch per stage, in ms: ``(window - makespan) / (2 m)``, where
                ``makespan`` is the simulated makespan of the schedule with the step's measured per-stage mean
                forward and backward times (``pipetrain.schedule.simulate``; for pipetrain the means come from
                the COMPUTE spans of the step's trace, as ``pipetrain.metrics.measured_costs`` takes them).
                It is what the step's window spends beyond the compute and the dependencies between the
                actions (for pipetrain: RPC issue, tensor pulls between workers, scheduling on the RPC
                thread pool; for pipelining: gloo send/recv), spread over the 2 m actions of a stage.
                It can come out slightly negative when action times vary within a step (the simulation
                uses their means), e.g. when stages slow each other down by sharing cores.
``peak_MiB``    peak activation memory autograd held for backward, per stage (pipetrain:
                ``worker{k}/peak_activation_mib``; pipelining: counted the same way, with a saved-tensor
                hook around each forward).
``vs_pp``       pipetrain samples/s relative to pipelining with the same schedule and m.

The table is printed and written to ``<out>.json`` (settings, rows, per-repeat figures) and ``<out>.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pipetrain.build import build_dataset, build_model
from pipetrain.compose import compose_config, to_train_config
from pipetrain.data import BatchOrder
from pipetrain.launch import free_loopback_port
from pipetrain.losses import get_loss
from pipetrain.metrics import WorkerFigures, measured_bubble_fraction
from pipetrain.schedule import Action, ActionKind, StageCosts, build_schedule, simulate
from pipetrain.targets import call_target

BASELINE_SCRIPT = Path(__file__).resolve().with_name("pipelining_baseline.py")
SCHEDULES = ("gpipe", "1f1b")
MODEL_DEFAULTS = {
    # Chosen so that one micro-batch's forward+backward on one stage takes about 30-40 ms at m = 4 on one
    # core of the 2-core development machine.
    "mlp": {"hidden": 1536, "layers": 4, "batch_size": 384},
    "gpt": {"hidden": 128, "layers": 4, "batch_size": 64, "seq_len": 64, "heads": 4},
}
QUICK_DEFAULTS = {
    "mlp": {"hidden": 64, "layers": 4, "batch_size": 32},
    "gpt": {"hidden": 32, "layers": 2, "batch_size": 16, "seq_len": 16, "heads": 2},
}
STOP_GRACE_S = 20.0


@dataclass(frozen=True)
class Settings:
    """One benchmark invocation: the model, the split and the measurement plan."""

    model: str
    hidden: int
    layers: int
    batch_size: int
    seq_len: int
    heads: int
    balance: tuple[int, ...]
    microbatches: tuple[int, ...]
    steps: int
    warmup: int
    repeats: int
    stage_threads: int
    run_timeout_s: float
    pipetrain_overrides: tuple[str, ...] = ()

    @property
    def num_stages(self) -> int:
        """Pipeline stages (p)."""
        return len(self.balance)


@dataclass(frozen=True)
class Config:
    """One measured configuration: a method, and for pipelines a schedule and a micro-batch count."""

    method: str
    schedule: str | None = None
    num_microbatches: int | None = None
    threads: int | None = None

    @property
    def name(self) -> str:
        """``single-1t``, ``pipetrain-gpipe``, ``pipelining-1f1b``, ..."""
        if self.method == "single":
            return f"single-{self.threads}t"
        return f"{self.method}-{self.schedule}"


# ----------------------------------------------------------------------------------------------- settings


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODEL_DEFAULTS), default="mlp")
    parser.add_argument("--hidden", type=int, help="MLP hidden width / GPT d_model")
    parser.add_argument("--layers", type=int, help="MLP depth (hidden->hidden blocks) / GPT blocks")
    parser.add_argument("--batch-size", type=int, help="samples per optimizer step (B)")
    parser.add_argument("--seq-len", type=int, help="GPT sequence length")
    parser.add_argument("--heads", type=int, help="GPT attention heads")
    parser.add_argument("--stages", type=int, default=2, help="pipeline stages p (default 2)")
    parser.add_argument("--balance", help="units per stage, e.g. 3,3 (default: hidden blocks spread evenly)")
    parser.add_argument("--microbatches", default=None, help="comma-separated m values (default 2,4,8,16)")
    parser.add_argument("--steps", type=int, help="steps per run, warm-up included (default 12)")
    parser.add_argument("--warmup", type=int, help="leading steps dropped from every run (default 3)")
    parser.add_argument("--repeats", type=int, help="round-robin repeats (default 3)")
    parser.add_argument("--stage-threads", type=int, default=1, help="OMP_NUM_THREADS of stage processes")
    parser.add_argument("--run-timeout", type=float, default=600.0, help="seconds before a run is stopped")
    parser.add_argument(
        "--pipetrain-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override for the pipetrain runs (repeatable), e.g. rpc.transports=null",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, m in {2,4}, 1 repeat, 4 steps")
    parser.add_argument("--out", type=Path, default=Path("bench_results"), help="<out>.json, <out>.csv")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Fill in the per-model defaults (tiny ones with ``--quick``) and check the combination."""
    sizes = dict((QUICK_DEFAULTS if args.quick else MODEL_DEFAULTS)[args.model])
    for key in ("hidden", "layers", "batch_size", "seq_len", "heads"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    default_m = "2,4" if args.quick else "2,4,8,16"
    microbatches = tuple(int(value) for value in (args.microbatches or default_m).split(","))
    if args.balance:
        balance = tuple(int(value) for value in args.balance.split(","))
        if len(balance) != args.stages:
            raise SystemExit(
                f"--balance {args.balance} has {len(balance)} stages but --stages is {args.stages}"
            )
    else:
        balance = default_balance(args.model, sizes["layers"], args.stages)
    settings = Settings(
        model=args.model,
        hidden=sizes["hidden"],
        layers=sizes["layers"],
        batch_size=sizes["batch_size"],
        seq_len=sizes.get("seq_len", 0),
        heads=sizes.get("heads", 0),
        balance=balance,
        microbatches=microbatches,
        steps=args.steps or (4 if args.quick else 12),
        warmup=args.warmup if args.warmup is not None else (2 if args.quick else 3),
        repeats=args.repeats or (1 if args.quick else 3),
        stage_threads=args.stage_threads,
        run_timeout_s=args.run_timeout,
        pipetrain_overrides=tuple(args.pipetrain_override),
    )
    check_settings(settings)
    return settings


def default_balance(model: str, layers: int, num_stages: int) -> tuple[int, ...]:
    """Units per stage: the ``layers`` repeated blocks spread evenly (earlier stages take the remainder).

    The MLP's units are ``layers.0`` (input projection), ``layers.1..layers.{depth}`` and ``head``; the GPT's
    are ``embed``, ``blocks.0..blocks.{N-1}``, ``ln_f`` and ``head``. The cheap units before the blocks go
    to the first stage, those after them to the last.
    """
    if num_stages < 2:
        raise SystemExit("--stages: a pipeline needs at least 2 stages")
    if layers < num_stages:
        raise SystemExit(f"--layers {layers}: fewer repeated blocks than the {num_stages} stages")
    blocks = [layers // num_stages + (1 if k < layers % num_stages else 0) for k in range(num_stages)]
    before, after = (1, 1) if model == "mlp" else (1, 2)
    blocks[0] += before
    blocks[-1] += after
    return tuple(blocks)


def check_settings(settings: Settings) -> None:
    """Refuse combinations that cannot run, before anything is started."""
    num_units = settings.layers + (2 if settings.model == "mlp" else 3)
    if sum(settings.balance) != num_units or min(settings.balance) < 1:
        raise SystemExit(f"--balance {list(settings.balance)}: must be >= 1 per stage and sum to {num_units}")
    for m in settings.microbatches:
        if m < 1 or settings.batch_size % m:
            raise SystemExit(f"--microbatches: batch size {settings.batch_size} is not divisible by m={m}")
    if not 0 <= settings.warmup < settings.steps:
        raise SystemExit(f"--warmup {settings.warmup} must leave steps to measure (--steps {settings.steps})")


def model_overrides(settings: Settings) -> list[str]:
    """pipetrain Hydra overrides giving the benchmark's model, batch size and split."""
    if settings.model == "mlp":
        overrides = [f"model.hidden={settings.hidden}", f"model.depth={settings.layers}"]
    else:
        overrides = [
            "experiment=gpt",
            f"model.d_model={settings.hidden}",
            f"model.num_layers={settings.layers}",
            f"model.seq_len={settings.seq_len}",
            f"model.num_heads={settings.heads}",
        ]
    balance = ",".join(str(count) for count in settings.balance)
    return [
        *overrides,
        f"train.batch_size={settings.batch_size}",
        "pipeline.stages=null",
        f"pipeline.balance=[{balance}]",
        "device=cpu",
    ]


def configurations(settings: Settings) -> list[Config]:
    """The configurations of one round, in the order they are measured."""
    configs = [Config("single", threads=1), Config("single", threads=2)]
    for m in settings.microbatches:
        for method in ("pipetrain", "pipelining"):
            configs += [Config(method, schedule, m) for schedule in SCHEDULES]
    return configs


def unsupported(settings: Settings, config: Config) -> str | None:
    """Why ``config`` cannot run with these settings (it is then shown as ``n/a``), or ``None``."""
    m = config.num_microbatches
    if (
        config.method == "pipelining"
        and config.schedule == "1f1b"
        and m is not None
        and m < settings.num_stages
    ):
        return "Schedule1F1B needs m >= p"
    return None


# ------------------------------------------------------------------------------------------------ runners


def run_single(settings: Settings, threads: int) -> list[dict[str, Any]]:
    """Plain full-model training in this process with ``threads`` intra-op threads; per-step records."""
    cfg = to_train_config(compose_config(model_overrides(settings)))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = build_model(cfg)
        optimizer = call_target(cfg.optim, "optim")(model.parameters())
        loss_fn = get_loss(cfg.train.loss)
        batches = BatchOrder(build_dataset(cfg), cfg.train.batch_size, cfg.seed)
        records = []
        for step in range(settings.steps):
            inputs, targets = batches.batch(step)
            start = time.perf_counter()
            loss = loss_fn(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            elapsed = time.perf_counter() - start
            records.append({"step": step + 1, "step_time_s": elapsed, "loss": loss.item()})
        return records
    finally:
        torch.set_num_threads(previous_threads)


def subprocess_env(settings: Settings) -> dict[str, str]:
    """The environment of every launched run: loopback only, ``--stage-threads`` compute threads."""
    env = dict(os.environ)
    env.update(
        TP_SOCKET_IFNAME="lo",
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS=str(settings.stage_threads),
        PYTHONUNBUFFERED="1",
    )
    return env


def run_logged(command: list[str], log_path: Path, cwd: Path, env: dict[str, str], timeout_s: float) -> int:
    """Run ``command`` with its output in ``log_path``; stop it (SIGINT, then SIGKILL) after ``timeout_s``.

    SIGINT makes ``pipetrain.train`` stop its torchrun, and torchrun stop its workers. Returns the exit
    status, or -1 after a timeout.
    """
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop(process)
            return -1
        except KeyboardInterrupt:
            stop(process)
            raise


def stop(process: subprocess.Popen) -> None:
    """SIGINT ``process``, and SIGKILL its process group if it is still there after a grace period."""
    try:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def run_pipetrain(settings: Settings, config: Config, run_dir: Path) -> list[dict[str, Any]]:
    """One ``python -m pipetrain.train`` run; per-step records read from its run directory."""
    run_dir.mkdir(parents=True)
    command = [
        sys.executable,
        "-m",
        "pipetrain.train",
        f"hydra.run.dir={run_dir}",
        *model_overrides(settings),
        f"schedule={config.schedule}",
        f"pipeline.num_microbatches={config.num_microbatches}",
        f"train.steps={settings.steps}",
        "train.log_every=1",
        "log.trace_every=1",
        *settings.pipetrain_overrides,
    ]
    log_path = run_dir / "bench.log"
    status = run_logged(command, log_path, run_dir, subprocess_env(settings), settings.run_timeout_s)
    if status != 0:
        raise RuntimeError(f"{config.name} m={config.num_microbatches}: exit status {status}", tail(log_path))
    return read_pipetrain_run(run_dir, settings.num_stages)


def read_pipetrain_run(run_dir: Path, num_stages: int) -> list[dict[str, Any]]:
    """Per-step records from ``metrics.jsonl`` (times, busy, peak) and the step traces (F/B means)."""
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        logged = json.loads(line)
        stages = range(num_stages)
        busy = [logged[f"worker{k}/busy_s"] for k in stages]
        forward, backward = trace_costs(run_dir / "traces" / f"step{logged['step']:06d}.json", num_stages)
        records.append(
            {
                "step": logged["step"],
                "step_time_s": logged["perf/step_time_s"],
                # idle_k = max(window - busy_k, 0), so busy_k + idle_k gives the window back.
                "window_s": max(busy[k] + logged[f"worker{k}/idle_s"] for k in stages),
                "loss": logged["train/loss"],
                "busy_s": busy,
                "forward_s": forward,
                "backward_s": backward,
                "peak_activation_mib": [logged[f"worker{k}/peak_activation_mib"] for k in stages],
                "transfer_s": [logged[f"worker{k}/transfer_s"] for k in stages],
            }
        )
    return records


def trace_costs(trace_path: Path, num_stages: int) -> tuple[list[float], list[float]]:
    """Per-stage mean forward and backward durations (s) of the COMPUTE spans in a Chrome trace."""
    durations: dict[tuple[int, ActionKind], list[float]] = {
        (k, kind): [] for k in range(num_stages) for kind in ActionKind
    }
    for event in json.loads(trace_path.read_text())["traceEvents"]:
        if event.get("ph") == "X" and event.get("cat") == "compute":
            action = Action.parse(event["name"])
            durations[(action.stage_idx, action.kind)].append(event["dur"] / 1e6)
    means = {key: statistics.fmean(values) if values else 0.0 for key, values in durations.items()}
    forward = [means[(k, ActionKind.FORWARD)] for k in range(num_stages)]
    backward = [means[(k, ActionKind.BACKWARD)] for k in range(num_stages)]
    return forward, backward


def run_pipelining(settings: Settings, config: Config, run_dir: Path) -> list[dict[str, Any]]:
    """One torchrun launch of ``scripts/pipelining_baseline.py``; per-step records from its JSON."""
    run_dir.mkdir(parents=True)
    out = run_dir / "pipelining.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={settings.num_stages}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_loopback_port()}",
        str(BASELINE_SCRIPT),
        f"--schedule={config.schedule}",
        f"--microbatches={config.num_microbatches}",
        f"--steps={settings.steps}",
        f"--warmup={settings.warmup}",
        f"--out={out}",
        "--",
        *model_overrides(settings),
    ]
    log_path = run_dir / "bench.log"
    status = run_logged(command, log_path, run_dir, subprocess_env(settings), settings.run_timeout_s)
    if status != 0 or not out.exists():
        raise RuntimeError(f"{config.name} m={config.num_microbatches}: exit status {status}", tail(log_path))
    return json.loads(out.read_text())["steps"]


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_config(settings: Settings, config: Config, run_dir: Path) -> list[dict[str, Any]]:
    """Measure one configuration once; per-step records."""
    if config.method == "single":
        return run_single(settings, config.threads or 1)
    runner: Callable[[Settings, Config, Path], list[dict[str, Any]]] = (
        run_pipetrain if config.method == "pipetrain" else run_pipelining
    )
    return runner(settings, config, run_dir)


# ------------------------------------------------------------------------------------------------ figures


def step_figures(record: dict[str, Any], settings: Settings, config: Config) -> dict[str, Any]:
    """The table's figures for one measured step (see the module docstring for their definitions)."""
    step_time = record["step_time_s"]
    figures: dict[str, Any] = {"step_time_s": step_time, "samples_per_sec": settings.batch_size / step_time}
    if config.method == "single":
        return figures
    p, m = settings.num_stages, config.num_microbatches
    assert m is not None and config.schedule is not None
    window, busy = record["window_s"], record["busy_s"]
    schedule = build_schedule(config.schedule, p, m)
    measured = simulate(schedule, StageCosts(tuple(record["forward_s"]), tuple(record["backward_s"])))
    t_mb = max(busy) / m
    stage_figures = [WorkerFigures(busy_s=b, idle_s=max(window - b, 0.0), transfer_s=0.0) for b in busy]
    figures.update(
        t_mb_ms=t_mb * 1e3,
        e_mb=(m + p - 1) * t_mb / step_time,
        bubble=measured_bubble_fraction(stage_figures),
        pred_unit=simulate(schedule).bubble_fraction,
        pred_measured=measured.bubble_fraction,
        overhead_ms=(window - measured.makespan) / (2 * m) * 1e3,
        peak_activation_mib=list(record["peak_activation_mib"]),
    )
    return figures


def median_figures(per_step: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Element-wise median of figure dicts (lists are taken per entry)."""
    result: dict[str, Any] = {}
    for key, first in per_step[0].items():
        if isinstance(first, list):
            result[key] = [statistics.median(f[key][i] for f in per_step) for i in range(len(first))]
        else:
            result[key] = statistics.median(f[key] for f in per_step)
    return result


def summarize_run(records: list[dict[str, Any]], settings: Settings, config: Config) -> dict[str, Any]:
    """Median figures of one run over its measured steps (the first ``--warmup`` dropped)."""
    measured = records[settings.warmup :]
    summary = median_figures([step_figures(record, settings, config) for record in measured])
    summary["loss_step1"] = records[0]["loss"]
    return summary


def build_rows(settings: Settings, results: dict[Config, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per configuration: medians over its successful repeats, plus the relative columns."""
    rows = []
    for config in configurations(settings):
        runs = results.get(config, [])
        row: dict[str, Any] = {
            "method": config.name,
            "schedule": config.schedule,
            "m": config.num_microbatches,
            "p": settings.num_stages if config.method != "single" else 1,
            "batch_size": settings.batch_size,
            "runs_ok": len(runs),
        }
        reason = unsupported(settings, config)
        if reason:
            row["not_applicable"] = reason
        if runs:
            row.update(median_figures([{k: v for k, v in run.items() if k != "loss_step1"} for run in runs]))
            row["loss_step1"] = runs[0]["loss_step1"]
            row["step_time_s_repeats"] = [run["step_time_s"] for run in runs]
        rows.append(row)
    by_key = {(row["method"], row["m"]): row for row in rows}
    single = by_key.get(("single-1t", None), {}).get("samples_per_sec")
    for row in rows:
        if single and "samples_per_sec" in row:
            row["x_1t"] = row["samples_per_sec"] / single
        if row["method"].startswith("pipetrain-") and "samples_per_sec" in row:
            reference = by_key.get((f"pipelining-{row['schedule']}", row["m"]), {}).get("samples_per_sec")
            if reference:
                row["vs_pp"] = row["samples_per_sec"] / reference
    return rows


# ------------------------------------------------------------------------------------------------- output

COLUMNS = [
    # (header, row key, format)
    ("method", "method", "{}"),
    ("m", "m", "{}"),
    ("step_s", "step_time_s", "{:.4f}"),
    ("samples/s", "samples_per_sec", "{:.1f}"),
    ("x_1t", "x_1t", "{:.2f}"),
    ("t_mb_ms", "t_mb_ms", "{:.1f}"),
    ("E_mb", "e_mb", "{:.2f}"),
    ("bubble", "bubble", "{:.3f}"),
    ("pred_u", "pred_unit", "{:.3f}"),
    ("pred_m", "pred_measured", "{:.3f}"),
    ("ovh_ms", "overhead_ms", "{:.2f}"),
    ("peak_MiB", "peak_activation_mib", "{}"),
    ("vs_pp", "vs_pp", "{:.2f}"),
]

CSV_FIELDS = (
    "method schedule m p batch_size runs_ok step_time_s samples_per_sec x_1t t_mb_ms e_mb bubble pred_unit "
    "pred_measured overhead_ms peak_activation_mib vs_pp loss_step1 not_applicable"
).split()


def cell(row: dict[str, Any], key: str, fmt: str) -> str:
    """One table cell: ``-`` when the figure does not apply, ``failed`` when the run did not finish, ``n/a``
    when the configuration cannot run (see :func:`unsupported`)."""
    value = row.get(key)
    if value is None:
        if key == "step_time_s" and not row["runs_ok"]:
            return "n/a" if row.get("not_applicable") else "failed"
        return "-"
    if isinstance(value, list):
        return "/".join(f"{v:.2f}" for v in value)
    return fmt.format(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table."""
    cells = [[header for header, _, _ in COLUMNS]]
    cells += [[cell(row, key, fmt) for _, key, fmt in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(
            text.rjust(width) if i else text.ljust(width)
            for i, (text, width) in enumerate(zip(line, widths, strict=True))
        )
        for line in cells
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def describe(settings: Settings) -> str:
    """One line naming what was measured."""
    return (
        f"model {settings.model} ({' '.join(model_overrides(settings))}), p={settings.num_stages}, "
        f"B={settings.batch_size}, {settings.steps} steps/run ({settings.warmup} warm-up dropped), "
        f"{settings.repeats} repeats, stage threads {settings.stage_threads}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}"
    )


def write_outputs(
    out: Path, settings: Settings, rows: list[dict[str, Any]], raw: list[dict[str, Any]]
) -> tuple[Path, Path]:
    """Write ``<out>.json`` (settings, rows, every run's medians) and ``<out>.csv`` (the rows)."""
    json_path, csv_path = Path(f"{out}.json"), Path(f"{out}.csv")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "description": describe(settings),
        "settings": asdict(settings),
        "overrides": model_overrides(settings),
        "rows": [{k: _json_value(v) for k, v in row.items()} for row in rows],
        "runs": raw,
    }
    json_path.write_text(json.dumps(document, indent=1))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            flat = dict(row)
            if isinstance(flat.get("peak_activation_mib"), list):
                flat["peak_activation_mib"] = "/".join(f"{v:.3f}" for v in flat["peak_activation_mib"])
            writer.writerow(flat)
    return json_path, csv_path


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_losses(rows: list[dict[str, Any]]) -> str | None:
    """A warning when the methods' first-step losses differ (they train the same model on the same batch)."""
    losses = {row["method"]: row["loss_step1"] for row in rows if row.get("loss_step1") is not None}
    if losses and max(losses.values()) - min(losses.values()) > 1e-3 * max(1.0, abs(min(losses.values()))):
        return f"warning: first-step losses differ between methods: {losses}"
    return None


# --------------------------------------------------------------------------------------------------- main


def measure(settings: Settings, scratch: Path) -> tuple[list[dict[str, Any]], int]:
    """Run every configuration ``settings.repeats`` times, round-robin; return each run's medians
    (with ``repeat`` and ``config``) and the number of runs that failed."""
    runs: list[dict[str, Any]] = []
    failures = 0
    for repeat in range(settings.repeats):
        for config in configurations(settings):
            label = f"[{repeat + 1}/{settings.repeats}] {config.name:<16} m={config.num_microbatches}"
            reason = unsupported(settings, config)
            if reason:
                print(f"bench: {label} skipped: {reason}", flush=True)
                continue
            start = time.monotonic()
            run_dir = scratch / f"r{repeat}-{config.name}-m{config.num_microbatches}"
            try:
                summary = summarize_run(run_config(settings, config, run_dir), settings, config)
            except RuntimeError as error:
                failures += 1
                print(f"bench: {label} FAILED: {error.args[0]}", flush=True)
                if len(error.args) > 1:
                    print(error.args[1], file=sys.stderr, flush=True)
                continue
            runs.append({"repeat": repeat, "config": config, **summary})
            wall = time.monotonic() - start
            print(f"bench: {label} step {summary['step_time_s']:.4f} s ({wall:.1f} s wall)", flush=True)
    return runs, failures


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every configuration round-robin, print the table, write JSON and CSV."""
    args = parse_args(argv)
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
