"""Datasets and loaders: MNIST-1D, sklearn digits, MNIST, Fashion-MNIST, CIFAR-10/100.

``load_data(name, ...)`` returns a :class:`DataBundle` of standard ``torch.utils.data``
datasets (train, test and an optional validation split carved from train) and
``make_loader`` builds a seeded ``DataLoader`` for one epoch. Small datasets are held as
tensors and batched by index, which keeps CPU runs fast; under ``torch.distributed`` the
loader shards the data with a ``DistributedSampler``.

MNIST and Fashion-MNIST are read from their IDX files (gzipped or not) wherever they are
found first: ``data_dir``, ``$ROLLINGBALL_DATA``, the Debian package's directory
(``apt-get install dataset-fashion-mnist``: /usr/share/datasets/fashion-mnist), then
~/.cache/rollingball, where ``download`` puts torchvision's copy.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
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

from rollingball.experiments.atomic import atomic_write

__all__ = [
    "AUGMENTABLE",
    "DATASETS",
    "SYSTEM_DIRS",
    "AugmentedImages",
    "DataBundle",
    "DataNotFoundError",
    "default_data_dir",
    "load_data",
    "make_loader",
    "noisy_labels",
    "read_idx",
    "search_dirs",
]

DATASETS = ("mnist1d", "digits", "mnist", "fashion_mnist", "cifar10", "cifar100")
AUGMENTABLE = ("mnist", "fashion_mnist", "cifar10", "cifar100")

_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


# directories that system packages install datasets into (flat IDX files); tests patch this
SYSTEM_DIRS: dict[str, Path] = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}

# the IDX files' stems, and the folder torchvision keeps them in under a root
_IDX_STEMS: tuple[str, ...] = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
_IDX_STEMS += ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


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
    """Images (N, C, H, W) with pad-and-crop (zero padding ``padding``) and, if ``flip``, a
    horizontal flip with probability ½.

    A batch's crops and flips come from a generator seeded by (seed, epoch, a hash of the
    batch's indices), set by :func:`make_loader` through :meth:`set_epoch`: the same batch of
    the same epoch gets the same augmentation however the run got there, so a resumed run
    sees the batches it would have seen, and torch's global generator is not touched.
    """

    def __init__(
        self, inputs: Tensor, targets: Tensor, padding: int = 4, flip: bool = True
    ) -> None:
        super().__init__(inputs, targets)
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.padding, self.flip = padding, flip
        self.seed, self.epoch = 0, 0

    def set_epoch(self, seed: int, epoch: int) -> None:
        """Key the augmentation of the batches to come by ``(seed, epoch)``."""
        self.seed, self.epoch = seed, epoch

    def __getitem__(self, index: Any) -> tuple[Tensor, Tensor]:
        images, targets = self.inputs[index], self.targets[index]
        single = images.dim() == 3
        batch = images.unsqueeze(0) if single else images
        ids = np.atleast_1d(np.asarray(index, dtype=np.int64))
        digest = hashlib.blake2b(ids.tobytes(), digest_size=8).digest()
        rng = np.random.default_rng([self.seed, self.epoch, int.from_bytes(digest, "little")])
        n, _, h, w = batch.shape
        p = self.padding
        offsets = torch.as_tensor(rng.integers(0, 2 * p + 1, (n, 2)))
        flips = torch.as_tensor(rng.random(n) < 0.5) & self.flip
        padded = torch.nn.functional.pad(batch, (p, p, p, p))
        rows = offsets[:, :1] + torch.arange(h)  # (n, h): the crop's rows in the padded image
        ahead, back = torch.arange(w), torch.arange(w - 1, -1, -1)
        cols = offsets[:, 1:] + torch.where(flips[:, None], back, ahead)  # (n, w)
        out = padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        out = out.permute(0, 3, 1, 2).contiguous()  # (n, h, w, C) -> (n, C, h, w)
        return (out[0] if single else out), targets


def noisy_labels(targets: Tensor, fraction: float, num_classes: int, seed: int) -> Tensor:
    """Symmetric label noise: round(fraction · N) labels, chosen with a generator seeded by
    ``seed``, each replaced by one of the other ``num_classes − 1`` classes uniformly (so
    exactly that fraction is wrong)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    n = len(targets)
    chosen = torch.randperm(n, generator=generator)[: round(fraction * n)]
    shift = torch.randint(1, num_classes, (len(chosen),), generator=generator)
    out = targets.clone()
    out[chosen] = (targets[chosen] + shift) % num_classes
    return out


def default_data_dir() -> Path:
    """Where datasets live unless told otherwise: ``$ROLLINGBALL_DATA`` or ~/.cache/rollingball."""
    env = os.environ.get("ROLLINGBALL_DATA")
    return Path(env) if env else Path.home() / ".cache" / "rollingball"


def search_dirs(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where dataset ``name`` is looked for, in order: ``data_dir``, ``$ROLLINGBALL_DATA``,
    the system package's directory (:data:`SYSTEM_DIRS`), ~/.cache/rollingball."""
    dirs = [Path(data_dir).expanduser()] if data_dir is not None else []
    env = os.environ.get("ROLLINGBALL_DATA")
    if env:
        dirs.append(Path(env).expanduser())
    if name in SYSTEM_DIRS:
        dirs.append(SYSTEM_DIRS[name])
    dirs.append(Path.home() / ".cache" / "rollingball")
    return list(dict.fromkeys(dirs))


def load_data(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    val_fraction: float = 0.0,
    seed: int = 0,
    augment: bool = False,
    normalize: bool = True,
    label_noise: float = 0.0,
    noise_seed: int = 0,
    noisy_validation: bool = False,
    train_subset: int = 0,
) -> DataBundle:
    """Load dataset ``name`` (one of :data:`DATASETS`).

    Files are looked for in :func:`search_dirs` order; torchvision datasets are downloaded
    (into ``data_dir``, else the first of ``$ROLLINGBALL_DATA`` and ~/.cache/rollingball) only
    when ``download`` is true. ``val_fraction`` carves a validation split from train with a
    generator seeded by ``seed``; ``train_subset`` > 0 then keeps that many training examples
    (the first of the same shuffled order). ``label_noise`` replaces that fraction of the
    training labels (never the test labels) by other classes (:func:`noisy_labels`, seeded
    by ``noise_seed``); ``noisy_validation`` gives the validation labels the same noise (seeded
    by ``noise_seed + 1``), so that tuning sees the noise that training sees. ``augment``
    (random crop + flip; MNIST: crop only) applies to the 28×28 and CIFAR images;
    ``normalize`` standardises the inputs with the usual statistics.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if augment and name not in AUGMENTABLE:
        raise ValueError(
            f"augment (random crop + flip) is defined for {', '.join(AUGMENTABLE)}, not {name!r}"
        )
    if train_subset < 0:
        raise ValueError(f"train_subset must be >= 0, got {train_subset}")
    if name == "mnist1d":
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        (xtr, ytr), (xte, yte) = _mnist1d(root)
        num_classes = 10
    elif name == "digits":
        (xtr, ytr), (xte, yte) = _digits()
        num_classes = 10
    elif name in _TORCHVISION_FOLDER:
        (xtr, ytr), (xte, yte) = _idx_dataset(name, data_dir, download, normalize)
        num_classes = 10
    else:
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        (xtr, ytr), (xte, yte), num_classes = _torchvision(name, root, download, normalize)
    val: Dataset[Any] | None = None
    if val_fraction > 0 or train_subset > 0:
        order = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, round(val_fraction * len(ytr))) if val_fraction > 0 else 0
        if n_val:
            yval = ytr[order[:n_val]]
            if noisy_validation and label_noise > 0:
                yval = noisy_labels(yval, label_noise, num_classes, noise_seed + 1)
            val = TensorData(xtr[order[:n_val]], yval)
        keep = order[n_val:]
        if train_subset > 0:
            keep = keep[:train_subset]
        xtr, ytr = xtr[keep], ytr[keep]
    if label_noise > 0:
        ytr = noisy_labels(ytr, label_noise, num_classes, noise_seed)
    train: Dataset[Any]
    if augment:
        padding = 4 if name.startswith("cifar") else 2
        train = AugmentedImages(xtr, ytr, padding=padding, flip=name != "mnist")
    else:
        train = TensorData(xtr, ytr)
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
    if isinstance(dataset, AugmentedImages):
        dataset.set_epoch(seed, epoch)
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


def read_idx(path: Path) -> Tensor:
    """The array in an IDX file (unsigned bytes; ``.gz`` read through gzip) as a uint8 tensor
    (cached per file, size and modification time: a process that runs many trainings reads
    each file once; callers get a fresh copy)."""
    stat = path.stat()
    return _read_idx(path.resolve(), stat.st_size, stat.st_mtime_ns).clone()


@functools.lru_cache(maxsize=8)
def _read_idx(path: Path, size: int, mtime: int) -> Tensor:
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataNotFoundError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = data[4 + 4 * ndim :]
    if len(body) != math.prod(shape):
        raise DataNotFoundError(
            f"{path}: IDX header says {shape} ({math.prod(shape)} bytes), body has {len(body)}"
        )
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def _idx_files(name: str, root: Path) -> list[Path] | None:
    """The four IDX files of ``name`` under ``root``, flat (Debian's layout) or in
    torchvision's ``MNIST/raw`` / ``FashionMNIST/raw``, each ``.gz`` or not; None if absent."""
    for folder in (root, root / _TORCHVISION_FOLDER[name] / "raw"):
        found = []
        for stem in _IDX_STEMS:
            candidates = [folder / stem, folder / f"{stem}.gz"]
            found.append(next((c for c in candidates if c.is_file()), None))
        if all(found):
            return [f for f in found if f is not None]
    return None


def _idx_dataset(
    name: str, data_dir: str | os.PathLike[str] | None, download: bool, normalize: bool
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """MNIST or Fashion-MNIST from the first of :func:`search_dirs` that holds the IDX files;
    if none does and ``download``, torchvision downloads them into the first writable place."""
    dirs = search_dirs(name, data_dir)
    files = next((f for f in map(functools.partial(_idx_files, name), dirs) if f), None)
    if files is None and download:
        from torchvision import datasets

        target = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
        try:
            cls(root=str(target), train=True, download=True)
            cls(root=str(target), train=False, download=True)
        except (RuntimeError, OSError) as error:
            raise DataNotFoundError(_missing_message(name, dirs, True, error)) from error
        files = _idx_files(name, target)
    if files is None:
        raise DataNotFoundError(_missing_message(name, dirs, download, None))
    x_train, y_train, x_test, y_test = (read_idx(f) for f in files)
    out = []
    for images, labels in ((x_train, y_train), (x_test, y_test)):
        inputs = images.unsqueeze(1).float().div_(255.0)
        if normalize:
            mean, std = _NORMALIZATION[name]
            inputs = (inputs - mean[0]) / std[0]
        out.append((inputs.contiguous(), labels.long()))
    return out[0], out[1]


def _torchvision(
    name: str, root: Path, download: bool, normalize: bool
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], int]:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    splits = []
    for train in (True, False):
        try:
            ds = cls(root=str(root), train=train, download=download)
        except RuntimeError as error:
            raise DataNotFoundError(_missing_message(name, [root], download, error)) from error
        data = torch.as_tensor(np.asarray(ds.data))
        inputs = data.permute(0, 3, 1, 2).float().div_(255.0)
        if normalize:
            mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in _NORMALIZATION[name])
            inputs = (inputs - mean) / std
        targets = torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)
        splits.append((inputs.contiguous(), targets))
    num_classes = 100 if name == "cifar100" else 10
    return splits[0], splits[1], num_classes


def _missing_message(name: str, dirs: list[Path], download: bool, error: Exception | None) -> str:
    layout = {
        "mnist": "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz], flat or under MNIST/raw/",
        "fashion_mnist": (
            "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz], flat or under FashionMNIST/raw/"
        ),
        "cifar10": "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
        "cifar100": "cifar-100-python/{train,test,meta}",
    }[name]
    where = ", ".join(str(d.resolve()) for d in dirs)
    if download:
        how = "the download failed (no network?)"
    else:
        how = "pass --download (or download = true in [data]) on a machine with network access"
    if name == "fashion_mnist":
        how += "; on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist"
    said = f" torchvision said: {error}" if error is not None else ""
    return (
        f"{name}: dataset files not found (looked in {where}; expected {layout}). "
        f"Point --data-dir (or data_dir in [data], or $ROLLINGBALL_DATA) at a directory that "
        f"holds them, or {how}.{said}"
    )
