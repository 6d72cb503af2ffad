"""Scores and data sets in the form the EigenPro3 example expects.

``load_dataset(name)`` returns ``(n_classes, (X_train, y_train), (X_test, y_test))``
with flattened float inputs and one-hot float targets.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from optcore.data import Split, load_cifar10, load_mnist, load_sklearn, make_mnist1d

__all__ = ["DATASETS", "accuracy", "load_dataset", "mse"]

DATASETS = ("digits", "mnist1d", "cifar10", "mnist")


def _labels(t: Tensor) -> Tensor:
    return t.argmax(-1) if t.dim() == 2 and t.shape[-1] > 1 else t.reshape(-1).long()


def accuracy(predictions: Tensor, targets: Tensor) -> float:
    """Fraction of rows whose arg-max prediction equals the label.

    ``targets`` may be integer labels (n,) or one-hot rows (n, c).
    """
    if predictions.shape[0] != targets.shape[0]:
        raise ValueError(
            f"predictions has {predictions.shape[0]} rows but targets has {targets.shape[0]}"
        )
    pred = predictions.argmax(-1) if predictions.dim() == 2 else predictions.round().long()
    return float((pred.cpu() == _labels(targets).cpu()).float().mean())


def mse(predictions: Tensor, targets: Tensor) -> float:
    """Mean squared error over all entries (targets reshaped like the predictions)."""
    return float((predictions - targets.reshape(predictions.shape).to(predictions)).pow(2).mean())


def _data_dir(data_dir: str | Path | None, name: str, expected: str) -> Path:
    root = data_dir if data_dir is not None else os.environ.get("DATA_DIR")
    if not root:
        raise FileNotFoundError(
            f"load_dataset({name!r}) reads {expected} from $DATA_DIR (or data_dir=...), "
            "but DATA_DIR is not set"
        )
    return Path(root)


def _one_hot(split: Split, n_classes: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    def flat(x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1).float()

    def hot(y: Tensor) -> Tensor:
        return torch.nn.functional.one_hot(y.long(), n_classes).float()

    return (flat(split.x_train), hot(split.y_train)), (flat(split.x_test), hot(split.y_test))


def load_dataset(
    name: str, *, data_dir: str | Path | None = None, seed: int = 0
) -> tuple[int, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Load a classification data set with one-hot targets.

    Args:
        name: ``"digits"`` (scikit-learn's bundled 8x8 digits, pixels in [0, 1]),
            ``"mnist1d"`` (MNIST-1D-style procedural signals), ``"cifar10"``
            (``cifar-10-batches-py`` pickles) or ``"mnist"`` (the four IDX files),
            the last two read from ``data_dir`` or ``$DATA_DIR``.
        data_dir: directory of the on-disk data sets (default ``$DATA_DIR``).
        seed: seed of the split / generator.

    Returns:
        ``(n_classes, (X_train, y_train), (X_test, y_test))``; inputs (n, d) float32,
        targets (n, n_classes) one-hot float32.

    Raises:
        ValueError: for an unknown ``name``. FileNotFoundError: naming the
            expected files when they are absent.
    """
    if name == "digits":
        raw = load_sklearn("digits", seed=seed, standardize=False)
        split = Split(raw.x_train / 16.0, raw.y_train, raw.x_test / 16.0, raw.y_test)
        n_classes = 10
    elif name == "mnist1d":
        split = make_mnist1d(seed=seed)
        n_classes = 10
    elif name == "cifar10":
        root = _data_dir(
            data_dir, name, "the 'cifar-10-batches-py' folder (data_batch_1..5, test_batch)"
        )
        split = load_cifar10(root)
        n_classes = 10
    elif name == "mnist":
        root = _data_dir(
            data_dir,
            name,
            "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            "t10k-labels-idx1-ubyte (plain or .gz)",
        )
        split = load_mnist(root)
        n_classes = 10
    else:
        raise ValueError(f"Unknown dataset name {name!r}; expected one of {DATASETS}")
    train, test = _one_hot(split, n_classes)
    return n_classes, train, test
