"""A Hydra app on pipetrain's configs whose job with ``seed=1`` raises, for the sweep callback's tests.

The other jobs log one step (throughput ``100 * (seed + 1)``) through pipetrain's metrics logger, as a
run would, so the test sees how Hydra's basic launcher and the sweep callback treat a job that raises
instead of returning.

    python sweep_parts.py -m seed=0,1,2 hydra.sweep.dir=...
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pipetrain.compose import CONF_DIR, register_resolvers
from pipetrain.config import register_schema
from pipetrain.metrics import MetricsLogger, StepMetrics, WorkerFigures


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def _app(cfg: DictConfig) -> int:
    if cfg.seed == 1:
        raise RuntimeError("job 1 raised\nsecond line")
    speed = 100.0 * (cfg.seed + 1)
    with MetricsLogger(HydraConfig.get().runtime.output_dir) as logger:
        logger.log_step(
            StepMetrics(1, 1.0, speed, 64 / speed, 0.5, 0.2, 0.2, (WorkerFigures(1.0, 1.0, 0.0),))
        )
    return 0


if __name__ == "__main__":
    register_schema()
    register_resolvers()
    _app()
