"""Profile a model's units and write the stage split with the lowest simulated step time.

    python -m pipetrain.balance experiment=gpt_wide_head                        # print the table
    python -m pipetrain.balance experiment=gpt_wide_head schedule=1f1b --out wide_1f1b
    python -m pipetrain.train --config-dir conf experiment=gpt_wide_head pipeline=wide_1f1b
    python -m pipetrain.balance pipeline.num_stages=4 --max-memory-mib 512     # 4 stages, a memory cap

Overrides are those of ``python -m pipetrain.train``; the number of stages is ``pipeline.num_stages``, else
that of the configured split. ``--out NAME`` writes ``conf/pipeline/NAME.yaml`` (a path ending in
``pipeline/NAME.yaml`` is written as given). Exit status 2 on a configuration error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from pipetrain.balance.plan import balance_run
from pipetrain.balance.report import format_report, output_path, pipeline_yaml
from pipetrain.compose import CONF_DIR, compose_config, to_train_config

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m pipetrain.balance", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, as for python -m pipetrain.train")
    parser.add_argument(
        "--max-memory-mib", type=float, help="memory cap per worker (autobalance.max_memory_mib)"
    )
    parser.add_argument("--out", help="write the split as a pipeline config: NAME or .../pipeline/NAME.yaml")
    parser.add_argument(
        "--config-dir", type=Path, default=CONF_DIR, help="where train.yaml and its groups are"
    )
    parser.add_argument("--config-name", default="train", help="the primary config (default: train)")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.max_memory_mib is not None:
        overrides.append(f"autobalance.max_memory_mib={args.max_memory_mib}")
    try:
        path, use = output_path(args.out) if args.out else (None, "")
        try:
            composed = compose_config(overrides, args.config_name, args.config_dir.resolve())
        except (HydraException, OmegaConfBaseException) as error:
            raise ValueError(_composition_error(str(error))) from None
        cfg = to_train_config(composed)
        report = balance_run(cfg)
    except ValueError as error:
        print(f"pipetrain: configuration error: {error}", file=sys.stderr, flush=True)
        return 2
    print(format_report(report, cfg), flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(pipeline_yaml(report, cfg, args.overrides))
        print(
            f"\nwrote {path}; train with it: python -m pipetrain.train {use} <the same overrides>", flush=True
        )
    return 0


def _composition_error(text: str) -> str:
    """Hydra's message on one line: what it could not find and the options there are."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    message = lines[0]
    if len(lines) > 1 and lines[1].startswith("Available options"):
        options = []
        for line in lines[2:]:
            if line.startswith("Config search path"):
                break
            options.append(line)
        message += f"; {lines[1].rstrip(':')}: {', '.join(options)}"
    return message


if __name__ == "__main__":
    sys.exit(main())
