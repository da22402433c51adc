"""Per-micro-batch cost of F, B, I and W on one stage of the MLP and the GPT model, on this machine.

    python scripts/split_costs.py --repeats 9

Builds the second of two stages of each model (pipetrain's own build, one thread), runs a micro-batch
forward then either the full backward (``B``) or its halves (``I`` then ``W``), alternating, and prints
the median wall time of each pass. ``I + W`` next to ``B`` shows what splitting the backward costs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipetrain.build import build_stages
from pipetrain.config import TrainConfig

MODELS = {
    "mlp": (
        {
            "_target_": "pipetrain.models.mlp.mlp",
            "in_features": 512,
            "hidden": 1024,
            "depth": 4,
            "num_classes": 10,
        },
        lambda: (torch.randn(256, 512), torch.randint(0, 10, (256,))),
    ),
    "gpt": (
        {
            "_target_": "pipetrain.models.gpt.gpt",
            "vocab_size": 512,
            "seq_len": 64,
            "d_model": 256,
            "num_heads": 4,
            "num_layers": 4,
        },
        lambda: (torch.randint(0, 512, (16, 64)), torch.randint(0, 512, (16, 64))),
    ),
}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(model: str, repeats: int) -> dict[str, float]:
    """Median milliseconds of F, B, I and W on the last of two stages of ``model``."""
    spec, batch = MODELS[model]
    cfg = TrainConfig(model=dict(spec), optim={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1})
    cfg.pipeline.balance = [3, 3] if model == "mlp" else [3, 4]
    _, stages = build_stages(cfg)
    inputs, targets = batch()
    hidden = stages[0].forward(0, inputs)
    stage = stages[1]
    times: dict[str, list[float]] = {kind: [] for kind in "FBIW"}
    for mb in range(1, 2 * repeats + 1):
        times["F"].append(_timed(lambda mb=mb: stage.forward(mb, hidden, targets)))
        if mb % 2:
            times["B"].append(_timed(lambda mb=mb: stage.backward(mb)))
        else:
            times["I"].append(_timed(lambda mb=mb: stage.backward_input(mb)))
            times["W"].append(_timed(lambda mb=mb: stage.backward_weight(mb)))
    return {kind: statistics.median(values) * 1e3 for kind, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for model in MODELS:
        ms = measure(model, args.repeats)
        print(
            f"{model}: F {ms['F']:.2f} ms  B {ms['B']:.2f} ms  I {ms['I']:.2f} ms  W {ms['W']:.2f} ms  "
            f"I+W {ms['I'] + ms['W']:.2f} ms ({(ms['I'] + ms['W']) / ms['B']:.2f} x B)"
        )


if __name__ == "__main__":
    main()
