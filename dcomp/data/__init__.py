"""Datasets, named by a spec string (``--data``).

    digits           scikit-learn's bundled 8x8 handwritten digits (the embedded default)
    idx:DIR          MNIST-format IDX files in DIR (raw or .gz)
    npz:FILE         arrays x, y (and optionally x_test, y_test)
    synthetic[:N]    seeded Gaussian class clusters, for tests

Every dataset is held in memory as float32 tensors shaped (N, C, H, W) for images or
(N, D) for flat features, with int64 labels. ``resize`` rescales images to HxH
(bilinear), so a 28x28 model can train on 8x8 digits.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dcomp.errors import DcompError, UsageError

# The split of digits (and of npz files without a test part) never depends on --seed:
# every run, every stage and every rank must see the same test set.
SPLIT_SEED = 20240601
TEST_FRACTION = 0.2


@dataclass
class Dataset:
    spec: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def split_validation(self, fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Carve a fixed validation part off the training set: (x_train, y_train, x_val, y_val)."""
        n = len(self.x_train)
        n_val = max(1, int(round(n * fraction)))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED + 1))
        val, tr = perm[:n_val], perm[n_val:]
        return self.x_train[tr], self.y_train[tr], self.x_train[val], self.y_train[val]

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "train": len(self.x_train),
            "test": len(self.x_test),
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
        }


def load_dataset(spec: str = "digits", resize: int | None = None) -> Dataset:
    """Load a dataset by spec string; see the module docstring."""
    kind, _, arg = spec.partition(":")
    if kind == "digits":
        ds = _digits()
    elif kind == "idx":
        if not arg:
            raise UsageError("--data idx:DIR needs a directory, e.g. idx:./mnist")
        ds = _idx(Path(arg))
    elif kind == "npz":
        if not arg:
            raise UsageError("--data npz:FILE needs a file, e.g. npz:data.npz")
        ds = _npz(Path(arg))
    elif kind == "synthetic":
        n = 512
        if arg:
            try:
                n = int(arg)
            except ValueError:
                raise UsageError(f"--data synthetic:N needs an integer N, got {arg!r}") from None
        ds = synthetic(n)
    else:
        raise UsageError(f"unknown dataset {spec!r}: use digits, idx:DIR, npz:FILE or synthetic[:N]")
    ds.spec = spec
    if resize is not None:
        ds = _resize(ds, resize)
    return ds


def _split(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    n_test = int(round(len(x) * TEST_FRACTION))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def _tensors(spec: str, xtr, ytr, xte, yte, num_classes: int | None = None) -> Dataset:
    ytr = np.asarray(ytr).astype(np.int64)
    yte = np.asarray(yte).astype(np.int64)
    if num_classes is None:
        num_classes = int(max(ytr.max(initial=0), yte.max(initial=0)) + 1)
    return Dataset(
        spec=spec,
        x_train=torch.from_numpy(np.ascontiguousarray(xtr, dtype=np.float32)),
        y_train=torch.from_numpy(ytr),
        x_test=torch.from_numpy(np.ascontiguousarray(xte, dtype=np.float32)),
        y_test=torch.from_numpy(yte),
        num_classes=num_classes,
    )


def _digits() -> Dataset:
    """scikit-learn's bundled copy of the UCI digits (no download). Read straight from its
    digits.csv.gz (64 pixel values 0..16, then the label per row): importing sklearn.datasets
    costs more than a second in every command."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is not None and path.is_file():
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        images, target = table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(np.int64)
    else:  # a future layout: go through the public API
        from sklearn.datasets import load_digits

        d = load_digits()
        images, target = d.images.astype(np.float32), d.target
    x = (images / 16.0)[:, None, :, :]  # (N, 1, 8, 8) in [0, 1]
    return _tensors("digits", *_split(x, target), num_classes=10)


def synthetic(n: int = 512, shape: tuple[int, ...] = (1, 8, 8), classes: int = 10, seed: int = 0) -> Dataset:
    """Learnable Gaussian clusters: each class has its own mean image."""
    if n < 2 * classes:
        raise UsageError(f"synthetic dataset needs at least {2 * classes} samples, got {n}")
    g = np.random.default_rng(seed)
    means = g.normal(0.0, 1.0, size=(classes, *shape)).astype(np.float32)
    y = np.arange(n) % classes
    g.shuffle(y)
    x = means[y] + 0.7 * g.normal(size=(n, *shape)).astype(np.float32)
    return _tensors("synthetic", *_split(x, y), num_classes=classes)


def _open_maybe_gz(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DcompError(f"{path}: corrupt gzip file ({e})") from None
    return data


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (MNIST format): magic 0 0 dtype ndim, big-endian u32 dims, data."""
    data = _open_maybe_gz(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DcompError(f"{path}: not an IDX file (bad magic)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = data[2], data[3]
    if code not in dtypes:
        raise DcompError(f"{path}: unknown IDX data type 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DcompError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dt = np.dtype(dtypes[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dt.itemsize
    if len(data) - header != expected:
        raise DcompError(f"{path}: IDX header says {expected} data bytes, file has {len(data) - header}")
    return np.frombuffer(data, dtype=dt, offset=header).reshape(dims)


def _find(dir_: Path, stems: list[str]) -> Path:
    for stem in stems:
        for suffix in ("", ".gz"):
            p = dir_ / (stem + suffix)
            if p.exists():
                return p
    raise DcompError(f"{dir_}: no {stems[0]}[.gz] file (expected MNIST-format IDX files)")


def _idx(dir_: Path) -> Dataset:
    if not dir_.is_dir():
        raise DcompError(f"{dir_}: not a directory (idx:DIR wants a folder of MNIST IDX files)")
    xtr = read_idx(_find(dir_, ["train-images-idx3-ubyte", "train-images.idx3-ubyte"]))
    ytr = read_idx(_find(dir_, ["train-labels-idx1-ubyte", "train-labels.idx1-ubyte"]))
    xte = read_idx(_find(dir_, ["t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"]))
    yte = read_idx(_find(dir_, ["t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"]))
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise DcompError(f"{dir_}: image and label counts differ")
    scale = 255.0 if xtr.dtype == np.uint8 else 1.0
    xtr = xtr.astype(np.float32)[:, None] / scale
    xte = xte.astype(np.float32)[:, None] / scale
    return _tensors("idx", xtr, ytr, xte, yte)


def _npz(path: Path) -> Dataset:
    if not path.is_file():
        raise DcompError(f"{path}: no such file")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises many kinds for a bad file
        raise DcompError(f"{path}: not a readable .npz file ({e})") from None
    if "x" not in z or "y" not in z:
        raise DcompError(f"{path}: needs arrays 'x' and 'y' (found {sorted(z.files)})")
    x, y = z["x"], z["y"]
    scale = 255.0 if x.dtype == np.uint8 else 1.0

    def prep(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float32) / scale
        return a[:, None] if a.ndim == 3 else a  # (N, H, W) -> (N, 1, H, W)

    if "x_test" in z and "y_test" in z:
        return _tensors("npz", prep(x), y, prep(z["x_test"]), z["y_test"])
    return _tensors("npz", *_split(prep(x), y))


def _resize(ds: Dataset, size: int) -> Dataset:
    if size < 1:
        raise UsageError(f"--resize must be a positive integer, got {size}")
    if ds.x_train.dim() != 4:
        raise UsageError(f"--resize needs image data (N, C, H, W); {ds.spec} has shape {list(ds.input_shape)}")

    def r(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)

    return Dataset(ds.spec, r(ds.x_train), ds.y_train, r(ds.x_test), ds.y_test, ds.num_classes)
