"""Datasets (map-style, ``(input, target)`` pairs) and the deterministic batch order of a run.

Built-in datasets are named in ``conf/data/``; any callable returning a ``torch.utils.data.Dataset`` can
be plugged in with ``data._target_``. :class:`BatchOrder` makes the batch of every step a pure function of
``(seed, step)``, so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

__all__ = [
    "synthetic_classification",
    "synthetic_tokens",
    "synthetic_images",
    "cifar10",
    "imagefolder",
    "BatchOrder",
]


def synthetic_classification(
    num_samples: int = 4096, in_features: int = 32, num_classes: int = 10, seed: int = 1234
) -> Dataset:
    """Gaussian inputs labelled by a fixed random linear teacher (argmax of a random projection)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, in_features, generator=generator)
    labels = (inputs @ torch.randn(in_features, num_classes, generator=generator)).argmax(dim=1)
    return TensorDataset(inputs, labels)


def synthetic_tokens(
    num_samples: int = 2048, seq_len: int = 32, vocab_size: int = 256, seed: int = 1234
) -> Dataset:
    """Token sequences drawn from a fixed sparse random bigram table; targets are the next tokens."""
    generator = torch.Generator().manual_seed(seed)
    successors = torch.randint(vocab_size, (vocab_size, 4), generator=generator)
    tokens = torch.empty(num_samples, seq_len + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab_size, (num_samples,), generator=generator)
    for position in range(seq_len):
        choice = torch.randint(4, (num_samples,), generator=generator)
        tokens[:, position + 1] = successors[tokens[:, position], choice]
    return TensorDataset(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())


def synthetic_images(
    num_samples: int = 1024, image_size: int = 32, num_classes: int = 10, seed: int = 1234
) -> Dataset:
    """Noisy 3-channel images whose per-channel mean depends on the class."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (num_samples,), generator=generator)
    class_means = torch.randn(num_classes, 3, 1, 1, generator=generator)
    images = class_means[labels] + torch.randn(num_samples, 3, image_size, image_size, generator=generator)
    return TensorDataset(images, labels)


def _existing_root(root: str | None, hint: str) -> Path:
    if root in (None, "", "???"):
        raise ValueError(f"data.root: not set; {hint}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise ValueError(f"data.root: {str(path)!r} is not a directory; {hint}")
    return path


def cifar10(root: str, download: bool = False, train: bool = True) -> Dataset:
    """CIFAR-10 from torchvision, as normalised tensors."""
    from torchvision import datasets, transforms

    if not download:
        _existing_root(root, "point it at a CIFAR-10 folder, or add data.download=true")
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))]
    )
    return datasets.CIFAR10(root=root, train=train, download=download, transform=transform)


def imagefolder(root: str, image_size: int = 224) -> Dataset:
    """A torchvision ``ImageFolder`` (``root/<class>/<image>``) resized to ``image_size``."""
    from torchvision import datasets, transforms

    path = _existing_root(root, "point it at a folder of class sub-folders (root/<class>/<image>)")
    transform = transforms.Compose(
        [transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor()]
    )
    return datasets.ImageFolder(str(path), transform=transform)


class BatchOrder:
    """The batch of every step: a seeded permutation per epoch, incomplete last batch dropped."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        if self.num_samples < batch_size:
            raise ValueError(
                f"train.batch_size: {batch_size} is larger than the dataset ({self.num_samples} samples); "
                "lower train.batch_size or use more data"
            )
        self.batches_per_epoch = self.num_samples // batch_size
        self._epoch = -1
        self._permutation = torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> torch.Tensor:
        """Dataset indices of the batch of ``step`` (0-based)."""
        epoch, position = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutation = torch.randperm(self.num_samples, generator=generator)
            self._epoch = epoch
        start = position * self.batch_size
        return self._permutation[start : start + self.batch_size]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The collated ``(inputs, targets)`` of ``step``."""
        indices = self.indices(step)
        if isinstance(self.dataset, TensorDataset):  # one gather per tensor instead of a sample at a time
            return tuple(tensor[indices] for tensor in self.dataset.tensors)
        return default_collate([self.dataset[int(i)] for i in indices])
