"""Shared test helpers: small configs built directly from the typed schema (no Hydra)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipetrain.build import (
    build_dataset,
    build_datasets,
    build_eval_batches,
    build_model,
    build_schedule_for,
    build_stages,
)
from pipetrain.checkpoint import merged_model_state
from pipetrain.compose import compose_config, to_train_config
from pipetrain.config import TrainConfig
from pipetrain.data import BatchOrder
from pipetrain.driver import Driver
from pipetrain.losses import get_loss
from pipetrain.progress import REPORT_AFTER_S
from pipetrain.targets import call_target
from pipetrain.transport import local_replicas, local_workers

TESTS_DIR = Path(__file__).resolve().parent

SMALL_SGD_RUN = [
    "model.hidden=32",
    "train.batch_size=16",
    "train.steps=6",
    "train.log_every=1",
    "optim=sgd",
    "optim.lr=0.1",
    "optim.momentum=0.9",
]
"""Overrides of a short real run (6 steps of a 32-wide MLP, SGD with momentum) for parity tests."""

DATA_PLANE_RUNS = {
    "1f1b-3-workers": ["schedule=1f1b", "pipeline.balance=[2,2,2]", "pipeline.num_microbatches=4"],
    "interleaved-2-workers": [
        "schedule=interleaved_1f1b",
        "pipeline.balance=[2,1,2,1]",
        "pipeline.stages_per_worker=2",
        "pipeline.num_microbatches=4",
    ],
    "zb_v-2-workers": ["schedule=zb_v", "pipeline.balance=[2,1,2,1]"],
    "dict-boundaries": [
        "model._target_=nested_parts.make_model",
        "model.in_features=8",
        "model.depth=3",
        "model.num_classes=5",
        "+model.style=dict",
        "data.num_samples=256",
        "schedule=gpipe",
        "pipeline.balance=[1,2,2]",
        "pipeline.num_microbatches=4",
    ],
}
"""Splits and schedules each data plane that sends values must train like the unsplit model (with
:data:`SMALL_SGD_RUN`; ``dict-boundaries`` needs ``tests/`` on ``PYTHONPATH``)."""

MODEL_SPECS = {
    "mlp": {
        "_target_": "pipetrain.models.mlp.mlp",
        "in_features": 8,
        "hidden": 32,
        "depth": 4,
        "num_classes": 5,
    },
    "gpt": {
        "_target_": "pipetrain.models.gpt.gpt",
        "vocab_size": 32,
        "seq_len": 8,
        "d_model": 16,
        "num_heads": 2,
        "num_layers": 4,
    },
}
DATA_SPECS = {
    "mlp": {
        "_target_": "pipetrain.data.synthetic_classification",
        "num_samples": 256,
        "in_features": 8,
        "num_classes": 5,
    },
    "gpt": {
        "_target_": "pipetrain.data.synthetic_tokens",
        "num_samples": 256,
        "seq_len": 8,
        "vocab_size": 32,
    },
}
BALANCES = {
    "mlp": {1: [6], 2: [3, 3], 3: [2, 2, 2], 4: [2, 2, 1, 1]},
    "gpt": {1: [7], 2: [3, 4], 3: [2, 3, 2], 4: [2, 2, 2, 1]},
}


# The TensorBoard / metrics.jsonl tags the README documents (a contract: written out here on purpose, not
# taken from pipetrain, so a renamed or dropped tag fails the tests).
STEP_TAGS = [
    "train/loss",
    "perf/samples_per_sec",
    "perf/step_time_s",
    "perf/data_time_s",
    "pipeline/bubble_fraction",
    "pipeline/bubble_fraction_predicted",
    "pipeline/bubble_fraction_predicted_measured_costs",
    "pipeline/window_s",
    "pipeline/window_predicted_measured_costs_s",
    "pipeline/critical_path/compute_s",
    "pipeline/critical_path/transfer_s",
    "pipeline/critical_path/overhead_s",
    "pipeline/critical_path/start_s",
    "pipeline/critical_path/transfers",
    "pipeline/critical_path/actions",
]
WORKER_TAG_NAMES = (
    "busy_s",
    "idle_s",
    "transfer_s",
    "peak_activation_mib",
    "busy_f_s",
    "busy_b_s",
    "busy_i_s",
    "busy_w_s",
    "sent_mib",
)


def worker_tags(num_workers: int) -> list[str]:
    """The per-stage tags of a run with ``num_stages`` stages."""
    return [f"worker{k}/{name}" for k in range(num_workers) for name in WORKER_TAG_NAMES]


def make_config(
    model: str = "mlp",
    num_stages: int = 2,
    schedule: str = "gpipe",
    num_microbatches: int = 4,
    batch_size: int = 16,
    steps: int = 10,
    lr: float = 0.1,
) -> TrainConfig:
    """A small, fast run of ``model`` split into ``num_stages`` balanced stages."""
    cfg = TrainConfig(
        model=dict(MODEL_SPECS[model]),
        data=dict(DATA_SPECS[model]),
        optim={"_target_": "torch.optim.SGD", "_partial_": True, "lr": lr, "momentum": 0.9},
    )
    cfg.pipeline.balance = BALANCES[model][num_stages]
    cfg.pipeline.num_microbatches = num_microbatches
    cfg.schedule.name = schedule
    cfg.train.batch_size = batch_size
    cfg.train.steps = steps
    cfg.train.log_every = 1
    cfg.device = "cpu"
    return cfg


def train_unsplit(cfg, record: dict[str, list[float]] | None = None, device: str = "cpu"):
    """The reference: the whole model, one process, one backward per batch, with the configured
    learning-rate scheduler and ``clip_grad_norm_``, on ``device``. ``record`` collects each step's ``lr``
    and ``grad_norm`` (when clipping). The returned weights are on the CPU."""
    model = build_model(cfg).to(device)
    optimizer = call_target(cfg.optim, "optim")(model.parameters())
    scheduler = call_target(cfg.lr_scheduler, "lr_scheduler")(optimizer) if cfg.lr_scheduler else None
    loss_fn = get_loss(cfg.train.loss)
    batches = BatchOrder(build_dataset(cfg), cfg.train.batch_size, cfg.seed)
    record = {} if record is None else record
    losses = []
    for step in range(cfg.train.steps):
        inputs, targets = (value.to(device) for value in batches.batch(step))
        loss = loss_fn(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        if cfg.train.clip_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
            record.setdefault("grad_norm", []).append(float(norm))
        record.setdefault("lr", []).append(float(optimizer.param_groups[0]["lr"]))
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses, {name: value.cpu() for name, value in model.state_dict().items()}


def train_pipelined(cfg, run_dir=None, start_step: int = 0, print_fn=None, replica_states=None):
    """Train ``cfg`` through in-process workers (the real runner, on threads); return the losses of the
    steps run and the final parameters and buffers under their full-model names (replica 0's, with
    ``pipeline.replicas``; ``replica_states``, when given, receives every replica's)."""
    plan, stages = build_stages(cfg)
    replicas = [stages] + [build_stages(cfg)[1] for _ in range(cfg.pipeline.replicas - 1)]
    schedule = build_schedule_for(cfg, plan.num_stages)
    train_set, eval_set = build_datasets(cfg)
    batches = BatchOrder(train_set, cfg.train.batch_size, cfg.seed)
    handles = local_replicas(replicas, schedule) if len(replicas) > 1 else local_workers(stages, schedule)
    driver = Driver(
        cfg,
        handles,
        plan,
        batches,
        run_dir,
        print_fn=print_fn or (lambda _: None),
        eval_batches=build_eval_batches(cfg, eval_set),
    )
    losses = driver.train(start_step=start_step)
    states = [
        {name: value for stage in copy for name, value in stage.module.full_state_dict().items()}
        for copy in replicas
    ]
    if replica_states is not None:
        replica_states.extend(states)
    return losses, states[0]


def assert_run_equals_unsplit(
    run_dir, overrides: list[str], device: str = "cpu", tolerance: float = 1e-5
) -> list[dict]:
    """The finished run of ``overrides`` in ``run_dir`` logged the losses of the unsplit model trained on
    ``device`` at every step and saved its final weights (to ``tolerance``); return the run's
    ``metrics.jsonl`` entries."""
    logged = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    cfg = to_train_config(compose_config(overrides))
    reference_losses, reference_weights = train_unsplit(cfg, device=device)
    losses = [entry["train/loss"] for entry in logged]
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor(reference_losses), rtol=tolerance, atol=tolerance
    )
    weights = merged_model_state(Path(run_dir) / "checkpoints" / f"step_{cfg.train.steps}")
    assert weights.keys() == reference_weights.keys()
    for name, value in reference_weights.items():
        torch.testing.assert_close(
            weights[name], value, rtol=tolerance, atol=tolerance, msg=lambda m, n=name: f"{n}: {m}"
        )
    return logged


def assert_same_training(losses, state, reference_losses, reference_state, tolerance: float = 1e-5) -> None:
    """Per-step losses and every parameter and buffer (compared on the CPU) equal the reference's to
    ``tolerance``."""
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor(reference_losses), rtol=tolerance, atol=tolerance
    )
    assert state.keys() == reference_state.keys()
    for name, value in reference_state.items():
        torch.testing.assert_close(
            state[name].cpu(), value.cpu(), rtol=tolerance, atol=tolerance, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.fixture
def small_config():
    """Factory for small run configs."""
    return make_config


@dataclass
class Finished:
    """A finished command: exit status and combined output."""

    returncode: int
    output: str
    seconds: float


class Launched:
    """A command started in the background; every process it starts carries a tag in its environment."""

    def __init__(self, args: list[str], cwd=None, env=None) -> None:
        self.args = args
        self.tag = uuid.uuid4().hex
        merged_env = dict(os.environ, **(env or {}), PIPETRAIN_TEST_TAG=self.tag)
        merged_env.setdefault("TP_SOCKET_IFNAME", "lo")
        merged_env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            args,
            cwd=cwd,
            env=merged_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def finish(self, timeout: float) -> Finished:
        """Wait for the command; kill everything it started on timeout; assert nothing outlives it."""
        try:
            output, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tagged(self.tag)
            output, _ = self.process.communicate()
            raise AssertionError(
                f"command timed out after {timeout} s: {self.args}\n{output[-4000:]}"
            ) from None
        finally:
            leftovers = wait_tagged_gone(self.tag, grace_s=5.0)
            kill_tagged(self.tag)
        assert not leftovers, f"processes {leftovers} of {self.args} outlived it\n{output[-4000:]}"
        return Finished(self.process.returncode, output, time.monotonic() - self.started)


def launch_with_markers(args: list[str], cwd: Path, markers: Path) -> Launched:
    """Start ``args`` with ``tests/`` importable and ``tests/slow_parts.py``'s phase markers written into
    ``markers`` (created here), so a test can kill a real worker in a known phase (:func:`wait_for_phase`)."""
    markers.mkdir(parents=True)
    env = {
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
        "PIPETRAIN_TEST_MARKERS": str(markers),
    }
    return Launched(args, cwd=cwd, env=env)


def wait_for_phase(run: Launched, markers: Path, rank: int, phase: str, timeout: float = 60) -> int:
    """Wait until ``rank`` reports ``phase``; return its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.process.poll() is None, "the run ended before the phase was reached"
        found = _phase_of(markers, rank)
        if found is not None and found[0] == phase:
            return found[1]
        time.sleep(0.005)
    raise AssertionError(f"rank {rank} never reported {phase}")


def _phase_of(markers: Path, rank: int) -> tuple[str, int] | None:
    """The phase ``rank`` last reported and its pid (``None`` before any)."""
    marker = markers / f"rank{rank}"
    if not marker.exists():
        return None
    found, pid = marker.read_text().split()
    return found, int(pid)


INSIDE_PHASE_S = 5 * REPORT_AFTER_S
"""How far into a phase :func:`signal_inside_phase` signals: a worker reports an action once it has run
``REPORT_AFTER_S``, from a thread that looks every ``REPORT_AFTER_S``, so the report of an action is out
within about twice that of its start; the rest is room for a loaded machine's scheduler. A phase the test
signals in must last well beyond this (``delay_s`` of ``tests/slow_parts.py`` per unit)."""


def signal_inside_phase(
    run: Launched, markers: Path, rank: int, phase: str, signum: int
) -> tuple[int, float]:
    """Send ``signum`` to ``rank`` :data:`INSIDE_PHASE_S` after it reports ``phase``, by which time the
    driver has heard of the action under way; return its pid and the ``time.monotonic()`` of the signal.

    On a loaded machine this process may see the phase late, or wake from its sleep late, when the phase
    is over: then it waits for the next one, so the signal always lands inside ``phase``.
    """
    while True:
        pid = wait_for_phase(run, markers, rank, phase)
        time.sleep(INSIDE_PHASE_S)
        if _phase_of(markers, rank) == (phase, pid):
            os.kill(pid, signum)
            return pid, time.monotonic()


def run_command(args: list[str], timeout: float, cwd: str | os.PathLike | None = None, env=None) -> Finished:
    """Run ``args`` to completion (see :class:`Launched`)."""
    return Launched(args, cwd=cwd, env=env).finish(timeout)


def train_equals_unsplit(run_dir: Path, overrides: list[str], timeout: float = 200, env=None):
    """``python -m pipetrain.train run_dir=<run_dir> <overrides>`` (in ``run_dir``) succeeds and equals the
    unsplit model (:func:`assert_run_equals_unsplit`); return its output and ``metrics.jsonl`` entries."""
    args = [sys.executable, "-m", "pipetrain.train", f"run_dir={run_dir}", *overrides]
    result = run_command(args, timeout, cwd=run_dir, env=env)
    assert result.returncode == 0, result.output[-4000:]
    return result.output, assert_run_equals_unsplit(run_dir, overrides)


def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries ``PIPETRAIN_TEST_TAG=<tag>``."""
    needle = f"PIPETRAIN_TEST_TAG={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if needle in handle.read().split(b"\0"):
                    with open(f"/proc/{entry}/stat") as stat:
                        if stat.read().rsplit(")", 1)[1].split()[0] != "Z":
                            pids.append(int(entry))
        except OSError:
            continue
    return pids


def wait_tagged_gone(tag: str, grace_s: float) -> list[int]:
    """Wait up to ``grace_s`` for every tagged process to exit; return those still alive."""
    deadline = time.monotonic() + grace_s
    while (alive := tagged_pids(tag)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def kill_tagged(tag: str) -> None:
    """SIGKILL every tagged process."""
    for pid in tagged_pids(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
