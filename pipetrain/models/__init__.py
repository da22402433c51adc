"""Built-in models and the unit decomposition used to split models into pipeline stages."""

from __future__ import annotations

from pipetrain.models.gpt import gpt
from pipetrain.models.mlp import mlp
from pipetrain.models.resnet import resnet18, resnet50
from pipetrain.models.units import model_units, run_units

__all__ = ["BUILTIN_MODELS", "gpt", "mlp", "model_units", "resnet18", "resnet50", "run_units"]

#: Built-in model names mapped to the dotted import path of their builder (usable as a Hydra ``_target_``).
BUILTIN_MODELS: dict[str, str] = {
    "mlp": "pipetrain.models.mlp.mlp",
    "gpt": "pipetrain.models.gpt.gpt",
    "resnet18": "pipetrain.models.resnet.resnet18",
    "resnet50": "pipetrain.models.resnet.resnet50",
}
