"""Datasets and loaders: MNIST-1D, sklearn digits, MNIST, Fashion-MNIST, CIFAR-10/100.

``load_data(name, ...)`` returns a :class:`DataBundle` of standard ``torch.utils.data``
datasets (train, test and an optional validation split carved from train) and
``make_loader`` builds a seeded ``DataLoader`` for one epoch. Small datasets are held as
tensors and batched by index, which keeps CPU runs fast; under ``torch.distributed`` the
loader shards the data with a ``DistributedSampler``.
"""

from __future__ import annotations

import gzip
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from rollingball.experiments.atomic import atomic_write, atomic_write_bytes

__all__ = [
    "DATASETS",
    "AugmentedImages",
    "DataBundle",
    "DataNotFoundError",
    "default_data_dir",
    "load_data",
    "make_loader",
]

DATASETS = ("mnist1d", "digits", "mnist", "fashion_mnist", "cifar10", "cifar100")

_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class DataNotFoundError(FileNotFoundError):
    """The dataset's files are not where the loader looked."""


@dataclass
class DataBundle:
    """Train / test (/ validation) datasets and what a model needs to know about them."""

    name: str
    train: Dataset[Any]
    test: Dataset[Any]
    val: Dataset[Any] | None
    num_classes: int
    input_shape: tuple[int, ...]


class TensorData(Dataset[tuple[Tensor, Tensor]]):
    """Inputs and labels held as tensors; indexing with a list of indices returns a batch."""

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        if len(inputs) != len(targets):
            raise ValueError("inputs and targets must have the same length")
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: Any) -> tuple[Tensor, Tensor]:
        return self.inputs[index], self.targets[index]


class AugmentedImages(TensorData):
    """Images (N, C, H, W) with the standard CIFAR augmentation: pad-and-crop plus flip.

    The randomness comes from torch's global generator, so a seeded run is reproducible.
    """

    def __init__(self, inputs: Tensor, targets: Tensor, padding: int = 4) -> None:
        super().__init__(inputs, targets)
        self.padding = padding

    def __getitem__(self, index: Any) -> tuple[Tensor, Tensor]:
        images, targets = self.inputs[index], self.targets[index]
        single = images.dim() == 3
        batch = images.unsqueeze(0) if single else images
        n, _, h, w = batch.shape
        p = self.padding
        padded = torch.nn.functional.pad(batch, (p, p, p, p))
        offsets = torch.randint(0, 2 * p + 1, (n, 2))
        flips = torch.rand(n) < 0.5
        out = torch.empty_like(batch)
        for i in range(n):
            dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
            crop = padded[i, :, dy : dy + h, dx : dx + w]
            out[i] = crop.flip(-1) if flips[i] else crop
        return (out[0] if single else out), targets


def default_data_dir() -> Path:
    """Where datasets live unless told otherwise: ``$ROLLINGBALL_DATA`` or ~/.cache/rollingball."""
    env = os.environ.get("ROLLINGBALL_DATA")
    return Path(env) if env else Path.home() / ".cache" / "rollingball"


def load_data(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    val_fraction: float = 0.0,
    seed: int = 0,
    augment: bool = False,
    normalize: bool = True,
) -> DataBundle:
    """Load dataset ``name`` (one of :data:`DATASETS`).

    ``data_dir`` holds existing files (default: :func:`default_data_dir`); torchvision datasets
    are downloaded only when ``download`` is true. ``val_fraction`` carves a validation split
    from train with a generator seeded by ``seed``. ``augment`` (random crop + flip) applies
    to CIFAR only; ``normalize`` standardises the inputs with the usual per-channel statistics.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if augment and not name.startswith("cifar"):
        raise ValueError("augment (random crop + flip) is defined for CIFAR-10/100 only")
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if name == "mnist1d":
        (xtr, ytr), (xte, yte) = _mnist1d(root)
        num_classes = 10
    elif name == "digits":
        (xtr, ytr), (xte, yte) = _digits()
        num_classes = 10
    else:
        (xtr, ytr), (xte, yte), num_classes = _torchvision(name, root, download, normalize)
    val: Dataset[Any] | None = None
    if val_fraction > 0:
        order = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, round(val_fraction * len(ytr)))
        val = TensorData(xtr[order[:n_val]], ytr[order[:n_val]])
        xtr, ytr = xtr[order[n_val:]], ytr[order[n_val:]]
    train: Dataset[Any] = AugmentedImages(xtr, ytr) if augment else TensorData(xtr, ytr)
    return DataBundle(name, train, TensorData(xte, yte), val, num_classes, tuple(xtr.shape[1:]))


def make_loader(
    dataset: Dataset[Any],
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    drop_last: bool = False,
) -> DataLoader[Any]:
    """A loader for one epoch, its order fixed by ``(seed, epoch)``; skips ``start_batch`` batches.

    Under an initialised ``torch.distributed`` process group each rank gets its own shard.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sampler: Sampler[int]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # the seed of the single-process order below: rank r takes every world-th example
        # of the same permutation, so the ranks' k-th batches together form the k-th batch
        # of a single-process run with world times the batch size
        dist_sampler: DistributedSampler[Any] = DistributedSampler(
            dataset, shuffle=shuffle, seed=seed * 1_000_003, drop_last=drop_last
        )
        dist_sampler.set_epoch(epoch)
        sampler = dist_sampler
    elif shuffle:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        sampler = RandomSampler(dataset, generator=generator)  # type: ignore[arg-type]
    else:
        sampler = SequentialSampler(dataset)  # type: ignore[arg-type]
    batches = list(BatchSampler(sampler, batch_size, drop_last))[start_batch:]
    # the loader draws a base seed for its workers when it starts; from its own generator,
    # so that starting a loader does not move torch's global RNG (resume stays bit-for-bit)
    base = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)
    if isinstance(dataset, TensorData):
        # one indexing operation per batch instead of one per example
        return DataLoader(dataset, sampler=batches, batch_size=None, generator=base)
    return DataLoader(dataset, batch_sampler=batches, generator=base)


def num_batches(dataset: Dataset[Any], batch_size: int, drop_last: bool = False) -> int:
    """Batches per epoch (on this rank, under ``torch.distributed``)."""
    n = len(dataset)  # type: ignore[arg-type]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        n = n // world if drop_last else -(-n // world)
    return n // batch_size if drop_last else -(-n // batch_size)


# --------------------------------------------------------------------------- sources


def _mnist1d(root: Path) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """MNIST-1D (Greydanus 2020) with the package's default arguments: 4000 train, 1000 test."""
    cache = root / "mnist1d" / "mnist1d_default_seed42.npz"
    if not cache.exists():
        from mnist1d.data import get_dataset_args, make_dataset

        np_state, py_state = np.random.get_state(), random.getstate()
        try:  # the generator reseeds numpy's and Python's global RNGs; leave them as they were
            raw = make_dataset(get_dataset_args())
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        arrays = {k: raw[k] for k in ("x", "y", "x_test", "y_test")}
        atomic_write(cache, lambda handle: np.savez(handle, **arrays))
    with np.load(cache) as arrays:
        x, y = torch.tensor(arrays["x"], dtype=torch.float32), torch.tensor(arrays["y"])
        xt, yt = torch.tensor(arrays["x_test"], dtype=torch.float32), torch.tensor(arrays["y_test"])
    return (x, y.long()), (xt, yt.long())


def _digits() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """sklearn's bundled 8x8 digits, scaled to [0, 1]; a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=0.2, random_state=0, stratify=digits.target
    )
    itr, ite = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return (x[itr], y[itr]), (x[ite], y[ite])


def _torchvision(
    name: str, root: Path, download: bool, normalize: bool
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], int]:
    from torchvision import datasets

    classes: dict[str, Any] = {
        "mnist": datasets.MNIST,
        "fashion_mnist": datasets.FashionMNIST,
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
    }
    cls = classes[name]
    if name in ("mnist", "fashion_mnist"):
        _gunzip_idx(root / cls.__name__ / "raw")
    splits = []
    for train in (True, False):
        try:
            ds = cls(root=str(root), train=train, download=download)
        except RuntimeError as error:
            raise DataNotFoundError(_missing_message(name, root, download, error)) from error
        data = torch.as_tensor(np.asarray(ds.data))
        images = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)
        inputs = images.float().div_(255.0)
        if normalize:
            mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in _NORMALIZATION[name])
            inputs = (inputs - mean) / std
        targets = torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)
        splits.append((inputs.contiguous(), targets))
    num_classes = 100 if name == "cifar100" else 10
    return splits[0], splits[1], num_classes


def _gunzip_idx(raw: Path) -> None:
    """Decompress ``*-ubyte.gz`` IDX files that have no decompressed copy yet (torchvision
    reads the decompressed files, and only decompresses what it downloads itself)."""
    if not raw.is_dir():
        return
    for packed in raw.glob("*-ubyte.gz"):
        target = packed.with_suffix("")
        if not target.exists():
            with gzip.open(packed, "rb") as handle:
                atomic_write_bytes(target, handle.read())


def _missing_message(name: str, root: Path, download: bool, error: Exception) -> str:
    layout = {
        "mnist": "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
        "fashion_mnist": "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
        "cifar10": "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
        "cifar100": "cifar-100-python/{train,test,meta}",
    }[name]
    how = (
        "the download failed (no network?)"
        if download
        else "pass --download (or download = true in [data]) on a machine with network access"
    )
    return (
        f"{name}: dataset files not found under {root.resolve()} (expected {root}/{layout}). "
        f"Point --data-dir (or data_dir in [data], or $ROLLINGBALL_DATA) at a directory that "
        f"holds them, or {how}. torchvision said: {error}"
    )
