"""Loaders on files in the real on-disk formats, through the real torchvision classes."""

import gzip
import hashlib
import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import datasets

from rollingball.experiments.data import (
    SYSTEM_DIRS,
    AugmentedImages,
    DataNotFoundError,
    load_data,
    make_loader,
    noisy_labels,
    num_batches,
    read_idx,
    search_dirs,
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
    if not compress:  # the same numbers as torchvision's own reader gives (it reads raw files)
        reference = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
        assert torch.equal(reference(str(tmp_path), train=False).data, bundle_bytes(bundle))


def bundle_bytes(bundle):
    """The test images as the bytes they were read from (normalisation undone)."""
    mean, std = (0.1307, 0.3081) if bundle.name == "mnist" else (0.2860, 0.3530)
    x = bundle.test[list(range(len(bundle.test)))][0][:, 0]
    return (x * std + mean).mul(255).round().to(torch.uint8)


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


def test_missing_data_says_where_it_looked_and_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ROLLINGBALL_DATA", raising=False)
    monkeypatch.setitem(SYSTEM_DIRS, "fashion_mnist", tmp_path / "system")
    with pytest.raises(DataNotFoundError) as info:
        load_data("cifar10", tmp_path / "nowhere")
    message = str(info.value)
    assert str((tmp_path / "nowhere").resolve()) in message
    assert "cifar-10-batches-py" in message and "--data-dir" in message and "--download" in message
    assert not (tmp_path / "nowhere").exists() or not any((tmp_path / "nowhere").iterdir())
    with pytest.raises(DataNotFoundError, match="MNIST/raw"):
        load_data("mnist", tmp_path)
    with pytest.raises(DataNotFoundError) as info:
        load_data("fashion_mnist", tmp_path / "nowhere")
    message = str(info.value)
    for place in (tmp_path / "nowhere", tmp_path / "system", tmp_path / "home" / ".cache"):
        assert str(place) in message
    assert "apt-get install dataset-fashion-mnist" in message and "--download" in message


def _flat_idx(folder, label_offset, n=6):
    """Debian's layout: the four gzipped IDX files directly in ``folder``; labels tell
    the folders apart."""
    rng = np.random.default_rng(label_offset)
    for split, size in (("train", n), ("t10k", 3)):
        _write_idx(
            folder / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (size, 28, 28)), True
        )
        labels = (np.arange(size) + label_offset) % 10
        _write_idx(folder / f"{split}-labels-idx1-ubyte", labels, True)


def test_fashion_mnist_is_found_in_order_data_dir_env_system_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setitem(SYSTEM_DIRS, "fashion_mnist", tmp_path / "system")
    places = {
        "data_dir": tmp_path / "given",
        "env": tmp_path / "env",
        "system": tmp_path / "system",
        "cache": tmp_path / "home" / ".cache" / "rollingball" / "FashionMNIST" / "raw",
    }
    monkeypatch.setenv("ROLLINGBALL_DATA", str(places["env"]))
    assert search_dirs("fashion_mnist", places["data_dir"]) == [
        places["data_dir"],
        places["env"],
        places["system"],
        tmp_path / "home" / ".cache" / "rollingball",
    ]
    for offset, key in enumerate(["cache", "system", "env", "data_dir"], start=1):
        _flat_idx(places[key], offset)
        first_label = load_data("fashion_mnist", places["data_dir"]).train[0][1].item()
        assert first_label == offset  # the newest place written is the first one searched
    # the given directory comes first even where $ROLLINGBALL_DATA holds files too
    assert load_data("fashion_mnist").train[0][1].item() == 3  # env, then system


def test_a_file_that_is_not_idx_is_refused(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") * 3 + b"\x00" * 5)
    with pytest.raises(DataNotFoundError, match="header says"):
        read_idx(bad)
    bad.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataNotFoundError, match="not an IDX file"):
        read_idx(bad)


DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
    reason="the Debian package dataset-fashion-mnist is not installed "
    "(make install installs it where apt-get runs as root)",
)
def test_the_real_fashion_mnist_files(monkeypatch):
    monkeypatch.delenv("ROLLINGBALL_DATA", raising=False)
    bundle = load_data("fashion_mnist", normalize=False)
    assert len(bundle.train) == 60_000 and len(bundle.test) == 10_000
    x, y = bundle.train[list(range(60_000))]
    assert x.shape == (60_000, 1, 28, 28) and x.min() >= 0.0 and x.max() == 1.0
    # the published statistics, which the loader normalises with
    assert abs(x.mean().item() - 0.2860) < 5e-4 and abs(x.std().item() - 0.3530) < 5e-4
    assert torch.bincount(y, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(bundle.test[list(range(10_000))][1]).tolist() == [1000] * 10


def test_label_noise_changes_exactly_that_fraction_of_train_labels_only():
    clean = torch.arange(1000) % 10
    noisy = noisy_labels(clean, 0.4, 10, seed=0)
    assert int((noisy != clean).sum()) == 400
    assert torch.equal(noisy, noisy_labels(clean, 0.4, 10, seed=0))
    assert not torch.equal(noisy, noisy_labels(clean, 0.4, 10, seed=1))
    # symmetric: the wrong labels spread over all classes
    assert torch.bincount(noisy[noisy != clean], minlength=10).min() > 20
    plain = load_data("digits", val_fraction=0.2, seed=5)
    bundle = load_data("digits", val_fraction=0.2, seed=5, label_noise=0.4, noise_seed=0)
    n = len(bundle.train)
    wrong = int((bundle.train[list(range(n))][1] != plain.train[list(range(n))][1]).sum())
    assert wrong == round(0.4 * n)
    for split in ("val", "test"):
        a, b = getattr(plain, split), getattr(bundle, split)
        assert torch.equal(a[list(range(len(a)))][1], b[list(range(len(b)))][1])


def test_noisy_validation_gives_the_validation_labels_the_same_noise_and_spares_the_test():
    plain = load_data("digits", val_fraction=0.2, seed=5)
    noisy = load_data("digits", val_fraction=0.2, seed=5, label_noise=0.4, noisy_validation=True)
    train_only = load_data("digits", val_fraction=0.2, seed=5, label_noise=0.4)

    def labels(data, part=1):
        return data[list(range(len(data)))][part]

    assert torch.equal(labels(noisy.train), labels(train_only.train))
    wrong = int((labels(noisy.val) != labels(plain.val)).sum())
    assert wrong == round(0.4 * len(plain.val))
    assert torch.equal(labels(noisy.val, 0), labels(plain.val, 0))  # the same images
    assert torch.equal(labels(noisy.test), labels(plain.test))


def test_noisy_validation_without_noise_or_split_is_refused():
    from rollingball.experiments.config import ConfigError, DataConfig, RunConfig

    for data in (DataConfig(name="digits", noisy_validation=True, val_fraction=0.2),
                 DataConfig(name="digits", noisy_validation=True, label_noise=0.4)):  # fmt: skip
        with pytest.raises(ConfigError, match="noisy_validation needs"):
            RunConfig(data=data).validate()


def test_train_subset_keeps_that_many_examples_outside_the_validation_split():
    full = load_data("digits", val_fraction=0.1, seed=2)
    small = load_data("digits", val_fraction=0.1, seed=2, train_subset=300)
    assert len(small.train) == 300 and len(small.val) == len(full.val)
    assert torch.equal(small.train[list(range(300))][0], full.train[list(range(300))][0])


def test_unknown_dataset_and_bad_options():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_data("imagenet")
    with pytest.raises(ValueError, match="val_fraction"):
        load_data("digits", val_fraction=1.5)
    with pytest.raises(ValueError, match="fashion_mnist, cifar10"):
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


def _reference_augmentation(images, offsets, flips, p):
    """Crop and flip one image at a time, as the augmentation is defined."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (p, p, p, p))
    out = torch.empty_like(images)
    for i in range(n):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        crop = padded[i, :, dy : dy + h, dx : dx + w]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


def test_augmentation_crops_and_flips_deterministically():
    images = torch.arange(6 * 3 * 8 * 8, dtype=torch.float32).view(6, 3, 8, 8)
    data = AugmentedImages(images, torch.arange(6), padding=2)
    data.set_epoch(seed=1, epoch=0)
    state = torch.get_rng_state()
    a, y = data[[0, 3, 5]]
    assert torch.equal(torch.get_rng_state(), state)  # torch's global generator is untouched
    assert torch.equal(a, data[[0, 3, 5]][0]) and a.shape == (3, 3, 8, 8)
    assert y.tolist() == [0, 3, 5]
    # each output is one of the 25 crops of its padded image, flipped or not
    for i, k in enumerate([0, 3, 5]):
        candidates = [
            _reference_augmentation(images[k : k + 1], torch.tensor([[dy, dx]]), [f], 2)[0]
            for dy in range(5)
            for dx in range(5)
            for f in (False, True)
        ]
        assert any(torch.equal(a[i], c) for c in candidates)
    data.set_epoch(seed=1, epoch=1)
    assert not torch.equal(a, data[[0, 3, 5]][0])  # another epoch, another augmentation
    data.set_epoch(seed=1, epoch=0)
    assert torch.equal(a, data[[0, 3, 5]][0])


def test_augmentation_matches_the_per_image_definition(monkeypatch):
    images = torch.randn(40, 1, 28, 28)
    data = AugmentedImages(images, torch.zeros(40, dtype=torch.long), padding=2)
    drawn = {}
    real = np.random.default_rng

    def spy(seed):
        rng = real(seed)
        offsets, uniform = rng.integers(0, 5, (40, 2)), rng.random(40)
        drawn.update(offsets=torch.as_tensor(offsets), flips=uniform < 0.5)
        return real(seed)

    monkeypatch.setattr(np.random, "default_rng", spy)
    out, _ = data[list(range(40))]
    assert 5 < int(drawn["flips"].sum()) < 35
    expected = _reference_augmentation(images, drawn["offsets"], drawn["flips"], 2)
    assert torch.equal(out, expected)
    crop_only = AugmentedImages(images, torch.zeros(40, dtype=torch.long), padding=2, flip=False)
    expected = _reference_augmentation(images, drawn["offsets"], [False] * 40, 2)
    assert torch.equal(crop_only[list(range(40))][0], expected)


def test_augmented_batches_repeat_after_a_resume():
    images = torch.randn(50, 1, 28, 28)
    data = AugmentedImages(images, torch.arange(50) % 10, padding=2)
    whole = [x for x, _ in make_loader(data, 8, shuffle=True, seed=3, epoch=2)]
    other = AugmentedImages(images, torch.arange(50) % 10, padding=2)  # a fresh process
    other.set_epoch(seed=9, epoch=9)
    later = [x for x, _ in make_loader(other, 8, shuffle=True, seed=3, epoch=2, start_batch=4)]
    assert len(later) == len(whole) - 4
    assert all(torch.equal(a, b) for a, b in zip(whole[4:], later, strict=True))


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
