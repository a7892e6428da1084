"""Datasets of the trainer: the embedded digits set, CIFAR pickle batches and idx files written here,
augmentation and rank-independent batching, missing-data messages, and the real Fashion-MNIST."""
import gzip
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch

from ebkernels import data
from ebkernels.data import DatasetError, iterate_batches, load_dataset, read_idx


# ------------------------------------------------------------------------------------ file writers
def write_cifar(folder, name="cifar10", n_per_batch=6, seed=0):
    """CIFAR python-pickle batches as the official archives hold them; returns (images, labels)."""
    rng = np.random.default_rng(seed)
    sub = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    os.makedirs(os.path.join(folder, sub), exist_ok=True)
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10" else ["train", "test"]
    key = b"labels" if name == "cifar10" else b"fine_labels"
    classes = 10 if name == "cifar10" else 100
    written = {}
    for f in files:
        n = n_per_batch * (5 if name == "cifar100" and f == "train" else 1)
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, size=n).tolist()
        d = {b"data": rows, key: labels, b"batch_label": f.encode()}
        if name == "cifar100":
            d[b"coarse_labels"] = [x // 5 for x in labels]
        with open(os.path.join(folder, sub, f), "wb") as fh:
            pickle.dump(d, fh)
        written[f] = (rows, labels)
    return sub, written


def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def write_fashion(folder, n_train=20, n_test=10, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte{suffix}"), images)
        write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte{suffix}"), labels)
        out[split] = (images, labels)
    return out


# ------------------------------------------------------------------------------------------ digits
def test_digits_is_embedded_real_data_with_a_fixed_split():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.train_images.shape == (1438, 1, 16, 16) and a.test_images.shape == (359, 1, 16, 16)
    assert a.train_images.dtype == torch.uint8 and a.num_classes == 10 and a.in_channels == 1
    assert torch.equal(a.train_labels, b.train_labels) and torch.equal(a.test_images, b.test_images)
    assert set(a.train_labels.tolist()) == set(range(10))
    assert a.crop_padding == 2 and not a.flip  # mirrored digits are other symbols
    sub = a.subset(100, 50, seed=3)
    assert len(sub.train_labels) == 100 and len(sub.test_labels) == 50
    assert torch.equal(sub.mean, a.mean)  # a subset keeps the full set's normalisation


# ------------------------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickle_batches_are_read_in_channel_major_order(tmp_path, name):
    sub, written = write_cifar(str(tmp_path), name)
    ds = load_dataset(name, data_dir=str(tmp_path), download=False)
    train_files = [f for f in written if f not in ("test_batch", "test")]
    rows = np.concatenate([written[f][0] for f in train_files])
    labels = sum((written[f][1] for f in train_files), [])
    assert ds.train_images.shape == (len(rows), 3, 32, 32) and ds.num_classes == (10 if name == "cifar10" else 100)
    # the 3072 bytes of a row are the R plane, then G, then B, each 32x32 row-major
    assert torch.equal(ds.train_images[1], torch.from_numpy(rows[1].reshape(3, 32, 32)))
    assert ds.train_labels.tolist() == labels
    test_rows = written["test_batch" if name == "cifar10" else "test"][0]
    assert torch.equal(ds.test_images.flatten(1), torch.from_numpy(test_rows))
    assert ds.crop_padding == 4 and ds.flip
    # data_dir may also point at the batches folder itself
    assert len(load_dataset(name, data_dir=str(tmp_path / sub), download=False).train_labels) == len(rows)


def test_cifar_archive_is_unpacked(tmp_path):
    src = tmp_path / "src"
    sub, _ = write_cifar(str(src), "cifar10", n_per_batch=2)
    dst = tmp_path / "dst"
    dst.mkdir()
    with tarfile.open(dst / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / sub, arcname=sub)
    ds = load_dataset("cifar10", data_dir=str(dst), download=False)
    assert len(ds.train_labels) == 10 and len(ds.test_labels) == 2


def test_cifar_missing_or_incomplete_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError, match=r"cifar10 not found .*cifar-10-python.tar.gz"):
        load_dataset("cifar10", data_dir=str(tmp_path), download=False)
    with pytest.raises(DatasetError, match="does not exist and downloads are off"):
        load_dataset("cifar100", data_dir=str(tmp_path / "nope"), download=False)
    sub, _ = write_cifar(str(tmp_path), "cifar10", n_per_batch=2)
    os.remove(tmp_path / sub / "data_batch_3")
    with pytest.raises(DatasetError, match="incomplete: missing .*data_batch_3"):
        load_dataset("cifar10", data_dir=str(tmp_path), download=False)
    with open(tmp_path / sub / "data_batch_3", "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(DatasetError, match="cannot read CIFAR batch file"):
        load_dataset("cifar10", data_dir=str(tmp_path), download=False)


# --------------------------------------------------------------------------------- idx / Fashion
@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_files_are_read_and_padded_to_32(tmp_path, gz):
    written = write_fashion(str(tmp_path), gz=gz)
    ds = load_dataset("fashion-mnist", data_dir=str(tmp_path), download=False)
    images, labels = written["train"]
    assert ds.train_images.shape == (20, 1, 32, 32) and ds.test_images.shape == (10, 1, 32, 32)
    assert torch.equal(ds.train_images[:, 0, 2:30, 2:30], torch.from_numpy(images))
    assert int(ds.train_images[:, :, :2].sum()) == 0 and int(ds.train_images[:, :, :, 30:].sum()) == 0
    assert ds.train_labels.tolist() == labels.tolist()
    assert ds.crop_padding == 4 and ds.flip


def test_read_idx_checks_the_header(tmp_path):
    p = str(tmp_path / "x-idx3-ubyte")
    write_idx(p, np.arange(24).reshape(2, 3, 4))
    assert read_idx(p).tolist() == np.arange(24).reshape(2, 3, 4).tolist()
    with open(p, "ab") as f:
        f.write(b"\0")
    with pytest.raises(DatasetError, match="header says"):
        read_idx(p)
    with open(p, "wb") as f:
        f.write(b"\x01\x02\x03\x04rest")
    with pytest.raises(DatasetError, match="not an idx file"):
        read_idx(p)


def test_fashion_mnist_missing_says_apt_get(tmp_path):
    write_fashion(str(tmp_path))
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DatasetError, match=r"missing t10k-labels-idx1-ubyte.*apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path), download=False)


def test_unknown_dataset_lists_the_accepted_names():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; accepted: digits, cifar10, cifar100, fashion-mnist"):
        load_dataset("mnist")


@pytest.mark.skipif(not os.path.isdir(data.DEBIAN_FASHION_MNIST),
                    reason="real Fashion-MNIST absent: `apt-get install dataset-fashion-mnist` installs it under "
                           "/usr/share/datasets/fashion-mnist")
def test_real_fashion_mnist_from_the_debian_package():
    ds = load_dataset("fashion-mnist")  # the Debian folder is the default --data-dir
    assert ds.train_images.shape == (60000, 1, 32, 32) and ds.test_images.shape == (10000, 1, 32, 32)
    assert torch.bincount(ds.train_labels).tolist() == [6000] * 10
    assert torch.bincount(ds.test_labels).tolist() == [1000] * 10
    assert 0.2 < float(ds.mean) < 0.35  # padded grey images, mostly dark background


# ------------------------------------------------------------------------------ batching / augment
def _tiny(n=24, size=8, pad=2, flip=True):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 10
    return data.ImageDataset("tiny", images, labels, images[:10].clone(), labels[:10].clone(), 10,
                             crop_padding=pad, flip=flip, mean=torch.zeros(1), std=torch.ones(1))


def test_augmentation_is_a_shifted_and_mirrored_copy():
    from torch.nn.functional import pad
    from torch.utils.data import DistributedSampler

    ds = _tiny()
    x = ds.train_images.float() / 255
    (xb, yb), = list(iterate_batches(ds, 24, train=True, epoch=3, seed=1))
    assert len(xb) == 24 and sorted(yb.tolist()) == sorted(ds.train_labels.tolist())
    offsets, flips = data._augment_params(24, 2, 1, 3)
    sampler = DistributedSampler(range(24), num_replicas=1, rank=0, shuffle=True, seed=1)
    sampler.set_epoch(3)
    order = list(iter(sampler))
    for pos in range(24):  # each sample: zero-pad 2, crop at its offset, mirror when drawn
        i = order[pos]
        dy, dx = offsets[i].tolist()
        expect = pad(x[i], (2, 2, 2, 2))[:, dy:dy + 8, dx:dx + 8]
        if flips[i]:
            expect = expect.flip(2)
        assert torch.allclose(xb[pos], expect) and yb[pos] == ds.train_labels[i]
    assert 0 < int(flips.sum()) < 24 and len(set(map(tuple, offsets.tolist()))) > 3
    # the same epoch and seed give the same crops; another epoch others
    again, = list(iterate_batches(ds, 24, train=True, epoch=3, seed=1))
    other, = list(iterate_batches(ds, 24, train=True, epoch=4, seed=1))
    assert torch.equal(again[0], xb) and not torch.equal(other[0], xb)


def test_batches_do_not_depend_on_the_number_of_processes():
    """Step i's batch of one process = the union of the ranks' step-i batches, same augmentation."""
    ds = _tiny(n=32)
    single = list(iterate_batches(ds, 8, train=True, epoch=2, seed=5))
    ranks = [list(iterate_batches(ds, 4, train=True, epoch=2, seed=5, rank=r, world_size=2)) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 4
    for step, (x, y) in enumerate(single):
        xs = torch.cat([ranks[0][step][0], ranks[1][step][0]])
        ys = torch.cat([ranks[0][step][1], ranks[1][step][1]])
        key = lambda xx: sorted(map(tuple, xx.flatten(1).tolist()))  # noqa: E731
        assert key(xs) == key(x) and sorted(ys.tolist()) == sorted(y.tolist())
    # test split: ranks take disjoint strided samples, together all of them once
    test = [torch.cat([y for _, y in iterate_batches(ds, 3, train=False, rank=r, world_size=2)]) for r in range(2)]
    assert sorted(torch.cat(test).tolist()) == sorted(ds.test_labels.tolist())


@pytest.mark.parametrize("n, batch, sizes", [(65, 64, [65]), (129, 64, [64, 65]), (66, 64, [64, 2]),
                                             (64, 64, [64]), (3, 2, [3]), (1, 8, [1])])
def test_a_last_training_batch_of_one_sample_joins_the_batch_before(n, batch, sizes):
    ds = _tiny(n=n)
    batches = [y for _, y in iterate_batches(ds, batch, train=True, epoch=1, seed=2)]
    assert [len(y) for y in batches] == sizes and data.num_batches(ds, batch, True) == len(sizes)
    assert sorted(torch.cat(batches).tolist()) == sorted(ds.train_labels.tolist())  # each sample once
    # evaluation batches stay as they are (BatchNorm in eval mode takes one sample)
    assert [len(y) for _, y in iterate_batches(ds, 9, train=False)] == ([9, 1] if n >= 10 else [n])


def test_normalisation_uses_training_statistics():
    ds = load_dataset("digits")
    x = torch.cat([xb for xb, _ in iterate_batches(ds, 512, train=True, augment=False)])
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2
