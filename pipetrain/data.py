"""Datasets (map-style, ``(input, target)`` pairs) and the deterministic batch order of a run.

Built-in datasets are named in ``conf/data/``; any callable returning a ``torch.utils.data.Dataset`` can
be plugged in with ``data._target_``. :class:`BatchOrder` makes the batch of every step a pure function of
``(seed, step)``, so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Mapping
from http.client import HTTPException
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch
from torch.utils.data import Dataset, Subset, TensorDataset, default_collate

__all__ = [
    "synthetic_classification",
    "digits",
    "synthetic_tokens",
    "synthetic_images",
    "cifar10",
    "imagefolder",
    "check_num_classes",
    "hold_out",
    "EvalBatches",
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


def digits() -> Dataset:
    """scikit-learn's bundled handwritten digits: 1,797 8x8 images as 64 features scaled to [0, 1], 10
    classes. Needs the ``digits`` extra (``pip install 'pipetrain[digits]'``)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ValueError(
            "data=digits: needs scikit-learn, which is not installed; install the extra with "
            "pip install 'pipetrain[digits]' (or pip install scikit-learn)"
        ) from error
    bunch = load_digits()
    inputs = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    return TensorDataset(inputs, torch.tensor(bunch.target, dtype=torch.long))


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


_CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR10_URL = f"https://www.cs.toronto.edu/~kriz/{_CIFAR10_ARCHIVE}"
_NETWORK_ERRORS = (URLError, ConnectionError, TimeoutError, HTTPException)


def _first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _root_is_set(root: str | None, hint: str) -> Path:
    """``root`` as a path; ``ValueError`` naming ``data.root`` when it is not set."""
    if root in (None, "", "???"):
        raise ValueError(f"data.root: not set; {hint}")
    return Path(root).expanduser()


def _existing_root(root: str | None, hint: str) -> Path:
    """``root`` as an existing directory; ``ValueError`` naming ``data.root`` otherwise."""
    path = _root_is_set(root, hint)
    if not path.is_dir():
        raise ValueError(f"data.root: {str(path)!r} is not a directory; {hint}")
    return path


def _check_cifar10_root(path: Path) -> None:
    """Refuse a ``data.root`` without the ``cifar-10-batches-py/`` folder torchvision reads."""
    if (path / _CIFAR10_FOLDER).is_dir():
        return
    fix = (
        f"point data.root at the folder that holds {_CIFAR10_FOLDER}/ (the unpacked {_CIFAR10_ARCHIVE}), "
        "or add data.download=true to fetch it there"
    )
    if path.name == _CIFAR10_FOLDER or (path / "data_batch_1").exists():
        raise ValueError(
            f"data.root: {str(path)!r} is the {_CIFAR10_FOLDER} folder itself; set data.root to its parent "
            f"{str(path.parent)!r}"
        )
    if not any(path.iterdir()):
        raise ValueError(f"data.root: {str(path)!r} is empty; {fix}")
    if (path / _CIFAR10_ARCHIVE).is_file():
        raise ValueError(
            f"data.root: {str(path)!r} holds {_CIFAR10_ARCHIVE} but not {_CIFAR10_FOLDER}/; unpack it there "
            f"(tar xzf {_CIFAR10_ARCHIVE}) or add data.download=true, which unpacks it"
        )
    raise ValueError(f"data.root: {str(path)!r} has no {_CIFAR10_FOLDER}/ folder; {fix}")


def _damaged_cifar10_files(dataset_class, path: Path) -> list[str]:
    """The CIFAR-10 files under ``path`` that are missing or fail torchvision's checksum."""
    from torchvision.datasets.utils import check_integrity

    expected = [*dataset_class.train_list, *dataset_class.test_list]
    expected.append([dataset_class.meta["filename"], dataset_class.meta["md5"]])
    return [name for name, md5 in expected if not check_integrity(str(path / _CIFAR10_FOLDER / name), md5)]


def _cifar10_download_failed(path: Path, error: BaseException) -> ValueError:
    """The error for a failed ``data.download=true``: what failed, and how to get the data there."""
    network = isinstance(error, _NETWORK_ERRORS)
    return ValueError(
        f"data.download: downloading CIFAR-10 into {str(path)!r} failed ({_first_line(error)}"
        f"{'; no network?' if network else ''}); download {_CIFAR10_URL} on a machine that can, unpack it "
        f"(tar xzf {_CIFAR10_ARCHIVE}) and set data.root to the folder holding {_CIFAR10_FOLDER}/, "
        "with data.download=false"
    )


def _cifar10_transform():
    """CIFAR-10 images as tensors normalised with the training set's per-channel mean and std."""
    from torchvision import transforms

    return transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))]
    )


def cifar10(root: str, download: bool = False, train: bool = True) -> Dataset:
    """CIFAR-10 from torchvision (``root/cifar-10-batches-py/``), as normalised tensors.

    ``download=True`` fetches it into ``root`` first unless it is already there. Every failure is a
    ``ValueError`` naming ``data.root`` or ``data.download`` and the fix.
    """
    from torchvision import datasets

    if download:
        path = _root_is_set(root, "set it to the folder to download CIFAR-10 into")
    else:
        path = _existing_root(
            root, f"point it at the folder that holds {_CIFAR10_FOLDER}/, or add data.download=true"
        )
    if download and path.exists() and not path.is_dir():
        raise ValueError(f"data.root: {str(path)!r} is a file; set data.root to a folder to download into")
    if not download:
        _check_cifar10_root(path)
    try:
        dataset = datasets.CIFAR10(
            root=str(path), train=train, download=download, transform=_cifar10_transform()
        )
    except (OSError, RuntimeError, HTTPException) as error:
        if download:
            raise _cifar10_download_failed(path, error) from None
        raise _cifar10_damaged(datasets.CIFAR10, path, error) from None
    return dataset


def _cifar10_damaged(dataset_class, path: Path, error: BaseException) -> ValueError:
    """The error for a ``cifar-10-batches-py/`` folder torchvision refuses: which files, and the fix."""
    damaged = ", ".join(_damaged_cifar10_files(dataset_class, path)) or _first_line(error)
    return ValueError(
        f"data.root: {str(path / _CIFAR10_FOLDER)!r} is incomplete or damaged (missing or failing "
        f"torchvision's checksum: {damaged}); unpack {_CIFAR10_ARCHIVE} there again, or add "
        "data.download=true to fetch it"
    )


def _class_folders(path: Path) -> list[str]:
    """The sub-folder names of ``path`` (the classes of an image folder), sorted; hidden ones skipped."""
    return sorted(entry.name for entry in path.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def imagefolder(root: str, image_size: int = 224) -> Dataset:
    """A torchvision ``ImageFolder`` (``root/<class>/<image>``) resized to ``image_size``."""
    from torchvision import datasets, transforms

    hint = "point it at a folder of class sub-folders (root/<class>/<image>)"
    path = _existing_root(root, hint)
    if not _class_folders(path):
        state = "is empty" if not any(path.iterdir()) else "has no class sub-folders"
        raise ValueError(f"data.root: {str(path)!r} {state}; {hint}")
    transform = transforms.Compose(
        [transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor()]
    )
    try:
        return datasets.ImageFolder(str(path), transform=transform)
    except FileNotFoundError as error:  # class folders without a single image
        raise ValueError(f"data.root: {str(path)!r}: {_first_line(error)}; {hint}") from None


def check_num_classes(dataset: Dataset, model_spec: Mapping[str, Any], data_spec: Mapping[str, Any]) -> None:
    """Refuse a model whose ``num_classes`` differs from the dataset's class count.

    Applies to datasets that list their classes (``dataset.classes``: torchvision's ``ImageFolder``,
    ``CIFAR10``, ...) and models configured with ``num_classes``; others pass unchecked.
    """
    classes = getattr(dataset, "classes", None)
    num_classes = model_spec.get("num_classes")
    if classes is None or not isinstance(num_classes, int) or num_classes == len(classes):
        return
    shown = ", ".join(map(str, classes[:5])) + (", ..." if len(classes) > 5 else "")
    root = data_spec.get("root")
    source = f"data.root={root!r}" if root else f"data ({data_spec.get('_target_')})"
    raise ValueError(
        f"model.num_classes: the model has {num_classes} classes but {source} has {len(classes)} classes "
        f"({shown}); set model.num_classes={len(classes)}"
    )


def hold_out(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """``(train, eval)``: a seeded random ``fraction`` of ``dataset`` held out for evaluation."""
    num_samples = len(dataset)  # type: ignore[arg-type]
    num_eval = round(num_samples * fraction)
    if not 0 < num_eval < num_samples:
        raise ValueError(
            f"data.eval_split: {fraction} of {num_samples} samples leaves no evaluation or no training "
            "samples; choose a fraction between 0 and 1 that keeps both"
        )
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, order[num_eval:]), Subset(dataset, order[:num_eval])


class EvalBatches:
    """The batches of an evaluation pass: consecutive ``batch_size`` samples in dataset order, the same
    every pass; ``num_batches`` of them (``0``: every full batch)."""

    def __init__(self, dataset: Dataset, batch_size: int, num_batches: int = 0) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        num_samples = len(dataset)  # type: ignore[arg-type]
        available = num_samples // batch_size
        if available == 0:
            raise ValueError(
                f"eval_data / data.eval_split: the evaluation set has {num_samples} samples, fewer than "
                f"train.batch_size={batch_size}; hold out more data or lower train.batch_size"
            )
        if num_batches > available:
            raise ValueError(
                f"eval.batches: {num_batches} batches of {batch_size} need {num_batches * batch_size} "
                f"samples, the evaluation set has {num_samples}; lower eval.batches (0: all {available})"
            )
        self.num_batches = num_batches or available

    def __len__(self) -> int:
        return self.num_batches

    def batch(self, index: int) -> tuple[Any, Any]:
        """The collated ``(inputs, targets)`` of batch ``index``."""
        start = index * self.batch_size
        return default_collate([self.dataset[i] for i in range(start, start + self.batch_size)])


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
