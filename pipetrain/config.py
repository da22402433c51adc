"""The typed configuration schema of a pipetrain run.

Hydra composes ``pipetrain/conf/train.yaml`` (plus overrides) on top of :class:`TrainConfig`, which is
registered in Hydra's ConfigStore as ``train_schema``; struct mode makes a misspelled key an error. The
entry points turn the composed ``DictConfig`` into these dataclasses (:func:`to_train_config`); everything
else in pipetrain works on the dataclasses only.

``model``, ``data`` and ``optim`` are *target specs*: a ``_target_`` (dotted path of a callable) plus its
keyword arguments, so any importable callable can be plugged in from the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PipelineConfig",
    "ScheduleConfig",
    "TrainLoopConfig",
    "EvalConfig",
    "LogConfig",
    "RpcConfig",
    "DATA_PLANES",
    "CheckpointConfig",
    "LoaderConfig",
    "AutobalanceConfig",
    "TrainConfig",
    "register_schema",
]


@dataclass(kw_only=True)
class PipelineConfig:
    """How the model is cut into stages and the batch into micro-batches."""

    stages: list[list[str]] | None = None
    """The units each stage owns, in forward order, e.g. ``[[layers.0, layers.1], [layers.2, head]]``."""
    balance: Any = None
    """How many consecutive units each stage takes, e.g. ``[3, 3]``; or ``auto``: ``python -m
    pipetrain.train`` profiles the units before launch and puts here the split with the lowest simulated
    step time into ``pipeline.num_stages`` stages (:mod:`pipetrain.balance`). Exactly one of stages /
    balance. (Typed ``Any``: OmegaConf has no list-or-string type; checked before launch.)"""
    num_stages: int | None = None
    """Stages to cut the model into with ``pipeline.balance=auto`` (``null``: as many as
    ``pipeline.stages`` names). When given with an explicit split, it must match that split's length."""
    num_microbatches: int = 4
    """Micro-batches per batch; ``train.batch_size`` must be divisible by it."""
    stages_per_worker: int = 1
    """Stages each worker process hosts (``v``); more than 1 for schedules that interleave stages on a
    worker (``interleaved_1f1b``: stage ``s`` on worker ``s mod (stages / v)``)."""
    replicas: int = 1
    """Data-parallel copies of the whole pipeline: each takes ``1/replicas`` of every batch, and the copies
    of a stage average their gradients before stepping. torchrun's world size is
    ``replicas x workers + 1`` (one driver for all)."""
    activation_checkpointing: str = "never"
    """Recompute a stage's forward in backward instead of keeping its activations, per micro-batch:
    ``never``, ``except_last`` (every micro-batch but the last, whose backward comes right away) or
    ``always``."""
    deferred_batchnorm: bool = False
    """Replace BatchNorm layers by ones that gather their running statistics over the whole batch and
    update them once per step (normalisation still uses each micro-batch's own statistics)."""


@dataclass(kw_only=True)
class ScheduleConfig:
    """Which pipeline schedule orders the forward and backward actions."""

    name: str = "gpipe"
    """A name known to :func:`pipetrain.schedule.build_schedule`: ``gpipe``, ``1f1b``,
    ``interleaved_1f1b``, or the zero-bubble ``zb_h1`` (one stage per worker) and ``zb_v`` (two stages per
    worker in a V), which split each backward into input- and weight-gradient actions."""


@dataclass(kw_only=True)
class TrainLoopConfig:
    """The training loop."""

    steps: int = 100
    """Optimizer steps to run."""
    batch_size: int = 64
    """Samples per optimizer step (split into ``pipeline.num_microbatches`` micro-batches)."""
    log_every: int = 10
    """Steps between logged figures (TensorBoard, metrics.jsonl, progress line)."""
    loss: str = "cross_entropy"
    """Loss computed by the last stage: ``cross_entropy`` or ``mse`` (mean over the batch)."""
    stop_on_nan: bool = True
    """Stop the run when a micro-batch loss is NaN or infinite."""
    compile: bool = False
    """Compile each stage's module with ``torch.compile`` (names, checkpoints and parity unchanged; the
    first steps are slow while it compiles)."""
    clip_grad_norm: float | None = None
    """Clip the gradients of *all* stages together to this 2-norm, exactly as
    ``torch.nn.utils.clip_grad_norm_`` on the unsplit model; a step whose norm is not finite is skipped
    on every stage. ``null``: no clipping."""
    submit_ahead: bool = True
    """Hand the workers the next step while the current one runs, so that each starts it as soon as it is
    done with this one, not after the driver has collected, logged and sent again. Only where nothing must
    happen between the two steps: not after a step that saves a checkpoint, evaluates or is profiled, and
    not with ``clip_grad_norm`` (the optimizer steps wait for the driver's scale)."""
    keep_host_memory: bool = True
    """Every process of the run keeps the host memory it frees for its next allocations
    (:mod:`pipetrain.host_memory`), instead of faulting a large tensor's pages in again each micro-batch;
    it then keeps its peak heap. Has an effect with glibc only."""
    max_restarts: int = 0
    """Times torchrun restarts the run's processes after one of them fails (its ``--max-restarts``);
    each restart resumes from the newest complete checkpoint of the run directory by itself (none yet:
    from where the run started). A run launched by hand passes ``--max-restarts`` to torchrun itself."""


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation passes during training: forward only, no autograd, no optimizer step."""

    every: int = 0
    """Evaluate every this many steps, and after the last step (``0``: never)."""
    batches: int = 0
    """Evaluation batches (of ``train.batch_size``, in dataset order) per pass (``0``: all full batches)."""


@dataclass(kw_only=True)
class LogConfig:
    """Run-directory outputs beyond the per-step scalars."""

    trace_every: int = 0
    """Write a Chrome trace of one step every this many steps (``0``: only the last step)."""
    profile_steps: list[int] = field(default_factory=list)
    """Steps (1-based) to run under ``torch.profiler`` on every worker; each writes
    ``traces/profile_step<N>.json`` (operators inside pipetrain's timeline) and ``.txt`` (a summary)."""
    hparams: dict[str, Any] = field(default_factory=dict)
    """The run's columns in TensorBoard's HPARAMS table (name -> value), next to ``status``; empty: the
    schedule, the split and the micro-batch count. Each job of a multirun gets the overrides its sweep
    varies (``balance: "[2,4]"``, ``schedule: 1f1b``), so the table shows exactly what differs."""


DATA_PLANES = ("auto", "rpc", "c10d", "shm")
"""The values of ``rpc.data_plane``."""


@dataclass(kw_only=True)
class RpcConfig:
    """The RPC transport between the driver and the workers."""

    timeout_s: float = 60.0
    """A no-progress watchdog, not a per-call deadline: seconds without anything completing (an action, an
    optimizer step, a checkpoint's bytes) before the driver declares the pipeline stuck and stops the run;
    also the timeout of the replicas' gradient all-reduce."""
    num_worker_threads: int = 16
    """TensorPipe RPC thread-pool size on every process."""
    transports: list[str] | None = field(default_factory=lambda: ["uv"])
    """TensorPipe transports. ``uv`` (TCP) by default: the ``shm`` transport's reactor thread busy-polls a
    core in every process, which starves the stages' compute where cores are few. ``null``: all."""
    channels: list[str] | None = field(default_factory=lambda: ["basic"])
    """TensorPipe channels for tensor payloads (``null``: TensorPipe's default set)."""
    data_plane: str = "auto"
    """How boundary values travel between workers: ``shm`` (through shared memory, every worker of a
    replica on one Linux host; :mod:`pipetrain.transport.shm`), ``rpc`` (the consumer fetches each one with
    an RPC call), ``c10d`` (the producer sends it with c10d send/recv, gloo on the CPU;
    :mod:`pipetrain.transport.p2p`), or ``auto``: ``shm`` on Linux when every process of the run is on the
    driver's node (torchrun's ``LOCAL_WORLD_SIZE`` equals ``WORLD_SIZE``), else ``rpc``. Requests, replies
    and references always go over RPC."""


@dataclass(kw_only=True)
class CheckpointConfig:
    """Per-stage checkpoints."""

    every: int = 0
    """Save every this many steps (``0``: only at the end of the run)."""
    resume: str | None = None
    """A ``checkpoints/`` or ``checkpoints/step_<N>`` directory to continue from."""
    keep_last: int = 0
    """Keep only the newest this many complete checkpoints (``0``: keep all)."""
    at_end: bool = True
    """Save a checkpoint after the last step."""
    on_interrupt: bool = True
    """Save a checkpoint when the run is interrupted (Ctrl-C, SIGTERM to ``pipetrain.train``)."""


@dataclass(kw_only=True)
class LoaderConfig:
    """How the driver loads batches: a ``DataLoader`` that prepares the next batches during the step."""

    num_workers: int = 1
    """Loader processes (``0``: load in the driver, between steps)."""
    prefetch_factor: int = 2
    """Batches each loader process prepares ahead (with ``num_workers > 0``)."""


@dataclass(kw_only=True)
class AutobalanceConfig:
    """How ``pipeline.balance=auto`` and ``python -m pipetrain.balance`` profile units and pick a split."""

    max_memory_mib: float | None = None
    """Memory cap per worker in MiB (parameters, gradients, optimizer state, and activations times the
    schedule's peak in-flight micro-batches); ``null``: no cap."""
    warmup: int = 2
    """Untimed forward / backward passes of each unit before the timed ones."""
    repeats: int = 10
    """Timed passes of each unit; the median counts."""
    result: dict[str, Any] | None = None
    """Written by the launcher with ``pipeline.balance=auto`` (read, never set by hand): the chosen split,
    its predicted step time and bubble, and the uniform split's, as recorded in the run's config.yaml."""


@dataclass(kw_only=True)
class TrainConfig:
    """The whole run: what ``python -m pipetrain.train`` and ``pipetrain.worker`` compose."""

    model: dict[str, Any] = field(default_factory=dict)
    """Target spec of a callable returning the ``nn.Module``; ``init`` optionally names a full state dict."""
    data: dict[str, Any] = field(default_factory=dict)
    """Target spec of a callable returning a map-style dataset of ``(input, target)`` pairs;
    ``data.eval_split`` (read by pipetrain, not passed on) holds that fraction of it out for evaluation."""
    eval_data: dict[str, Any] = field(default_factory=dict)
    """Target spec of the evaluation dataset (empty: ``data.eval_split`` of ``data``, or no evaluation)."""
    optim: dict[str, Any] = field(default_factory=dict)
    """Target spec (with ``_partial_: true``) of an optimizer class; each stage owns one."""
    lr_scheduler: dict[str, Any] = field(default_factory=dict)
    """Target spec (with ``_partial_: true``) of a learning-rate scheduler called with a stage's optimizer,
    e.g. ``torch.optim.lr_scheduler.CosineAnnealingLR``; it steps once per optimizer step on every
    stage. Empty: the learning rate stays ``optim.lr``."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    rpc: RpcConfig = field(default_factory=RpcConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    autobalance: AutobalanceConfig = field(default_factory=AutobalanceConfig)
    seed: int = 0
    """Seeds model initialisation and data order; every process uses the same seed."""
    precision: str = "fp32"
    """``fp32``, or ``bf16``: each stage's forward under ``torch.autocast`` to bfloat16 with float32 master
    weights and optimizer state; activations and gradients travel between workers in bfloat16."""
    device: str = "auto"
    """``auto`` (each stage on its own GPU when CUDA is there, else CPU), ``cpu`` or ``cuda``."""
    run_dir: str | None = None
    """Where the driver writes ``config.yaml``, ``tb/``, ``metrics.jsonl``, traces and checkpoints.
    ``python -m pipetrain.train`` sets it to Hydra's output directory; otherwise ``runs/<date>/<time>``."""


def register_schema() -> None:
    """Register :class:`TrainConfig` as ``train_schema`` in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
