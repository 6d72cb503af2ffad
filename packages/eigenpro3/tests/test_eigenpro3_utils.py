"""utils (accuracy, load_dataset) and datasets.CustomDataset."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from eigenpro3 import CustomDataset
from eigenpro3.datasets import batch_loader
from eigenpro3.utils import accuracy, load_dataset, mse


def test_accuracy_with_labels_and_one_hot() -> None:
    pred = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 1, 1])
    assert accuracy(pred, labels) == 0.75
    assert accuracy(pred, torch.nn.functional.one_hot(labels, 2).float()) == 0.75
    with pytest.raises(ValueError, match="predictions has 4 rows but targets has 3"):
        accuracy(pred, labels[:3])
    assert mse(torch.zeros(2, 2), torch.ones(2, 2)) == 1.0


@pytest.mark.parametrize("name", ["digits", "mnist1d"])
def test_builtin_datasets_are_one_hot(name: str) -> None:
    n_classes, (X, y), (Xt, yt) = load_dataset(name)
    assert n_classes == 10
    assert X.dim() == 2 and X.shape[1] == Xt.shape[1]
    assert y.shape == (len(X), 10) and torch.equal(y.sum(1), torch.ones(len(X)))
    assert set(yt.argmax(1).tolist()) == set(range(10))


def test_unknown_dataset_and_missing_files(tmp_path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="Unknown dataset name 'svhn'"):
        load_dataset("svhn")
    monkeypatch.delenv("DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset("mnist")
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_dataset("cifar10")


def test_cifar10_from_data_dir(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            b"labels": list(range(4)),
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    n_classes, (X, _), (Xt, yt) = load_dataset("cifar10")
    assert n_classes == 10 and X.shape == (20, 3072) and Xt.shape == (4, 3072)
    assert torch.equal(yt.argmax(1), torch.arange(4))
    assert float(X.max()) <= 1.0


def test_custom_dataset_and_batch_loader() -> None:
    X, y = torch.arange(20.0).reshape(10, 2), torch.arange(10)
    ds = CustomDataset(X, y)
    assert len(ds) == 10
    xb, yb = ds[[1, 3]]
    assert torch.equal(xb, X[[1, 3]]) and torch.equal(yb, y[[1, 3]])
    assert torch.equal(ds[4][0], X[4])
    with pytest.raises(ValueError, match="X has 10 rows but y has 9"):
        CustomDataset(X, y[:9])
    loader = batch_loader(X, y, 4, shuffle=False)
    assert [len(b[0]) for b in loader] == [4, 4, 2]
    # works with torch's DataLoader as in the seed example
    dl = torch.utils.data.DataLoader(ds, batch_size=3)
    assert torch.equal(torch.cat([b[1] for b in dl]), y)
