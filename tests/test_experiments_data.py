"""Loaders on files in the real on-disk formats, through the real torchvision classes."""

import gzip
import hashlib
import math
import pickle
import struct

import numpy as np
import pytest
import torch
from torchvision import datasets

from rollingball.experiments.data import (
    AugmentedImages,
    DataNotFoundError,
    load_data,
    make_loader,
    num_batches,
)


def _write_idx(path, array, compress):
    array = np.asarray(array, dtype=np.uint8)
    magic = 0x0800 | array.ndim  # unsigned byte, number of dimensions
    payload = (
        struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(f"{path}.gz", "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def _mnist_files(root, folder, n_train=12, n_test=5, compress=False):
    rng = np.random.default_rng(0)
    raw = root / folder / "raw"
    images = {
        s: rng.integers(0, 256, (n, 28, 28)) for s, n in (("train", n_train), ("t10k", n_test))
    }
    labels = {s: np.arange(len(images[s])) % 10 for s in images}
    for split in ("train", "t10k"):
        _write_idx(raw / f"{split}-images-idx3-ubyte", images[split], compress)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", labels[split], compress)
    return images, labels


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize(
    "name, folder, mean, std",
    [("mnist", "MNIST", 0.1307, 0.3081), ("fashion_mnist", "FashionMNIST", 0.2860, 0.3530)],
)
def test_mnist_idx_files(tmp_path, compress, name, folder, mean, std):
    images, labels = _mnist_files(tmp_path, folder, compress=compress)
    bundle = load_data(name, tmp_path)
    assert bundle.input_shape == (1, 28, 28) and bundle.num_classes == 10
    assert len(bundle.train) == 12 and len(bundle.test) == 5
    x, y = bundle.train[[0, 3]]
    expected = (torch.tensor(images["train"][[0, 3]], dtype=torch.float32) / 255 - mean) / std
    torch.testing.assert_close(x[:, 0], expected)
    assert y.tolist() == [0, 3]
    assert bundle.test[4][1].item() == labels["t10k"][4]
    # the same numbers as torchvision's own reader gives
    reference = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    assert torch.equal(
        reference(str(tmp_path), train=False).data, torch.tensor(images["t10k"], dtype=torch.uint8)
    )


def _cifar_files(root, hundred, n_per_batch=4):
    rng = np.random.default_rng(1)
    cls = datasets.CIFAR100 if hundred else datasets.CIFAR10
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    key = "fine_labels" if hundred else "labels"
    written = {}
    for name, _ in cls.train_list + cls.test_list:
        data = rng.integers(0, 256, (n_per_batch, 3 * 32 * 32), dtype=np.uint8)
        targets = list(range(n_per_batch))
        (folder / name).write_bytes(pickle.dumps({"data": data, key: targets}))
        written[name] = data
    meta = {cls.meta["key"]: [f"class{i}" for i in range(100 if hundred else 10)]}
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps(meta))
    return cls, folder, written


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("hundred", [False, True], ids=["cifar10", "cifar100"])
def test_cifar_pickle_batches(tmp_path, monkeypatch, hundred):
    cls, folder, written = _cifar_files(tmp_path, hundred)
    # torchvision verifies the md5 of every file: register the fixture files' checksums
    monkeypatch.setattr(cls, "train_list", [[n, _md5(folder / n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, _md5(folder / n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})
    name = "cifar100" if hundred else "cifar10"
    bundle = load_data(name, tmp_path, normalize=False)
    n_train = 4 * len(cls.train_list)
    assert len(bundle.train) == n_train and len(bundle.test) == 4
    assert bundle.input_shape == (3, 32, 32) and bundle.num_classes == (100 if hundred else 10)
    first = cls.train_list[0][0]
    x, y = bundle.train[[1]]
    expected = torch.tensor(written[first][1].reshape(3, 32, 32), dtype=torch.float32) / 255
    torch.testing.assert_close(x[0], expected)
    assert y.item() == 1
    normalized = load_data(name, tmp_path)
    mean = torch.tensor([0.5071, 0.4865, 0.4409] if hundred else [0.4914, 0.4822, 0.4465]).view(
        3, 1, 1
    )
    std = torch.tensor([0.2673, 0.2564, 0.2762] if hundred else [0.2470, 0.2435, 0.2616]).view(
        3, 1, 1
    )
    torch.testing.assert_close(normalized.train[[1]][0][0], (expected - mean) / std)
    augmented = load_data(name, tmp_path, augment=True)
    assert isinstance(augmented.train, AugmentedImages)


def test_missing_data_says_where_it_looked_and_how_to_fix_it(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_data("cifar10", tmp_path / "nowhere")
    message = str(info.value)
    assert str((tmp_path / "nowhere").resolve()) in message
    assert "cifar-10-batches-py" in message and "--data-dir" in message and "--download" in message
    assert not (tmp_path / "nowhere").exists() or not any((tmp_path / "nowhere").iterdir())
    with pytest.raises(DataNotFoundError, match="MNIST/raw"):
        load_data("mnist", tmp_path)


def test_unknown_dataset_and_bad_options():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_data("imagenet")
    with pytest.raises(ValueError, match="val_fraction"):
        load_data("digits", val_fraction=1.5)
    with pytest.raises(ValueError, match="CIFAR"):
        load_data("digits", augment=True)


def test_digits_split_and_validation_split():
    bundle = load_data("digits")
    assert len(bundle.train) == 1437 and len(bundle.test) == 360
    assert bundle.input_shape == (1, 8, 8)
    x, _ = bundle.train[list(range(len(bundle.train)))]
    assert x.min().item() >= 0.0 and x.max().item() == 1.0
    split = load_data("digits", val_fraction=0.1, seed=3)
    assert len(split.val) == 144 and len(split.train) == 1437 - 144
    again = load_data("digits", val_fraction=0.1, seed=3)
    assert torch.equal(split.val[list(range(144))][0], again.val[list(range(144))][0])
    other = load_data("digits", val_fraction=0.1, seed=4)
    assert not torch.equal(split.val[list(range(144))][0], other.val[list(range(144))][0])


def test_mnist1d_is_generated_once_and_cached(tmp_path):
    bundle = load_data("mnist1d", tmp_path)
    assert len(bundle.train) == 4000 and len(bundle.test) == 1000
    assert bundle.input_shape == (40,) and bundle.num_classes == 10
    cache = tmp_path / "mnist1d" / "mnist1d_default_seed42.npz"
    assert cache.exists()
    state = np.random.get_state()[1].copy()
    again = load_data("mnist1d", tmp_path)
    x1, y1 = bundle.train[list(range(50))]
    x2, y2 = again.train[list(range(50))]
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert np.array_equal(state, np.random.get_state()[1])
    counts = torch.bincount(bundle.train[list(range(4000))][1], minlength=10)
    assert counts.sum().item() == 4000 and counts.min().item() > 300


def test_loader_order_depends_on_seed_and_epoch_only():
    bundle = load_data("digits")

    def order(seed, epoch, start=0):
        return torch.cat(
            [
                y
                for _, y in make_loader(
                    bundle.train, 100, shuffle=True, seed=seed, epoch=epoch, start_batch=start
                )
            ]
        )

    assert torch.equal(order(0, 1), order(0, 1))
    assert not torch.equal(order(0, 1), order(0, 2))
    assert not torch.equal(order(0, 1), order(1, 1))
    assert torch.equal(order(0, 1, start=3), order(0, 1)[300:])
    assert num_batches(bundle.train, 100) == 15 and len(order(0, 0)) == 1437
    sequential = torch.cat([y for _, y in make_loader(bundle.test, 100, shuffle=False)])
    assert torch.equal(sequential, bundle.test[list(range(360))][1])


def test_augmentation_crops_and_flips_deterministically():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    data = AugmentedImages(images, torch.tensor([0, 1]), padding=2)
    torch.manual_seed(0)
    a, _ = data[[0, 1]]
    torch.manual_seed(0)
    b, _ = data[[0, 1]]
    assert torch.equal(a, b) and a.shape == images.shape
    # every output pixel is either padding (0) or an input pixel of the same image and channel
    for i in range(2):
        for c in range(3):
            values = set(a[i, c].flatten().tolist()) - {0.0}
            assert values <= set(images[i, c].flatten().tolist())


def test_a_cifar_run_with_augmentation_batchnorm_and_rbo(tmp_path, monkeypatch):
    from rollingball.experiments.config import config_from_dict
    from rollingball.experiments.runner import run

    cls, folder, _ = _cifar_files(tmp_path / "data", hundred=False)
    monkeypatch.setattr(cls, "train_list", [[n, _md5(folder / n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, _md5(folder / n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})
    config = config_from_dict(
        {
            "data": {
                "name": "cifar10",
                "data_dir": str(tmp_path / "data"),
                "batch_size": 10,
                "augment": True,
            },
            "model": {"name": "resnet8"},
            "optimizer": {"name": "rbo", "lr": 0.05, "radius": 0.1},
            "budget": {"epochs": 1},
        }
    )
    result = run(config, tmp_path / "out")
    row = result.final
    assert row["step"] == 2 and row["grad_evals"] >= 4  # 20 images, batches of 10
    assert 0.0 <= row["test_accuracy"] <= 1.0 and math.isfinite(row["train_loss"])
    # only the first closure call of each step moved the BatchNorm statistics
    state = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["model"]
    tracked = {k: int(v) for k, v in state.items() if k.endswith("num_batches_tracked")}
    assert tracked and set(tracked.values()) == {2}
