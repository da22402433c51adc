"""The torchvision datasets (cifar10, imagefolder) on small generated folders, and their one-line errors."""

from __future__ import annotations

import hashlib
import pickle
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_config
from PIL import Image
from torchvision import datasets

from pipetrain.data import check_num_classes, cifar10, imagefolder
from pipetrain.preflight import preflight

_CIFAR10_LABELS = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
]  # fmt: skip
_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2470, 0.2435, 0.2616)


# --- generated folders ------------------------------------------------------------------------------


def _write_pickle(path: Path, content: dict) -> str:
    """Pickle ``content`` to ``path``; return the file's md5."""
    path.write_bytes(pickle.dumps(content))
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_fake_cifar10(root: Path, per_batch: int = 3) -> dict[str, str]:
    """A CIFAR-10 folder in torchvision's format (``cifar-10-batches-py/``: five training batches, a
    test batch, ``batches.meta``) with ``per_batch`` random images each; returns each file's md5.

    Sample ``k`` of a batch has label ``k % 10``.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    md5s = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "batch_label": name,
            "data": rng.integers(0, 256, size=(per_batch, 3 * 32 * 32), dtype=np.uint8),
            "labels": [k % 10 for k in range(per_batch)],
        }
        md5s[name] = _write_pickle(folder / name, batch)
    md5s["batches.meta"] = _write_pickle(folder / "batches.meta", {"label_names": _CIFAR10_LABELS})
    return md5s


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch) -> Path:
    """A generated CIFAR-10 folder that torchvision loads.

    torchvision checks every file against the real CIFAR-10's md5 on each load (not only when
    downloading), so generated files pass only with their own checksums in place of the real ones:
    the checksums are the one thing swapped here; the files are read by torchvision's own code.
    """
    root = tmp_path / "cifar"
    md5s = _write_fake_cifar10(root)
    cls = datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[name, md5s[name]] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, md5s[name]] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5s["batches.meta"]})
    return root


def _write_image_folder(root: Path, classes: list[str], per_class: int = 2, size: int = 8) -> Path:
    """``root/<class>/<k>.png``: ``per_class`` small solid-colour PNGs per class."""
    for class_idx, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            colour = (40 * class_idx, 20 * k, 255 - 40 * class_idx)
            Image.new("RGB", (size, size), colour).save(root / name / f"{k}.png")
    return root


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


# --- cifar10 ----------------------------------------------------------------------------------------


def test_cifar10_loads_a_folder_in_torchvision_format(fake_cifar10):
    train = cifar10(str(fake_cifar10))
    assert len(train) == 5 * 3
    assert train.classes == _CIFAR10_LABELS
    image, label = train[4]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label == 1  # sample 4: the second batch's second sample
    raw = torch.from_numpy(train.data[4]).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(_CIFAR10_MEAN)[:, None, None], torch.tensor(_CIFAR10_STD)[:, None, None]
    torch.testing.assert_close(image, (raw - mean) / std)
    test = cifar10(str(fake_cifar10), train=False)
    assert len(test) == 3 and [test[k][1] for k in range(3)] == [0, 1, 2]


def test_cifar10_with_download_uses_a_folder_already_there(fake_cifar10):
    """data.download=true downloads nothing when the files are there and intact."""
    assert len(cifar10(str(fake_cifar10), download=True)) == 15


def test_cifar10_files_failing_torchvision_checksums(tmp_path):
    """Without the real files' checksums the generated folder is refused, naming the files."""
    _write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ValueError) as error:
        cifar10(str(tmp_path))
    assert _one_line(error) == (
        f"data.root: '{tmp_path}/cifar-10-batches-py' is incomplete or damaged (missing or failing "
        "torchvision's checksum: data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, "
        "test_batch, batches.meta); unpack cifar-10-python.tar.gz there again, or add data.download=true "
        "to fetch it"
    )


def test_cifar10_empty_root(tmp_path):
    with pytest.raises(ValueError) as error:
        cifar10(str(tmp_path))
    assert _one_line(error) == (
        f"data.root: '{tmp_path}' is empty; point data.root at the folder that holds cifar-10-batches-py/ "
        "(the unpacked cifar-10-python.tar.gz), or add data.download=true to fetch it there"
    )


@pytest.mark.parametrize(
    "layout,message",
    [
        (["notes.txt"], r"data.root: '.*' has no cifar-10-batches-py/ folder; point data.root at the folder"),
        (
            ["cifar-10-python.tar.gz"],
            r"data.root: '.*' holds cifar-10-python.tar.gz but not cifar-10-batches-py/; unpack it there "
            r"\(tar xzf cifar-10-python.tar.gz\) or add data.download=true, which unpacks it",
        ),
        (["data_batch_1", "test_batch"], r"data.root: '.*' is the cifar-10-batches-py folder itself; set "),
    ],
)
def test_cifar10_root_without_the_dataset(tmp_path, layout, message):
    for name in layout:
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(ValueError, match=message):
        cifar10(str(tmp_path))


def test_cifar10_root_not_set_or_missing(tmp_path):
    with pytest.raises(ValueError, match=r"data.root: not set; point it at the folder that holds"):
        cifar10("???")
    with pytest.raises(
        ValueError, match=r"data.root: not set; set it to the folder to download CIFAR-10 into"
    ):
        cifar10("", download=True)
    with pytest.raises(ValueError, match=r"data.root: '.*/nope' is not a directory"):
        cifar10(str(tmp_path / "nope"))


def _closed_port() -> int:
    """A local TCP port nothing listens on (connections to it are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
def test_cifar10_download_without_network(tmp_path, monkeypatch):
    """A real download attempt through torchvision and urllib, with the network out of reach: every
    request goes to a proxy on a closed local port (so no machine downloads 170 MB here)."""
    proxy = f"http://127.0.0.1:{_closed_port()}"
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen builds its opener from these variables
    root = tmp_path / "downloads"
    started = time.monotonic()
    with pytest.raises(ValueError) as error:
        cifar10(str(root), download=True)
    assert time.monotonic() - started < 30
    message = _one_line(error)
    assert message.startswith(f"data.download: downloading CIFAR-10 into '{root}' failed (")
    assert message.endswith(
        "; no network?); download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz on a machine "
        "that can, unpack it (tar xzf cifar-10-python.tar.gz) and set data.root to the folder holding "
        "cifar-10-batches-py/, with data.download=false"
    )


def test_cifar10_download_into_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"data.root: '.*/file' is a file; set data.root to a folder"):
        cifar10(str(tmp_path / "file"), download=True)


# --- imagefolder ------------------------------------------------------------------------------------


def test_imagefolder_loads_class_folders(tmp_path):
    _write_image_folder(tmp_path, ["cat", "dog", "fish"])
    dataset = imagefolder(str(tmp_path), image_size=16)
    assert dataset.classes == ["cat", "dog", "fish"]
    assert len(dataset) == 6
    assert [dataset[k][1] for k in range(6)] == [0, 0, 1, 1, 2, 2]
    image, _ = dataset[2]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    expected = torch.tensor([40, 0, 215], dtype=torch.float32)[:, None, None] / 255  # dog, image 0
    torch.testing.assert_close(image, expected.expand(3, 16, 16))


def test_imagefolder_empty_root(tmp_path):
    with pytest.raises(ValueError) as error:
        imagefolder(str(tmp_path))
    assert _one_line(error) == (
        f"data.root: '{tmp_path}' is empty; point it at a folder of class sub-folders (root/<class>/<image>)"
    )


def test_imagefolder_root_of_images_without_class_folders(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "0.png")
    with pytest.raises(ValueError, match=r"data.root: '.*' has no class sub-folders; point it at a folder"):
        imagefolder(str(tmp_path))


def test_imagefolder_class_folders_without_images(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.txt").write_text("x")
    with pytest.raises(ValueError) as error:
        imagefolder(str(tmp_path))
    message = _one_line(error)
    assert message.startswith(f"data.root: '{tmp_path}': Found no valid file for the classes cat, dog.")
    assert message.endswith("; point it at a folder of class sub-folders (root/<class>/<image>)")


# --- class count against model.num_classes ----------------------------------------------------------


def _imagefolder_config(root: Path, num_classes: int):
    """ResNet-18 with ``num_classes`` outputs on 16x16 images from ``root``, in two stages."""
    cfg = make_config("mlp", 2, batch_size=4, num_microbatches=2)
    cfg.model = {"_target_": "pipetrain.models.resnet.resnet18", "num_classes": num_classes}
    cfg.data = {"_target_": "pipetrain.data.imagefolder", "root": str(root), "image_size": 16}
    cfg.pipeline.balance = [6, 5]
    return cfg


def test_preflight_refuses_a_class_count_other_than_the_models(tmp_path):
    _write_image_folder(tmp_path, ["cat", "dog", "fish"])
    with pytest.raises(ValueError) as error:
        preflight(_imagefolder_config(tmp_path, num_classes=5))
    assert _one_line(error) == (
        f"model.num_classes: the model has 5 classes but data.root='{tmp_path}' has 3 classes "
        "(cat, dog, fish); set model.num_classes=3"
    )


def test_preflight_accepts_a_matching_class_count(tmp_path):
    _write_image_folder(tmp_path, ["cat", "dog", "fish"])
    assert preflight(_imagefolder_config(tmp_path, num_classes=3)).num_stages == 2


def test_check_num_classes_on_cifar10_and_datasets_without_classes(fake_cifar10):
    dataset = cifar10(str(fake_cifar10))
    data_spec = {"_target_": "pipetrain.data.cifar10", "root": str(fake_cifar10)}
    check_num_classes(dataset, {"num_classes": 10}, data_spec)
    with pytest.raises(ValueError, match=r"has 10 classes \(airplane, automobile, bird, cat, deer, \.\.\.\); "
                       r"set model.num_classes=10"):  # fmt: skip
        check_num_classes(dataset, {"num_classes": 100}, data_spec)
    check_num_classes(dataset, {"_target_": "my_pkg.make_model"}, data_spec)  # no num_classes: unchecked
    tensors = torch.utils.data.TensorDataset(torch.zeros(4, 2), torch.zeros(4))
    check_num_classes(tensors, {"num_classes": 7}, {"_target_": "my_pkg.make_data"})  # no classes: unchecked
