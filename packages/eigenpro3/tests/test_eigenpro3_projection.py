"""Regression: long delayed projections with an inexact inner solve stay stable."""

from __future__ import annotations

import pytest
import torch

from eigenpro3 import KernelModel
from eigenpro3.kernels import laplacian
from eigenpro3.preconditioner import single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _mixture(n: int, d: int = 20, c: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = 0.35 * torch.randn(3 * c, d, generator=g)
    comp = torch.randint(0, 3 * c, (n,), generator=g)
    X = means[comp] + torch.randn(n, d, generator=g)
    return X, torch.nn.functional.one_hot(comp % c, c).float()


@pytest.mark.parametrize("cache", [True, False])
def test_delayed_projection_with_one_inner_epoch_does_not_diverge(cache: bool) -> None:
    # One inner epoch leaves K(Z, Z) theta = u far from solved; before the fix the
    # unchecked solve made the training loss explode across projections (epoch means
    # 4.3 -> 2.7e12). Now the exact residual is checked: more epochs, else Cholesky.
    X, Y = _mixture(2000)
    model = KernelModel(
        5,
        X[:300],
        "laplacian",
        X=X,
        y=Y,
        bandwidth=5.0,
        batch_size=100,
        projection="delayed",
        projection_interval=10,
        inner_max_epochs=1,
        inner_solver="eigenpro2",
        cache=cache,
        verbose=False,
    )
    losses = [model.fit_epoch(model.train_loaders) for _ in range(3)]
    assert losses[-1] < losses[0]
    assert losses[-1] <= 1.05 * min(losses)  # no rise across projections
    kxz = laplacian(X.double(), model.centers.centers.double(), 5.0)
    best = float((kxz @ torch.linalg.lstsq(kxz, Y.double()).solution - Y).pow(2).mean())
    mse = float((model.predict(X) - Y).pow(2).mean())
    assert best <= mse < 1.5 * best  # near the p-center least-squares minimizer
    # with the cache a Cholesky factor fits: the failing inner solve falls back to it
    assert model.projector.fallback == cache
    if cache:
        assert model.last_inner["rel_residual"] <= model.inner_tol


def test_inner_residual_check_runs_more_epochs_without_cholesky() -> None:
    X, Y = _mixture(1500, seed=1)
    model = KernelModel(
        5,
        X[:250],
        "laplacian",
        bandwidth=5.0,
        batch_size=100,
        projection="delayed",
        projection_interval=8,
        inner_max_epochs=1,
        cache=False,
        verbose=False,
    )
    for i in range(0, 800, 100):
        model.fit_batch(X[i : i + 100], Y[i : i + 100])
    info = model.last_inner
    assert info["epochs"] > 1  # kept iterating past inner_max_epochs
    kzz = laplacian(model.centers.centers, model.centers.centers, 5.0)
    rel = float((kzz @ model.theta - model.u).norm() / model.u.norm())
    assert rel <= 1.01 * max(model.inner_tol, info["rel_residual"])
    assert not model.projector.fallback  # no cache: no Cholesky fallback
