import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from optcore.data import SKLEARN_DATASETS, load_cifar10, load_mnist, load_sklearn, make_mnist1d


@pytest.mark.parametrize("name", SKLEARN_DATASETS)
def test_load_sklearn_shapes_split_and_determinism(name):
    from sklearn import datasets

    x_ref, y_ref = getattr(datasets, f"load_{name}")(return_X_y=True)
    split = load_sklearn(name, test_fraction=0.25, seed=3)
    assert split.x_train.shape[0] + split.x_test.shape[0] == x_ref.shape[0]
    assert split.x_test.shape[0] == round(0.25 * x_ref.shape[0])
    assert split.x_train.shape[1] == x_ref.shape[1]
    assert split.x_train.dtype == torch.float32
    if name == "diabetes":
        assert split.y_train.is_floating_point()
    else:
        assert split.y_train.dtype == torch.int64
        assert set(split.y_train.unique().tolist()) == set(np.unique(y_ref).tolist())
    # standardized with train statistics
    torch.testing.assert_close(
        split.x_train.mean(0), torch.zeros(x_ref.shape[1]), atol=1e-4, rtol=0
    )
    again = load_sklearn(name, test_fraction=0.25, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(split, again))
    other = load_sklearn(name, test_fraction=0.25, seed=4)
    assert not torch.equal(split.y_test, other.y_test) or not torch.equal(
        split.x_test, other.x_test
    )


def test_load_sklearn_constant_train_features_stay_bounded():
    # digits has pixels that are zero on (almost) every train image: standardizing
    # them must not turn a rare non-zero test pixel into a huge value.
    split = load_sklearn("digits", seed=0)
    constant = split.x_train.std(0) == 0
    assert constant.any()
    assert split.x_test.abs().max() < 100
    assert torch.isfinite(split.x_test).all()


def test_load_sklearn_unknown_name():
    with pytest.raises(ValueError, match="unknown dataset name 'mnist'"):
        load_sklearn("mnist")
    with pytest.raises(ValueError, match="test_fraction"):
        load_sklearn("wine", test_fraction=1.5)


def test_make_mnist1d_deterministic_balanced_and_learnable():
    a = make_mnist1d(2000, 500, seed=5)
    b = make_mnist1d(2000, 500, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a.x_train.shape == (2000, 40) and a.x_test.shape == (500, 40)
    counts = torch.bincount(torch.cat([a.y_train, a.y_test]), minlength=10)
    assert counts.min() == counts.max() == 250
    assert not torch.equal(make_mnist1d(20, 5, seed=6).x_train, make_mnist1d(20, 5, seed=5).x_train)

    # the classes carry signal: a least-squares linear classifier on
    # features + |features| beats chance (10%) clearly (real MNIST-1D: ~32%)
    def feats(x):
        return torch.cat([x, x.abs(), torch.ones(len(x), 1)], 1).double()

    W = torch.linalg.lstsq(
        feats(a.x_train), torch.nn.functional.one_hot(a.y_train, 10).double()
    ).solution
    acc = (feats(a.x_test) @ W).argmax(1).eq(a.y_test).double().mean()
    assert acc > 0.2
    with pytest.raises(ValueError, match="n_train"):
        make_mnist1d(0)


def _write_cifar(folder, n_per_batch=4):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, fh)
        written[name] = (data, labels)
    return written


def test_load_cifar10_reads_pickled_batches(tmp_path):
    written = _write_cifar(tmp_path / "cifar-10-batches-py")
    split = load_cifar10(tmp_path)  # parent folder works
    assert split.x_train.shape == (20, 3, 32, 32) and split.x_test.shape == (4, 3, 32, 32)
    data, labels = written["data_batch_2"]
    # pixel (channel 1, row 2, col 5) of the 2nd image of batch 2
    assert split.x_train[4 + 1, 1, 2, 5].item() == pytest.approx(data[1, 1024 + 2 * 32 + 5] / 255.0)
    assert split.y_train[4:8].tolist() == labels
    assert split.y_test.tolist() == written["test_batch"][1]
    same = load_cifar10(tmp_path / "cifar-10-batches-py")
    assert torch.equal(same.x_test, split.x_test)


def test_load_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10(tmp_path / "nope")
    (tmp_path / "c").mkdir()
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_cifar10(tmp_path / "c")


def _idx(array, code):
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + array.tobytes()


def test_load_mnist_reads_idx_files(tmp_path):
    rng = np.random.default_rng(1)
    xtr = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    ytr = rng.integers(0, 10, size=5, dtype=np.uint8)
    xte = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    yte = rng.integers(0, 10, size=3, dtype=np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(xtr, 0x08))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(ytr, 0x08))
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(_idx(xte, 0x08))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(yte, 0x08))
    split = load_mnist(tmp_path)
    assert split.x_train.shape == (5, 1, 28, 28)
    assert split.x_train[2, 0, 7, 9].item() == pytest.approx(xtr[2, 7, 9] / 255.0)
    assert split.y_train.tolist() == ytr.tolist() and split.y_test.tolist() == yte.tolist()
    assert split.x_test.shape == (3, 1, 28, 28)


def test_load_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        (tmp_path / name).write_bytes(_idx(np.zeros((2, 28, 28), np.uint8), 0x08))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x01\x02garbage")
    with pytest.raises(ValueError, match="bad magic"):
        load_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.zeros(3, np.uint8), 0x08))
    with pytest.raises(ValueError, match="labels"):
        load_mnist(tmp_path)  # label array is not 1-D of matching count
