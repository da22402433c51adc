"""The driver's batches: a ``DataLoader`` that prepares the next steps' batches while the pipeline runs.

The batch of every step is still :class:`~pipetrain.data.BatchOrder`'s (a function of the seed and the
step), so resumed runs see the same data; the loader only moves the work of reading and collating into
``loader.num_workers`` processes, ``loader.prefetch_factor`` batches ahead each, with pinned memory when a
stage runs on CUDA. The driver measures how long it waits for each batch (``perf/data_time_s``).

A sample that fails to load stops the run with one line naming the sample and the step
(:class:`DataError`), and the loader's traceback once.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset, default_collate

from pipetrain.config import LoaderConfig
from pipetrain.data import BatchOrder
from pipetrain.process_ties import detach_loader_process

__all__ = ["DataError", "step_batches"]

_SUMMARY = re.compile(r"data: sample \d+ .*")


class DataError(RuntimeError):
    """A sample of the dataset failed to load; the message's first line names it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        found = _SUMMARY.search(message)
        self.summary = found.group(0) if found else message.splitlines()[0]
        """One line: the sample, the step, the error."""
        self.details = message if found and found.group(0) != message else ""
        """The loader process's traceback, when it came from one."""
        self.step: int | None = None
        """The (1-based) training step whose batch failed, when the driver knows it."""


class _StepSampler(Sampler):
    """Yields ``(step, indices)`` of the batches of steps ``start .. stop - 1``."""

    def __init__(self, batches: BatchOrder, start: int, stop: int) -> None:
        self._batches = batches
        self._start = start
        self._stop = stop

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        for step in range(self._start, self._stop):
            yield step, self._batches.indices(step)

    def __len__(self) -> int:
        return max(self._stop - self._start, 0)


class _BatchGather(Dataset):
    """Reads and collates a whole batch for one ``(step, indices)`` key."""

    def __init__(self, dataset: Dataset) -> None:
        self._dataset = dataset

    def __getitem__(self, key: tuple[int, torch.Tensor]) -> Any:
        step, indices = key
        if isinstance(self._dataset, TensorDataset):  # one gather per tensor, not a sample at a time
            return tuple(tensor[indices] for tensor in self._dataset.tensors)
        samples = []
        for index in indices.tolist():
            try:
                samples.append(self._dataset[index])
            except Exception as error:
                text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
                raise DataError(
                    f"data: sample {index} (batch of step {step + 1}) failed to load: "
                    f"{type(error).__name__}: {error}\n{text}"
                ) from error
        return default_collate(samples)


def step_batches(
    batches: BatchOrder,
    start_step: int,
    stop_step: int,
    settings: LoaderConfig,
    pin_memory: bool = False,
    detach_processes: bool = False,
) -> Iterator[Any]:
    """The collated batches of steps ``start_step .. stop_step - 1``, in order, loaded ahead.

    With ``detach_processes`` (the driver of a run, loading on its main thread), the loader processes
    leave the caller's process group and die with it (:func:`~pipetrain.process_ties.detach_loader_process`).
    """
    workers = settings.num_workers
    loader = DataLoader(
        _BatchGather(batches.dataset),
        sampler=_StepSampler(batches, start_step, stop_step),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=settings.prefetch_factor if workers > 0 else None,
        pin_memory=pin_memory,
        worker_init_fn=detach_loader_process if workers > 0 and detach_processes else None,
    )
    return iter(loader)
