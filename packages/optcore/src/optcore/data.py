"""Offline data: scikit-learn's bundled sets, an MNIST-1D-style generator, and
loaders for CIFAR-10 (``cifar-10-batches-py`` pickles) and MNIST (IDX files).

Nothing here downloads: the file loaders read a directory the user provides
and name the files they expected when something is missing.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SKLEARN_DATASETS",
    "Split",
    "load_cifar10",
    "load_mnist",
    "load_sklearn",
    "make_mnist1d",
]

SKLEARN_DATASETS = ("digits", "breast_cancer", "wine", "diabetes")


class Split(NamedTuple):
    """A fixed train/test split of tensors."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def _split(x: Tensor, y: Tensor, test_fraction: float, seed: int) -> Split:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(n * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return Split(x[train], y[train], x[test], y[test])


def load_sklearn(
    name: str,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    standardize: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Split:
    """One of scikit-learn's bundled data sets as tensors with a fixed split.

    Args:
        name: ``"digits"``, ``"breast_cancer"``, ``"wine"`` or ``"diabetes"``.
        test_fraction: share of examples in the test split.
        seed: seeds the split (same seed, same split).
        standardize: scale features to zero mean, unit variance (train statistics).
        dtype: floating dtype of the features (and of diabetes' regression targets).

    Returns:
        ``Split``; classification labels are ``int64`` class indices.

    Raises:
        ValueError: for an unknown ``name``.
        ImportError: when scikit-learn is not installed.
    """
    if name not in SKLEARN_DATASETS:
        raise ValueError(f"unknown dataset name {name!r}; expected one of {SKLEARN_DATASETS}")
    try:
        from sklearn import datasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_sklearn needs scikit-learn: install it (e.g. the optcore[data] extra)"
        ) from exc
    loader = getattr(datasets, f"load_{name}")
    x_np, y_np = loader(return_X_y=True)
    x = torch.as_tensor(np.asarray(x_np), dtype=dtype)
    if name == "diabetes":
        y = torch.as_tensor(np.asarray(y_np), dtype=dtype)
    else:
        y = torch.as_tensor(np.asarray(y_np), dtype=torch.int64)
    split = _split(x, y, test_fraction, seed)
    if standardize:
        mean = split.x_train.mean(0)
        std = split.x_train.std(0)
        # Features constant on the train split (digits' border pixels) are only
        # centred: dividing by a ~0 std would blow test values up to ~1e9.
        std = torch.where(std > 1e-6 * (1.0 + mean.abs()), std, torch.ones_like(std))
        split = Split(
            (split.x_train - mean) / std, split.y_train, (split.x_test - mean) / std, split.y_test
        )
    return split


# Ten 1-D templates (one per class), in the spirit of MNIST-1D: short
# piecewise-linear shapes that the generator pads, scales, shifts, shears and
# corrupts with noise.
_TEMPLATES = torch.tensor(
    [
        [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],
        [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
        [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],
        [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
        [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],
        [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
        [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],
        [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
    ],
    dtype=torch.float64,
)


def _interpolate(signal: Tensor, length: int) -> Tensor:
    """Linear interpolation of each row of ``signal`` onto ``length`` points."""
    src = signal.shape[-1]
    pos = torch.linspace(0, src - 1, length, dtype=signal.dtype)
    lo = pos.floor().long().clamp(max=src - 2)
    frac = pos - lo
    return signal[..., lo] * (1 - frac) + signal[..., lo + 1] * frac


def make_mnist1d(
    n_train: int = 4000,
    n_test: int = 1000,
    *,
    length: int = 40,
    seed: int = 0,
    noise: float = 0.25,
    dtype: torch.dtype = torch.float32,
) -> Split:
    """Procedurally generated MNIST-1D-style classification data (10 classes).

    Each example is its class template, padded, randomly scaled, sheared and
    circularly shifted, plus smooth correlated noise and white noise, then
    resampled to ``length`` points. Fully determined by ``seed``.

    Returns:
        ``Split`` with features ``(n, length)`` and ``int64`` labels.
    """
    for arg, v in (("n_train", n_train), ("n_test", n_test), ("length", length)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg} must be a positive integer, got {v!r}")
    if not noise >= 0:
        raise ValueError(f"noise must be non-negative, got {noise}")
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    y = torch.arange(n) % 10
    y = y[torch.randperm(n, generator=g)]
    base = _TEMPLATES[y] - 5.0  # (n, 12), centred at zero
    base = torch.nn.functional.pad(base, (12, 12))  # (n, 36)
    width = base.shape[1]
    scale = 1.0 + 0.3 * (torch.rand(n, 1, generator=g, dtype=torch.float64) - 0.5)
    x = _interpolate(base, width) * scale
    shear = 0.75 * (torch.rand(n, 1, generator=g, dtype=torch.float64) - 0.5)
    x = x + shear * torch.linspace(-1, 1, width, dtype=torch.float64)
    shifts = torch.randint(0, width, (n,), generator=g)
    idx = (torch.arange(width).unsqueeze(0) - shifts.unsqueeze(1)) % width
    x = torch.gather(x, 1, idx)
    smooth = torch.randn(n, 6, generator=g, dtype=torch.float64)
    x = x + noise * 2.0 * _interpolate(smooth, width)
    x = _interpolate(x, length) + noise * torch.randn(n, length, generator=g, dtype=torch.float64)
    x = x.to(dtype)
    return Split(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def _require_dir(root: str | Path, arg: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{arg}: directory {str(path)!r} does not exist")
    return path


_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def load_cifar10(root: str | Path, *, dtype: torch.dtype = torch.float32) -> Split:
    """CIFAR-10 from the ``cifar-10-batches-py`` pickles under ``root``.

    ``root`` may be the ``cifar-10-batches-py`` folder itself or its parent.
    Images come back as ``(n, 3, 32, 32)`` in ``[0, 1]``, labels as ``int64``.

    Raises:
        FileNotFoundError: naming the missing folder or batch files.
        ValueError: if a batch file is malformed.
    """
    path = _require_dir(root, "root")
    if (path / "cifar-10-batches-py").is_dir():
        path = path / "cifar-10-batches-py"
    missing = [f for f in _CIFAR_FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 files missing in {str(path)!r}: {missing}; expected the "
            f"'cifar-10-batches-py' folder with {_CIFAR_FILES}"
        )

    def read(name: str) -> tuple[Tensor, Tensor]:
        with open(path / name, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        if not isinstance(batch, dict):
            raise ValueError(f"{name}: expected a pickled dict, got {type(batch).__name__}")
        data = batch.get(b"data", batch.get("data"))
        labels = batch.get(b"labels", batch.get("labels"))
        if data is None or labels is None:
            raise ValueError(f"{name}: missing 'data' or 'labels'")
        arr = np.asarray(data, dtype=np.uint8)
        if arr.ndim != 2 or arr.shape[1] != 3072 or arr.shape[0] != len(labels):
            raise ValueError(f"{name}: data must be (n, 3072) with n labels, got {arr.shape}")
        x = torch.from_numpy(arr.reshape(-1, 3, 32, 32).copy()).to(dtype) / 255.0
        return x, torch.as_tensor(np.asarray(labels), dtype=torch.int64)

    train = [read(f) for f in _CIFAR_FILES[:-1]]
    x_test, y_test = read("test_batch")
    return Split(torch.cat([t[0] for t in train]), torch.cat([t[1] for t in train]), x_test, y_test)


_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a NumPy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path.name}: not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = _IDX_DTYPES[raw[2]]
    count = int(np.prod(dims)) if dims else 1
    body = raw[4 + 4 * ndim :]
    if len(body) != count * dtype.itemsize:
        raise ValueError(f"{path.name}: header says {dims} but the file holds {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def load_mnist(root: str | Path, *, dtype: torch.dtype = torch.float32) -> Split:
    """MNIST (or Fashion-MNIST) from the four IDX files under ``root``.

    Files may be plain or ``.gz``. Images come back as ``(n, 1, 28, 28)`` in
    ``[0, 1]``, labels as ``int64``.

    Raises:
        FileNotFoundError: naming the missing folder or files.
        ValueError: if a file is malformed or images and labels disagree in count.
    """
    path = _require_dir(root, "root")
    found: dict[str, Path] = {}
    for key, name in _MNIST_FILES.items():
        for candidate in (path / name, path / f"{name}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
    missing = [name for key, name in _MNIST_FILES.items() if key not in found]
    if missing:
        raise FileNotFoundError(
            f"MNIST files missing in {str(path)!r}: {missing} (plain or .gz IDX files)"
        )
    arrays = {k: read_idx(p) for k, p in found.items()}
    for split in ("train", "test"):
        xs, ys = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if xs.ndim != 3 or ys.ndim != 1 or xs.shape[0] != ys.shape[0]:
            raise ValueError(f"MNIST {split}: images {xs.shape} and labels {ys.shape} do not match")

    def images(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a.astype(np.float32)).unsqueeze(1).to(dtype) / 255.0

    def labels(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return Split(
        images(arrays["x_train"]),
        labels(arrays["y_train"]),
        images(arrays["x_test"]),
        labels(arrays["y_test"]),
    )
