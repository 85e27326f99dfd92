import gzip
import struct

import numpy as np
import pytest
import torch

from dcomp.data import load_dataset, read_idx
from dcomp.errors import DcompError, UsageError


def test_digits_is_embedded_with_a_fixed_split():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert len(a.x_train) + len(a.x_test) == 1797
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)
    assert 0.0 <= float(a.x_train.min()) and float(a.x_train.max()) <= 1.0


def test_resize_makes_28x28_digits():
    ds = load_dataset("digits", resize=28)
    assert ds.input_shape == (1, 28, 28)


def _write_idx(path, arr: np.ndarray, gz: bool):
    code = {np.uint8: 0x08}[arr.dtype.type]
    data = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(">u1").tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_directory_raw_and_gz(tmp_path, gz):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 12)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8), gz)
    ds = load_dataset(f"idx:{tmp_path}")
    assert ds.input_shape == (1, 28, 28) and len(ds.x_train) == 40 and len(ds.x_test) == 12
    assert ds.num_classes == 10 and float(ds.x_train.max()) <= 1.0


def test_idx_errors_are_one_line(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 10, 28, 28) + b"\x00" * 5)
    with pytest.raises(DcompError, match="IDX header says"):
        read_idx(bad)
    with pytest.raises(DcompError, match="not a directory"):
        load_dataset(f"idx:{tmp_path / 'nope'}")


def test_npz_with_and_without_test_arrays(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (50, 8, 8), dtype=np.uint8), np.arange(50) % 5
    np.savez(tmp_path / "a.npz", x=x, y=y)
    ds = load_dataset(f"npz:{tmp_path / 'a.npz'}")
    assert ds.input_shape == (1, 8, 8) and len(ds.x_train) + len(ds.x_test) == 50 and ds.num_classes == 5
    np.savez(tmp_path / "b.npz", x=rng.normal(size=(30, 6)), y=np.arange(30) % 3,
             x_test=rng.normal(size=(9, 6)), y_test=np.arange(9) % 3)
    ds = load_dataset(f"npz:{tmp_path / 'b.npz'}")
    assert ds.input_shape == (6,) and len(ds.x_test) == 9
    np.savez(tmp_path / "c.npz", images=x)
    with pytest.raises(DcompError, match="needs arrays 'x' and 'y'"):
        load_dataset(f"npz:{tmp_path / 'c.npz'}")


def test_synthetic_is_seeded_and_sized():
    a, b = load_dataset("synthetic:200"), load_dataset("synthetic:200")
    assert len(a.x_train) + len(a.x_test) == 200 and torch.equal(a.x_train, b.x_train)


@pytest.mark.parametrize("spec", ["mnist", "idx:", "synthetic:abc"])
def test_bad_specs_say_what_is_accepted(spec):
    with pytest.raises(UsageError):
        load_dataset(spec)


def test_digits_fast_path_equals_scikit_learn_loader():
    from sklearn.datasets import load_digits

    from dcomp.data import _split, _tensors

    d = load_digits()
    ref = _tensors("digits", *_split((d.images.astype(np.float32) / 16.0)[:, None], d.target), num_classes=10)
    ds = load_dataset("digits")
    assert torch.equal(ds.x_train, ref.x_train) and torch.equal(ds.y_train, ref.y_train)
    assert torch.equal(ds.x_test, ref.x_test) and torch.equal(ds.y_test, ref.y_test)
