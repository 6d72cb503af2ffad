"""KernelModel API: fit / history, batches, persistence, bad input."""

from __future__ import annotations

import pytest
import torch

from eigenpro3 import CustomDataset, KernelModel, accuracy
from eigenpro3.kernels import laplacian
from eigenpro3.preconditioner import single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _blobs(n: int = 240, d: int = 6, c: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(c, d, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    X = means[labels] + torch.randn(n, d, generator=g)
    return X, labels


def _model(X, labels, **kw):
    Y = torch.nn.functional.one_hot(labels, 3).float()
    kw.setdefault("verbose", False)
    return KernelModel(3, X[:40], lambda x, z: laplacian(x, z, bandwidth=4.0), X=X, y=Y, **kw)


def test_seed_style_fit_returns_history_and_learns() -> None:
    Xa, la = _blobs(360)
    X, labels, Xt, lt = Xa[:240], la[:240], Xa[240:], la[240:]
    model = _model(X, labels)
    loader = torch.utils.data.DataLoader(CustomDataset(Xt, lt), batch_size=50)
    hist = model.fit(model.train_loaders, loader, score_fn=accuracy, epochs=3)
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert all(h["seconds"] > 0 for h in hist)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert hist[-1]["val_score"] >= 0.9
    assert accuracy(model(Xt), lt) == pytest.approx(hist[-1]["val_score"])
    # default score: mean squared error against one-hot targets
    mse = model.evaluate(loader)
    ref = (model.predict(Xt) - torch.nn.functional.one_hot(lt, 3)).pow(2).mean()
    assert mse == pytest.approx(float(ref), rel=1e-5)


def test_train_loaders_cover_data_and_reshuffle() -> None:
    X, labels = _blobs()
    model = _model(X, labels, batch_size=64)
    (loader,) = model.train_loaders
    first = torch.cat([xb for xb, _ in loader])
    second = torch.cat([xb for xb, _ in loader])
    assert [len(xb) for xb, _ in loader] == [64, 64, 64, 48]
    assert torch.equal(first.sort(0).values, X.sort(0).values)
    assert not torch.equal(first, second)


def test_fit_batch_equals_fit_epoch_on_same_batches() -> None:
    X, labels = _blobs()
    Y = torch.nn.functional.one_hot(labels, 3).float()
    a = _model(X, labels, projection="every")
    b = _model(X, labels, projection="every")
    batches = [(X[i : i + 80], Y[i : i + 80]) for i in range(0, 240, 80)]
    for xb, yb in batches:
        a.fit_batch(xb, yb)
    before = a.weights
    assert a.correction is not None  # on by default here: fit_epoch ends with it
    a.correct([batches])
    assert not torch.allclose(before, a.weights)
    b.fit_epoch([batches])
    torch.testing.assert_close(a.weights, b.weights)
    # integer labels are one-hot encoded
    c = _model(X, labels, projection="every")
    for i in range(0, 240, 80):
        c.fit_batch(X[i : i + 80], labels[i : i + 80])
    torch.testing.assert_close(before, c.weights)


def test_delayed_predict_includes_pending_temporaries() -> None:
    X, labels = _blobs()
    Y = torch.nn.functional.one_hot(labels, 3).float()
    model = _model(X, labels, projection="delayed", projection_interval=5)
    model.fit_batch(X[:60], Y[:60])
    assert len(model._temps_x) == 1
    before = model.predict(X[100:110])
    model.flush()
    assert not model._temps_x
    after = model.predict(X[100:110])
    # projection changes values off the centers but keeps them close
    assert (before - after).abs().max() < 0.5 * before.abs().max()


def test_save_load_round_trip(tmp_path) -> None:
    X, labels = _blobs()
    model = _model(X, labels)
    model.fit(epochs=2)
    path = tmp_path / "model.pt"
    model.save(path)
    other = _model(X, labels, seed=5)
    assert not torch.equal(other.predict(X), model.predict(X))
    other.load(path)
    assert torch.equal(other.predict(X), model.predict(X))
    third = KernelModel.from_file(path, lambda x, z: laplacian(x, z, bandwidth=4.0), verbose=False)
    assert torch.equal(third.predict(X), model.predict(X))
    state = model.state_dict()
    assert all(isinstance(v, (torch.Tensor, int, float)) for v in state.values())
    # training continues identically from the loaded state
    Y = torch.nn.functional.one_hot(labels, 3).float()
    model.fit_batch(X[:50], Y[:50])
    other.fit_batch(X[:50], Y[:50])
    torch.testing.assert_close(other.predict(X), model.predict(X))


def test_load_state_dict_rejects_other_centers() -> None:
    X, labels = _blobs()
    state = _model(X, labels).state_dict()
    Y = torch.nn.functional.one_hot(labels, 3).float()
    other = KernelModel(3, X[40:80], "laplacian", X=X, y=Y, bandwidth=4.0, verbose=False)
    with pytest.raises(ValueError, match="centers"):
        other.load_state_dict(state)
    del state["theta"]
    with pytest.raises(ValueError, match="missing keys"):
        other.load_state_dict(state)


def test_bad_input_errors_name_the_argument() -> None:
    X, labels = _blobs()
    Y = torch.nn.functional.one_hot(labels, 3).float()
    with pytest.raises(ValueError, match="X has 6 features but centers has 5"):
        KernelModel(3, X[:40, :5], "laplacian", X=X, y=Y)
    bad = X.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="X contains NaN or inf"):
        KernelModel(3, X[:40], "laplacian", X=bad, y=Y)
    badc = X[:40].clone()
    badc[0, 0] = float("inf")
    with pytest.raises(ValueError, match="centers contains NaN or inf"):
        KernelModel(3, badc, "laplacian")
    Yb = Y.clone()
    Yb[0, 0] = float("inf")
    with pytest.raises(ValueError, match="y contains NaN or inf"):
        KernelModel(3, X[:40], "laplacian", X=X, y=Yb)
    with pytest.raises(ValueError, match="Unknown kernel_fn 'rbf'"):
        KernelModel(3, X[:40], "rbf")
    with pytest.raises(ValueError, match="y has 2 columns but n_outputs=3"):
        KernelModel(3, X[:40], "laplacian", X=X, y=Y[:, :2])
    with pytest.raises(ValueError, match="n_outputs"):
        KernelModel(0, X[:40], "laplacian")
    with pytest.raises(ValueError, match="projection"):
        KernelModel(3, X[:40], "laplacian", projection="sometimes")
    model = _model(X, labels)
    with pytest.raises(ValueError, match="x has 4 features but centers has 6"):
        model.predict(X[:, :4])
    with pytest.raises(ValueError, match="x contains NaN"):
        model.fit_batch(bad[:10], Y[:10])
    with pytest.raises(ValueError, match="y has 5 rows but X has 10"):
        model.fit_batch(X[:10], Y[:5])


def test_non_psd_callable_is_rejected() -> None:
    X, _ = _blobs()

    def neg_distance(x, z):
        return -torch.cdist(x, z)

    with pytest.raises(ValueError, match="kernel_fn is not positive semidefinite"):
        KernelModel(3, X[:40], neg_distance)
    with pytest.raises(ValueError, match="kernel_fn is not positive semidefinite"):
        KernelModel(3, X[:40], lambda x, z: torch.tanh(x @ z.T - 2.0))


def test_too_little_memory_is_an_error() -> None:
    X, labels = _blobs()
    with pytest.raises(ValueError, match="memory_gb is too small"):
        _model(X, labels, memory_gb=1e-6)


def test_small_memory_budget_chunks_but_gives_same_result() -> None:
    X, labels = _blobs()
    Y = torch.nn.functional.one_hot(labels, 3).float()
    kw = dict(projection="every", cache=False, batch_size=80)
    big = _model(X, labels, **kw)
    small = _model(X, labels, memory_gb=5e-5, **kw)  # ~52 kB: blocks of a few rows
    assert small._budget < 6000  # 15 rows of 40 columns per block
    for i in range(0, 240, 80):
        big.fit_batch(X[i : i + 80], Y[i : i + 80])
        small.fit_batch(X[i : i + 80], Y[i : i + 80])
    torch.testing.assert_close(big.predict(X), small.predict(X), rtol=1e-4, atol=1e-5)


def test_beta_is_computed_from_the_kernel() -> None:
    X, _ = _blobs()
    model = KernelModel(3, X[:40], "ntk_relu", depth=2, verbose=False)
    assert model.nystrom.beta == pytest.approx(float(3 * X[:40].pow(2).sum(1).max()), rel=1e-5)


def test_float64_on_request_and_progress_bar(capsys) -> None:
    X, labels = _blobs()
    model = _model(X, labels, dtype=torch.float64, verbose=True)
    assert model.weights.dtype == torch.float64
    model.fit(epochs=1)
    err = capsys.readouterr()
    assert "epoch 1: train_loss=" in err.out + err.err
