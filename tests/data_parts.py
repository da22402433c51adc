"""User datasets for the loader tests: one that takes its time per sample, one with a broken sample, one
that crashes its process (as a broken native decoder would).

Plain user code, named in configs as ``data._target_=data_parts.<function>``.
"""

from __future__ import annotations

import ctypes
import time

import torch
from torch.utils.data import Dataset


class SlowDataset(Dataset):
    """Gaussian inputs and labels; every sample takes ``delay_s`` to read; sample ``broken`` raises;
    sample ``crash`` reads address 0, and its process dies of a segmentation fault."""

    def __init__(
        self, num_samples: int, in_features: int, num_classes: int, delay_s: float, broken: int, crash: int
    ) -> None:
        generator = torch.Generator().manual_seed(7)
        self.inputs = torch.randn(num_samples, in_features, generator=generator)
        self.labels = torch.randint(num_classes, (num_samples,), generator=generator)
        self.delay_s = delay_s
        self.broken = broken
        self.crash = crash

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        if index == self.broken:
            raise ValueError(f"cannot decode record {index}")
        if index == self.crash:
            ctypes.string_at(0)
        time.sleep(self.delay_s)
        return self.inputs[index], self.labels[index]


def slow_dataset(
    num_samples: int = 256,
    in_features: int = 32,
    num_classes: int = 10,
    delay_s: float = 0.005,
    broken: int = -1,
    crash: int = -1,
) -> Dataset:
    """A :class:`SlowDataset`."""
    return SlowDataset(num_samples, in_features, num_classes, delay_s, broken, crash)
