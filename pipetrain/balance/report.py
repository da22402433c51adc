"""What ``python -m pipetrain.balance`` prints and writes: unit costs, splits compared, a pipeline YAML."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipetrain.balance.plan import BalanceReport
from pipetrain.balance.search import SplitPrediction
from pipetrain.config import TrainConfig

__all__ = ["describe_choice", "format_report", "pipeline_yaml", "output_path"]

_MIB = 2**20


def format_report(report: BalanceReport, cfg: TrainConfig) -> str:
    """The per-unit costs, then the chosen, uniform and configured splits with their predictions."""
    search = report.search
    lines = [
        f"units of {cfg.model.get('_target_')} on {report.device}, micro-batch of {report.microbatch_size} "
        f"(median of {cfg.autobalance.repeats} after {cfg.autobalance.warmup} warm-up"
        f"{'' if report.profiled else '; profile reused'}):",
        f"  {'unit':<16} {'fwd_ms':>8} {'bwd_ms':>8} {'opt_ms':>8} {'act_MiB':>8} {'static_MiB':>10}",
    ]
    for u in report.units:
        lines.append(
            f"  {u.name:<16} {u.forward_s * 1e3:8.2f} {u.backward_s * 1e3:8.2f} {u.optimizer_s * 1e3:8.2f} "
            f"{u.activation_bytes / _MIB:8.2f} {u.static_bytes / _MIB:10.2f}"
        )
    cap = cfg.autobalance.max_memory_mib
    lines += [
        "",
        f"{cfg.schedule.name}, {search.schedule.num_stages} stages on {search.schedule.num_workers} workers, "
        f"m={cfg.pipeline.num_microbatches}, memory cap {'none' if cap is None else f'{cap:g} MiB'}; "
        f"{search.num_simulated} of {search.num_splits} splits simulated (the others cut by bounds):",
        f"  {'split':<11} {'balance':<24} {'step_ms':>8} {'bubble':>7} {'peak_MiB':>9} {'vs_chosen':>9}",
    ]
    rows: list[tuple[str, SplitPrediction]] = [("chosen", report.best), ("uniform", report.uniform)]
    if report.configured is not None:
        rows.append(("configured", report.configured))
    for label, p in rows:
        lines.append(
            f"  {label:<11} {str(list(p.balance)):<24} {p.step_time_s * 1e3:8.2f} {p.bubble_fraction:7.3f} "
            f"{p.peak_memory_bytes / _MIB:9.2f} {p.step_time_s / report.best.step_time_s:8.2f}x"
        )
    return "\n".join(lines)


def describe_choice(report: BalanceReport) -> str:
    """One line for the launcher: the chosen split and what it predicts, next to the uniform split."""
    best, uniform = report.best, report.uniform
    reused = "" if report.profiled else "; profile reused"
    return (
        f"pipeline.balance=auto -> {list(best.balance)}: predicted step {best.step_time_s * 1e3:.1f} ms, "
        f"bubble {best.bubble_fraction:.3f} (uniform {list(uniform.balance)}: "
        f"{uniform.step_time_s * 1e3:.1f} ms; profiled on {report.device}{reused})"
    )


def pipeline_yaml(report: BalanceReport, cfg: TrainConfig, overrides: Sequence[str]) -> str:
    """A ``conf/pipeline/<name>.yaml`` holding the chosen split, for ``pipeline=<name>``."""
    best = report.best
    command = " ".join(["python -m pipetrain.balance", *overrides])
    return (
        f"# Written by: {command}\n"
        f"# {cfg.schedule.name}, m={cfg.pipeline.num_microbatches}, micro-batch {report.microbatch_size}, "
        f"{report.device}: predicted step {best.step_time_s * 1e3:.2f} ms, "
        f"bubble {best.bubble_fraction:.3f}, peak {best.peak_memory_bytes / _MIB:.1f} MiB per worker\n"
        f"# (uniform {list(report.uniform.balance)}: {report.uniform.step_time_s * 1e3:.2f} ms)\n"
        f"balance: [{', '.join(map(str, best.balance))}]\n"
        "stages: null\n"
        f"num_stages: {len(best.balance)}\n"
        f"num_microbatches: {cfg.pipeline.num_microbatches}\n"
        f"stages_per_worker: {cfg.pipeline.stages_per_worker}\n"
        f"deferred_batchnorm: {str(cfg.pipeline.deferred_batchnorm).lower()}\n"
    )


def output_path(out: str) -> tuple[Path, str]:
    """Where ``--out`` writes, and the arguments that select it in ``python -m pipetrain.train``.

    A bare name goes to ``conf/pipeline/<name>.yaml`` under the working directory; a path is used as given
    (``.yaml`` added when missing). Hydra finds it with ``--config-dir <dir above pipeline/>``.
    """
    path = Path(out)
    if len(path.parts) == 1 and path.suffix == "":
        path = Path("conf") / "pipeline" / f"{out}.yaml"
    elif path.suffix != ".yaml":
        path = path.with_suffix(".yaml")
    if path.parent.name != "pipeline":
        raise ValueError(
            f"--out: {out!r} is not in a directory named pipeline/, where Hydra looks for pipeline=NAME; "
            "give "
            "a bare name (written to conf/pipeline/NAME.yaml) or a path like my_conf/pipeline/NAME.yaml"
        )
    return path, f"--config-dir {path.parent.parent} pipeline={path.stem}"
