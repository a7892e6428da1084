"""Datasets for the trainer, held in memory as uint8 tensors and batched with plain tensor ops.

``load_dataset(name, data_dir=None, download=True, ...)`` returns an :class:`ImageDataset` with train
and test splits. Names:

- ``"digits"`` (default): scikit-learn's handwritten digits (1,797 real 8×8 scans, 10 classes), shipped
  inside scikit-learn, so no download. Upsampled to 16×16 (bilinear), 1 channel, a fixed 80/20
  train/test split (seeded permutation). Augmentation: random crop with 2 pixels of padding (no flip:
  a mirrored digit is another symbol).
- ``"cifar10"`` / ``"cifar100"``: torchvision's download code when torchvision is importable, else the
  standard python-pickle batch files (``cifar-10-batches-py/`` or ``cifar-100-python/``, or their
  ``.tar.gz`` archive) in ``data_dir``. 3×32×32; random crop (4 pixel padding) + horizontal flip.
- ``"fashion-mnist"``: the standard idx or idx.gz files from ``data_dir`` (default: Debian's
  ``/usr/share/datasets/fashion-mnist`` from ``apt-get install dataset-fashion-mnist`` when present),
  or torchvision's download. 28×28 padded to 32×32, 1 channel; crop (4 pixel padding) + flip.

Normalisation uses the per-channel mean/std of the training split. Batches come from
:func:`iterate_batches`: the sample order is a :class:`torch.utils.data.DistributedSampler`
permutation (seeded by epoch, so the union of the ranks' batches at step i equals the single-process
batch i) and the augmentation of each sample is drawn per epoch from a seeded generator indexed by the
sample, so it does not depend on the number of processes either.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct
import tarfile
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DATASETS", "DatasetError", "ImageDataset", "load_dataset", "iterate_batches",
           "read_idx", "read_cifar_batches", "default_data_dir", "DEBIAN_FASHION_MNIST"]

DATASETS = ("digits", "cifar10", "cifar100", "fashion-mnist")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_CIFAR_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
_IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
              "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


class DatasetError(RuntimeError):
    """A dataset that cannot be found or read; the message says how to get it."""


@dataclasses.dataclass
class ImageDataset:
    """Both splits of an image classification set, uint8 NCHW in memory, plus how to feed them."""

    name: str
    train_images: torch.Tensor  # uint8 [N, C, H, W]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    crop_padding: int = 0  # random-crop augmentation: pad by this many pixels, crop back
    flip: bool = False  # random horizontal flip augmentation
    mean: torch.Tensor | None = None  # per-channel, of the [0, 1]-scaled training images
    std: torch.Tensor | None = None

    def __post_init__(self):
        if self.mean is None:
            x = self.train_images.float().div_(255.0)
            self.mean = x.mean(dim=(0, 2, 3))
            self.std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)

    @property
    def in_channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[2])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.train_images.shape[1:])

    def subset(self, train: int | None = None, test: int | None = None, seed: int = 0) -> "ImageDataset":
        """A fixed random subset (seeded permutation) of each split; None keeps a split whole."""
        def pick(images, labels, n, salt):
            if n is None or n >= len(labels):
                return images, labels
            if n <= 0:
                raise ValueError(f"subset size must be positive, got {n}")
            g = torch.Generator().manual_seed(seed * 7919 + salt)
            idx = torch.randperm(len(labels), generator=g)[:n].sort().values
            return images[idx].contiguous(), labels[idx].contiguous()

        tri, trl = pick(self.train_images, self.train_labels, train, 1)
        tei, tel = pick(self.test_images, self.test_labels, test, 2)
        # keep the full set's normalisation so a subset run sees the same input statistics
        return dataclasses.replace(self, train_images=tri, train_labels=trl, test_images=tei,
                                   test_labels=tel, mean=self.mean, std=self.std)

    def describe(self) -> str:
        c, h, w = self.input_shape
        return (f"{self.name}: {len(self.train_labels)} train / {len(self.test_labels)} test images, "
                f"{c}x{h}x{w}, {self.num_classes} classes")


# --------------------------------------------------------------------------------------------------
# Batching and augmentation (plain tensor ops; no torchvision)
# --------------------------------------------------------------------------------------------------
def _augment_params(n: int, crop_padding: int, seed: int, epoch: int):
    """Per-sample crop offsets and flip bits of one epoch, identical on every rank."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + 17) % (2 ** 63))
    offsets = torch.randint(0, 2 * crop_padding + 1, (n, 2), generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    return offsets, flips


def _crop_flip(x: torch.Tensor, pad: int, offsets: torch.Tensor | None, flips: torch.Tensor | None):
    """Zero-pad by ``pad``, crop back to the input size at per-sample ``offsets``, mirror where ``flips``."""
    if pad > 0 and offsets is not None:
        n, _, h, w = x.shape
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = offsets[:, 0:1] + torch.arange(h)  # [n, h]
        cols = offsets[:, 1:2] + torch.arange(w)  # [n, w]
        batch = torch.arange(n)[:, None, None]
        # advanced indices on dims 0, 2, 3 around a slice: result is [n, h, w, c]
        x = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flips is not None:
        x = torch.where(flips[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def make_batch(ds: ImageDataset, idx: torch.Tensor, train: bool, aug=None, device="cpu"):
    """Float, normalised ``(x, y)`` for sample indices ``idx`` of a split, augmented when ``aug``."""
    images, labels = (ds.train_images, ds.train_labels) if train else (ds.test_images, ds.test_labels)
    x = images[idx].float().div_(255.0)
    if aug is not None:
        offsets, flips = aug
        x = _crop_flip(x, ds.crop_padding, offsets[idx] if ds.crop_padding else None,
                       flips[idx] if ds.flip else None)
    x = (x - ds.mean[:, None, None]) / ds.std[:, None, None]
    return x.to(device, non_blocking=True), labels[idx].to(device, non_blocking=True)


def iterate_batches(ds: ImageDataset, batch_size: int, *, train: bool, epoch: int = 0, seed: int = 0,
                    rank: int = 0, world_size: int = 1, augment: bool = True,
                    device="cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of one epoch for this rank.

    ``batch_size`` is per rank. Training: a seeded :class:`DistributedSampler` permutation (all samples
    each epoch; with several ranks the sampler pads by repeating a few samples so every rank takes the
    same number of steps), augmented when ``augment``; a last batch of a single sample is merged into
    the batch before it (BatchNorm cannot train on one value per channel). Test: in order, rank r takes
    samples r, r+W, ... with no padding, so summed counts over ranks are exact.
    """
    if train:
        from torch.utils.data import DistributedSampler

        n = len(ds.train_labels)
        sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=seed, drop_last=False)
        sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(sampler)), dtype=torch.long)
        aug = _augment_params(n, ds.crop_padding, seed, epoch) if augment else None
    else:
        order = torch.arange(rank, len(ds.test_labels), world_size)
        aug = None
    bounds = _batch_bounds(len(order), batch_size, merge_single_last=train)
    for start, end in zip(bounds[:-1], bounds[1:]):
        yield make_batch(ds, order[start:end], train, aug, device)


def _batch_bounds(n: int, batch_size: int, merge_single_last: bool) -> list[int]:
    """Start offsets of the batches of ``n`` samples, then ``n``; with ``merge_single_last``, a last
    batch of one sample joins the batch before it."""
    bounds = list(range(0, n, batch_size)) + [n]
    if merge_single_last and len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return bounds


def num_batches(ds: ImageDataset, batch_size: int, train: bool, world_size: int = 1) -> int:
    n = len(ds.train_labels) if train else len(ds.test_labels)
    per_rank = -(-n // world_size)  # the sampler pads train; rank 0 has the most test samples
    return len(_batch_bounds(per_rank, batch_size, merge_single_last=train)) - 1


# --------------------------------------------------------------------------------------------------
# File formats
# --------------------------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
    """Read an idx file (as used by MNIST / Fashion-MNIST), plain or gzip-compressed."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read idx file {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an idx file (bad magic number {data[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - offset != expected:
        raise DatasetError(f"{path}: header says {dims} ({expected} bytes) but the file holds "
                           f"{len(data) - offset} bytes of data")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise DatasetError(f"cannot read CIFAR batch file {path}: {e}") from e


def read_cifar_batches(paths: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 3, 32, 32] and labels of CIFAR python-pickle batch files."""
    images, labels = [], []
    for p in paths:
        d = _unpickle(p)
        key = label_key if label_key in d else label_key.decode()
        data_key = b"data" if b"data" in d else "data"
        if data_key not in d or key not in d:
            raise DatasetError(f"{p} is not a CIFAR batch file (keys: {sorted(map(str, d))[:6]})")
        images.append(np.asarray(d[data_key], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(d[key], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------
def _torchvision():
    """``torchvision.datasets`` (for downloads), or None where torchvision does not import."""
    from .models.torchvision_models import import_torchvision_package

    try:
        return import_torchvision_package().datasets
    except ImportError:  # not installed, or built against another torch
        return None


def default_data_dir(name: str) -> str:
    if name == "fashion-mnist" and os.path.isdir(DEBIAN_FASHION_MNIST):
        return DEBIAN_FASHION_MNIST
    return os.environ.get("EBKERNELS_DATA", os.path.join(os.path.expanduser("~"), ".cache", "ebkernels",
                                                          "data"))


def _load_digits() -> ImageDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # [1797, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_train = int(round(0.8 * len(labels)))
    tr, te = perm[:n_train].sort().values, perm[n_train:].sort().values
    return ImageDataset("digits", images[tr], labels[tr], images[te], labels[te], 10,
                        crop_padding=2, flip=False)


def _find_cifar_dir(name: str, data_dir: str) -> str | None:
    sub = _CIFAR_DIRS[name]
    for cand in (os.path.join(data_dir, sub), data_dir):
        marker = "data_batch_1" if name == "cifar10" else "train"
        if os.path.isfile(os.path.join(cand, marker)):
            return cand
    archive = os.path.join(data_dir, _CIFAR_ARCHIVES[name])
    if os.path.isfile(archive):  # a downloaded archive: unpack once, next to it
        try:
            with tarfile.open(archive) as tar:
                try:
                    tar.extractall(data_dir, filter="data")
                except TypeError:  # Python without extraction filters
                    tar.extractall(data_dir)
        except (OSError, tarfile.TarError) as e:
            raise DatasetError(f"cannot unpack {archive}: {e}") from e
        return _find_cifar_dir(name, data_dir) if os.path.isdir(os.path.join(data_dir, sub)) else None
    return None


def _load_cifar(name: str, data_dir: str, download: bool) -> ImageDataset:
    num_classes = 10 if name == "cifar10" else 100
    folder = _find_cifar_dir(name, data_dir) if os.path.isdir(data_dir) else None
    if folder is None:
        tv = _torchvision() if download else None
        if tv is None:
            how = ("downloads are off (--no-download)" if not download else
                   "torchvision is not importable, so it cannot be downloaded here")
            raise DatasetError(
                f"{name} not found in {data_dir!r} (looked for {_CIFAR_DIRS[name]}/ or "
                f"{_CIFAR_ARCHIVES[name]}), and {how}. Put the python version of the dataset there "
                f"(https://www.cs.toronto.edu/~kriz/cifar.html, file {_CIFAR_ARCHIVES[name]}) and pass "
                f"--data-dir, or install torchvision and allow downloads.")
        os.makedirs(data_dir, exist_ok=True)
        cls = tv.CIFAR10 if name == "cifar10" else tv.CIFAR100
        splits = [cls(data_dir, train=t, download=True) for t in (True, False)]
        arrays = [(np.ascontiguousarray(s.data.transpose(0, 3, 1, 2)), np.asarray(s.targets)) for s in splits]
    else:
        if name == "cifar10":
            train_files = [os.path.join(folder, f"data_batch_{i}") for i in range(1, 6)]
            test_files, key = [os.path.join(folder, "test_batch")], b"labels"
        else:
            train_files, test_files, key = [os.path.join(folder, "train")], [os.path.join(folder, "test")], \
                b"fine_labels"
        missing = [p for p in train_files + test_files if not os.path.isfile(p)]
        if missing:
            raise DatasetError(f"{name} in {folder} is incomplete: missing {', '.join(missing)}")
        arrays = [read_cifar_batches(train_files, key), read_cifar_batches(test_files, key)]
    (tri, trl), (tei, tel) = arrays
    return ImageDataset(name, torch.from_numpy(tri), torch.from_numpy(trl).long(), torch.from_numpy(tei),
                        torch.from_numpy(tel).long(), num_classes, crop_padding=4, flip=True)


def _find_idx(folder: str, stem: str) -> str | None:
    for sub in ("", os.path.join("FashionMNIST", "raw")):
        for suffix in ("", ".gz"):
            p = os.path.join(folder, sub, stem + suffix)
            if os.path.isfile(p):
                return p
    return None


def _load_fashion(data_dir: str, download: bool) -> ImageDataset:
    paths = {k: _find_idx(data_dir, v) for k, v in _IDX_FILES.items()} if os.path.isdir(data_dir) else {}
    if not paths or any(p is None for p in paths.values()):
        tv = _torchvision() if download else None
        if tv is None:
            missing = [v for k, v in _IDX_FILES.items() if paths.get(k) is None]
            how = ("downloads are off (--no-download)" if not download else
                   "torchvision is not importable, so it cannot be downloaded here")
            raise DatasetError(
                f"fashion-mnist not found in {data_dir!r} (missing {', '.join(missing)}[.gz]), and {how}. "
                f"On Debian/Ubuntu: `apt-get install dataset-fashion-mnist` (installs the idx files "
                f"under {DEBIAN_FASHION_MNIST}, the default --data-dir), or put the four idx(.gz) files "
                f"of https://github.com/zalandoresearch/fashion-mnist in a folder and pass --data-dir.")
        os.makedirs(data_dir, exist_ok=True)
        splits = [tv.FashionMNIST(data_dir, train=t, download=True) for t in (True, False)]
        arrays = [(s.data.numpy(), s.targets.numpy()) for s in splits]
    else:
        arrays = [(read_idx(paths["train_images"]), read_idx(paths["train_labels"])),
                  (read_idx(paths["test_images"]), read_idx(paths["test_labels"]))]
    out = []
    for images, labels in arrays:
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(f"fashion-mnist files in {data_dir} disagree: images {images.shape}, "
                               f"labels {labels.shape}")
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))[:, None]
        pad = max(0, 32 - x.shape[-1])  # 28 -> 32 so the CIFAR models run unchanged
        x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        out += [x.contiguous(), torch.from_numpy(labels.astype(np.int64))]
    return ImageDataset("fashion-mnist", *out, 10, crop_padding=4, flip=True)


def load_dataset(name: str = "digits", data_dir: str | None = None, download: bool = True,
                 train_subset: int | None = None, test_subset: int | None = None,
                 seed: int = 0) -> ImageDataset:
    """Load a dataset by name (see module docstring); raises DatasetError with how-to-get-it advice."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; accepted: {', '.join(DATASETS)}")
    if name == "digits":
        ds = _load_digits()
    else:
        data_dir = os.path.expanduser(data_dir or default_data_dir(name))
        if not download and not os.path.isdir(data_dir):
            raise DatasetError(f"--data-dir {data_dir!r} does not exist and downloads are off (--no-download)"
                               + ("; for fashion-mnist: `apt-get install dataset-fashion-mnist`"
                                  if name == "fashion-mnist" else ""))
        ds = _load_cifar(name, data_dir, download) if name.startswith("cifar") else _load_fashion(data_dir,
                                                                                                download)
    if train_subset is not None or test_subset is not None:
        ds = ds.subset(train_subset, test_subset, seed=seed)
    return ds
