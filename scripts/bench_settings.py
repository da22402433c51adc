"""What one ``scripts/bench.py`` invocation measures: the settings, the configurations, their Hydra overrides.

Every pipeline run, pipetrain's and torch.distributed.pipelining's alike, is described by the same list of
pipetrain overrides (:func:`run_overrides`): the model, the batch, the split, the schedule and the
micro-batch count. ``python -m pipetrain.train`` takes it on its command line and
``scripts/pipelining_baseline.py`` composes it the same way, so both run the same stages.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipetrain.schedule import Schedule, build_schedule

__all__ = [
    "SCHEDULES",
    "Config",
    "Settings",
    "configurations",
    "model_overrides",
    "parse_args",
    "run_overrides",
    "schedule_of",
    "settings_from_args",
    "split_of",
    "unsupported",
]

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zb_v")
DEFAULT_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
SHORT_NAMES = {
    "gpipe": "gpipe",
    "1f1b": "1f1b",
    "interleaved_1f1b": "interleaved",
    "zb_h1": "zb_h1",
    "zb_v": "zb_v",
}
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


@dataclass(frozen=True)
class Settings:
    """One benchmark invocation: the model, the splits and the measurement plan."""

    model: str
    hidden: int
    layers: int
    batch_size: int
    seq_len: int
    heads: int
    balance: tuple[int, ...]
    """Units per stage of the one-stage-per-worker split (``p`` stages on ``p`` workers)."""
    stages_per_worker: int
    """``v`` of the interleaved rows: ``p * v`` stages on ``p`` workers."""
    schedules: tuple[str, ...]
    microbatches: tuple[int, ...]
    steps: int
    warmup: int
    repeats: int
    stage_threads: int
    run_timeout_s: float
    pipetrain_overrides: tuple[str, ...] = ()
    data_planes: tuple[str, ...] = ("auto",)
    """pipetrain's ``rpc.data_plane`` values, one set of pipetrain rows each."""

    @property
    def num_workers(self) -> int:
        """Processes computing stages (p), whatever the schedule."""
        return len(self.balance)

    @property
    def num_units(self) -> int:
        """Units of the model: the repeated blocks plus the cheap ones before and after them."""
        return self.layers + (2 if self.model == "mlp" else 3)


@dataclass(frozen=True)
class Config:
    """One measured configuration: a method, and for pipelines a schedule and a micro-batch count."""

    method: str
    schedule: str | None = None
    num_microbatches: int | None = None
    threads: int | None = None
    data_plane: str = "auto"
    """pipetrain's ``rpc.data_plane`` (rows named ``pipetrain+c10d-...`` for ``c10d``; plain for the
    default, ``auto``)."""

    @property
    def name(self) -> str:
        """``single-1t``, ``pipetrain-gpipe``, ``pipelining-interleaved``, ..."""
        if self.method == "single":
            return f"single-{self.threads}t"
        assert self.schedule is not None
        method = self.method if self.data_plane == "auto" else f"{self.method}+{self.data_plane}"
        return f"{method}-{SHORT_NAMES[self.schedule]}"


def parse_args(argv: Sequence[str] | None = None, description: str = "") -> argparse.Namespace:
    """The command line (see ``scripts/bench.py``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", choices=sorted(MODEL_DEFAULTS), default="mlp")
    parser.add_argument("--hidden", type=int, help="MLP hidden width / GPT d_model")
    parser.add_argument("--layers", type=int, help="MLP depth (hidden->hidden blocks) / GPT blocks")
    parser.add_argument("--batch-size", type=int, help="samples per optimizer step (B)")
    parser.add_argument("--seq-len", type=int, help="GPT sequence length")
    parser.add_argument("--heads", type=int, help="GPT attention heads")
    parser.add_argument("--stages", type=int, default=2, help="workers p, one stage each (default 2)")
    parser.add_argument("--balance", help="units per stage, e.g. 3,3 (default: hidden blocks spread evenly)")
    parser.add_argument(
        "--stages-per-worker", type=int, default=2, help="v of the interleaved rows (default 2)"
    )
    parser.add_argument(
        "--schedules",
        default=",".join(DEFAULT_SCHEDULES),
        help=f"comma-separated, of {','.join(SCHEDULES)} (default {','.join(DEFAULT_SCHEDULES)})",
    )
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
    parser.add_argument(
        "--data-planes",
        default="auto",
        help="comma-separated rpc.data_plane values of the pipetrain rows, e.g. auto,rpc,c10d (default auto:"
        " shared memory on one Linux host)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, m = 4, 1 repeat, 4 steps")
    parser.add_argument("--out", type=Path, default=Path("bench_results"), help="<out>.json, <out>.csv")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Fill in the per-model defaults (tiny ones with ``--quick``) and check the combination."""
    sizes = dict((QUICK_DEFAULTS if args.quick else MODEL_DEFAULTS)[args.model])
    for key in ("hidden", "layers", "batch_size", "seq_len", "heads"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    default_m = "4" if args.quick else "2,4,8,16"
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
        stages_per_worker=args.stages_per_worker,
        schedules=tuple(args.schedules.split(",")),
        microbatches=tuple(int(value) for value in (args.microbatches or default_m).split(",")),
        steps=args.steps or (4 if args.quick else 12),
        warmup=args.warmup if args.warmup is not None else (2 if args.quick else 3),
        repeats=args.repeats or (1 if args.quick else 3),
        stage_threads=args.stage_threads,
        run_timeout_s=args.run_timeout,
        pipetrain_overrides=tuple(args.pipetrain_override),
        data_planes=tuple(args.data_planes.split(",")),
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
    if sum(settings.balance) != settings.num_units or min(settings.balance) < 1:
        raise SystemExit(
            f"--balance {list(settings.balance)}: must be >= 1 per stage and sum to {settings.num_units}"
        )
    unknown = sorted(set(settings.schedules) - set(SCHEDULES))
    if unknown:
        raise SystemExit(f"--schedules: unknown {unknown}; known: {', '.join(SCHEDULES)}")
    if settings.stages_per_worker < 2:
        raise SystemExit("--stages-per-worker: interleaved 1F1B needs at least 2 stages per worker")
    for m in settings.microbatches:
        if m < 1 or settings.batch_size % m:
            raise SystemExit(f"--microbatches: batch size {settings.batch_size} is not divisible by m={m}")
    if not 0 <= settings.warmup < settings.steps:
        raise SystemExit(f"--warmup {settings.warmup} must leave steps to measure (--steps {settings.steps})")


def split_of(settings: Settings, config: Config) -> tuple[tuple[int, ...], int]:
    """Units per stage and stages per worker of a pipeline configuration.

    The interleaved rows cut the same model into ``p * v`` stages with :func:`default_balance`, the ZB-V
    rows into ``2 p`` stages.
    """
    if config.schedule not in ("interleaved_1f1b", "zb_v"):
        return settings.balance, 1
    v = settings.stages_per_worker if config.schedule == "interleaved_1f1b" else 2
    return default_balance(settings.model, settings.layers, settings.num_workers * v), v


def schedule_of(settings: Settings, config: Config) -> Schedule:
    """pipetrain's schedule for a pipeline configuration (``ValueError`` when it refuses the sizes)."""
    assert config.schedule is not None and config.num_microbatches is not None
    balance, v = split_of(settings, config)
    return build_schedule(config.schedule, len(balance), config.num_microbatches, v)


def model_overrides(settings: Settings) -> list[str]:
    """pipetrain Hydra overrides giving the benchmark's model and batch size."""
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
    return [*overrides, f"train.batch_size={settings.batch_size}", "device=cpu"]


def run_overrides(settings: Settings, config: Config) -> list[str]:
    """The overrides of one pipeline run: model, batch, split, schedule and micro-batch count."""
    balance, v = split_of(settings, config)
    return [
        *model_overrides(settings),
        "pipeline.stages=null",
        f"pipeline.balance=[{','.join(map(str, balance))}]",
        f"schedule={config.schedule}",
        f"pipeline.stages_per_worker={v}",
        f"pipeline.num_microbatches={config.num_microbatches}",
    ]


def configurations(settings: Settings) -> list[Config]:
    """The configurations of one round, in the order they are measured."""
    configs = [Config("single", threads=1), Config("single", threads=2)]
    for m in settings.microbatches:
        for plane in settings.data_planes:
            configs += [Config("pipetrain", schedule, m, data_plane=plane) for schedule in settings.schedules]
        configs += [Config("pipelining", schedule, m) for schedule in settings.schedules]
    return configs


def unsupported(settings: Settings, config: Config) -> str | None:
    """Why ``config`` cannot run with these settings (it is then shown as ``n/a``), or ``None``."""
    if config.method == "single":
        return None
    m = config.num_microbatches
    assert m is not None
    if config.method == "pipelining" and config.schedule == "1f1b" and m < settings.num_workers:
        return "Schedule1F1B needs m >= p"
    if config.schedule in ("interleaved_1f1b", "zb_v"):
        v = settings.stages_per_worker if config.schedule == "interleaved_1f1b" else 2
        num_stages = settings.num_workers * v
        if settings.layers < num_stages:
            return f"{num_stages} stages need --layers >= {num_stages}"
        try:
            schedule_of(settings, config)
        except ValueError as error:
            return str(error).split(";")[0]
    return None
