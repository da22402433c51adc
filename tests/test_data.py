"""The batch order: deterministic per step, a fresh permutation per epoch, the same batches on every path."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset

from pipetrain.data import BatchOrder


class _SampleBySample(Dataset):
    """The same samples as a TensorDataset, served one at a time through ``__getitem__``."""

    def __init__(self, tensors: TensorDataset) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, index: int):
        return self.tensors[index]


def _dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(40, 3, generator=generator), torch.randint(0, 5, (40,), generator=generator)
    )


def test_tensor_datasets_gather_the_same_batches_as_sample_by_sample_collation():
    dataset = _dataset()
    fast, generic = BatchOrder(dataset, 8, seed=3), BatchOrder(_SampleBySample(dataset), 8, seed=3)
    for step in range(12):  # more than one epoch
        for ours, reference in zip(fast.batch(step), generic.batch(step), strict=True):
            assert torch.equal(ours, reference)


def test_each_step_has_its_own_batch_and_each_epoch_its_own_order():
    order = BatchOrder(_dataset(), 8, seed=3)
    epoch_0 = torch.cat([order.indices(step) for step in range(5)])
    epoch_1 = torch.cat([order.indices(step) for step in range(5, 10)])
    assert sorted(epoch_0.tolist()) == list(range(40)) == sorted(epoch_1.tolist())
    assert not torch.equal(epoch_0, epoch_1)
    assert torch.equal(BatchOrder(_dataset(), 8, seed=3).indices(7), order.indices(7))
