"""Measure one configuration of ``scripts/bench.py`` once: per-step records.

A pipeline run, pipetrain's (``python -m pipetrain.train``) or torch.distributed.pipelining's
(``scripts/pipelining_baseline.py`` under torchrun), writes pipetrain's ``metrics.jsonl`` into its run
directory, and :func:`read_metrics` turns either into the same records::

    {"step": 1, "step_time_s": .., "loss": .., "window_s": .., "busy_s": [per worker],
     "bubble": .., "pred_unit": .., "pred_measured": .., "peak_activation_mib": [per worker]}

The single-process runs give ``step``, ``step_time_s`` and ``loss`` only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_settings import Config, Settings, model_overrides, run_overrides

from pipetrain.build import build_dataset, build_model
from pipetrain.compose import compose_config, to_train_config
from pipetrain.data import BatchOrder
from pipetrain.launch import free_loopback_port
from pipetrain.losses import get_loss
from pipetrain.targets import call_target

__all__ = ["RunFailed", "read_metrics", "run_config"]

BASELINE_SCRIPT = Path(__file__).resolve().with_name("pipelining_baseline.py")


class RunFailed(Exception):
    """A launched run exited non-zero or ran out of time; ``log_tail`` is the end of its output."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


def run_config(settings: Settings, config: Config, run_dir: Path) -> list[dict[str, Any]]:
    """Measure ``config`` once (pipeline runs keep their files in ``run_dir``); per-step records."""
    if config.method == "single":
        return run_single(settings, config.threads or 1)
    run_dir.mkdir(parents=True)
    if config.method == "pipetrain":
        command = pipetrain_command(settings, config, run_dir)
    else:
        command = pipelining_command(settings, config, run_dir)
    launch(command, run_dir, settings, f"{config.name} m={config.num_microbatches}")
    return read_metrics(run_dir)


def run_single(settings: Settings, threads: int) -> list[dict[str, Any]]:
    """The whole model in this process with ``threads`` intra-op threads: forward on the full batch, loss,
    backward, optimizer step (no micro-batches)."""
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


def pipetrain_command(settings: Settings, config: Config, run_dir: Path) -> list[str]:
    """``python -m pipetrain.train`` logging every step, without a final checkpoint."""
    return [
        sys.executable,
        "-m",
        "pipetrain.train",
        f"hydra.run.dir={run_dir}",
        *run_overrides(settings, config),
        f"train.steps={settings.steps}",
        "train.log_every=1",
        "checkpoint.at_end=false",
        f"rpc.data_plane={config.data_plane}",
        *settings.pipetrain_overrides,
    ]


def pipelining_command(settings: Settings, config: Config, run_dir: Path) -> list[str]:
    """torchrun of ``scripts/pipelining_baseline.py``, one process per worker."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={settings.num_workers}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_loopback_port()}",
        str(BASELINE_SCRIPT),
        f"--steps={settings.steps}",
        f"--run-dir={run_dir}",
        "--",
        *run_overrides(settings, config),
    ]


def launch(command: list[str], run_dir: Path, settings: Settings, label: str) -> None:
    """Run ``command`` in its own process group with its output in ``run_dir/bench.log``.

    After ``settings.run_timeout_s`` (or on Ctrl-C) the whole group is killed. ``RunFailed`` unless it
    exits 0.
    """
    env = {
        **os.environ,
        "TP_SOCKET_IFNAME": "lo",
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": str(settings.stage_threads),
        "PYTHONUNBUFFERED": "1",
    }
    log_path = run_dir / "bench.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            status = process.wait(timeout=settings.run_timeout_s)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    if status != 0:
        outcome = f"no result after {settings.run_timeout_s:.0f} s" if status is None else f"exit {status}"
        raise RunFailed(f"{label}: {outcome}", tail(log_path))


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Per-step records from ``run_dir/metrics.jsonl`` (see the module docstring).

    The schedule's window is not among the logged figures: ``busy_k + idle_k = max(window, busy_k)``
    (``idle_k = max(window - busy_k, 0)``) and no worker computes for longer than the window, so it is
    the maximum of ``busy_k + idle_k`` over the workers.
    """
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        logged = json.loads(line)
        workers = range(sum(1 for key in logged if key.endswith("/busy_s")))
        busy = [logged[f"worker{k}/busy_s"] for k in workers]
        records.append(
            {
                "step": logged["step"],
                "step_time_s": logged["perf/step_time_s"],
                "loss": logged["train/loss"],
                "window_s": max(busy[k] + logged[f"worker{k}/idle_s"] for k in workers),
                "busy_s": busy,
                "bubble": logged["pipeline/bubble_fraction"],
                "pred_unit": logged["pipeline/bubble_fraction_predicted"],
                "pred_measured": logged["pipeline/bubble_fraction_predicted_measured_costs"],
                "peak_activation_mib": [logged[f"worker{k}/peak_activation_mib"] for k in workers],
                "cpu_s": logged.get("perf/cpu_s"),
                "path_transfer_s": logged.get("pipeline/critical_path/transfer_s"),
                "path_overhead_s": logged.get("pipeline/critical_path/overhead_s"),
                "path_actions": logged.get("pipeline/critical_path/actions"),
            }
        )
    return records
