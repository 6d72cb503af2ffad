"""The once-per-epoch model-space correction against exact least squares."""

from __future__ import annotations

import pytest
import torch

from eigenpro3 import KernelModel
from eigenpro3.correction import covers_centers, match_rows
from eigenpro3.kernels import laplacian
from eigenpro3.preconditioner import single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _problem(n: int = 300, p: int = 30, d: int = 5, c: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.sin(X[:, :c] * 2) + 0.1 * torch.randn(n, c, generator=g, dtype=torch.float64)
    Z = X[torch.randperm(n, generator=g)[:p]].clone()
    return X, y, Z


def _model(X, y, Z, **kw):
    kw.setdefault("verbose", False)
    return KernelModel(y.shape[1], Z, "laplacian", X=X, y=y, bandwidth=2.0, **kw)


def test_match_rows_finds_exact_duplicates_only() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(20, 4, generator=g)
    x = torch.cat([z[[3, 7, 7, 19]], torch.randn(5, 4, generator=g), z[:1] + 1e-6])
    got = match_rows(x, z, chunk=3)
    assert got.tolist() == [3, 7, 7, 19, -1, -1, -1, -1, -1, -1]
    # 3 distinct matched centers + min(sample, 6 other rows) against p = 9
    assert covers_centers(got, 9, 17) and not covers_centers(got, 9, 5)


def test_full_sample_step_lands_on_lstsq_minimizer() -> None:
    # every non-center row sampled: M is the exact Hessian, the line search exact (t = 1),
    # so one correction step from wherever the epoch ended is the minimizer
    X, y, Z = _problem()
    exact = torch.linalg.lstsq(laplacian(X, Z, 2.0), y).solution
    model = _model(X, y, Z, correction=True, correction_sample=len(X))
    assert model.correction is not None
    assert int(model.correction.count.sum()) == len(Z)
    model.fit_epoch([[(X[:100], y[:100]), (X[100:], y[100:])]])
    err = float((model.weights - exact).norm() / exact.norm())
    assert err < 1e-6


def test_full_sample_step_matches_ridge_closed_form() -> None:
    X, y, Z = _problem()
    lam = 1e-3
    kxz, kzz = laplacian(X, Z, 2.0), laplacian(Z, Z, 2.0)
    exact = torch.linalg.solve(kxz.T @ kxz + len(X) * lam * kzz, kxz.T @ y)
    model = _model(X, y, Z, ridge=lam, correction=True, correction_sample=len(X))
    model.fit_epoch([[(X, y)]])
    assert float((model.weights - exact).norm() / exact.norm()) < 1e-6


def test_sampled_correction_keeps_fixed_point_and_speeds_up() -> None:
    # a sample of 40 of the 270 non-center rows: M is only an estimate, the
    # iteration still converges to the exact minimizer, faster than without
    X, y, Z = _problem()
    exact = torch.linalg.lstsq(laplacian(X, Z, 2.0), y).solution
    batches = [[(X[i : i + 60], y[i : i + 60]) for i in range(0, len(X), 60)]]
    errs = {}
    for corr in (True, False):
        model = _model(X, y, Z, correction=corr, correction_sample=40, batch_size=60)
        assert (model.correction is not None) == corr
        curve = []
        for _ in range(3):
            model.fit_epoch(batches)
            curve.append(float((model.weights - exact).norm() / exact.norm()))
        errs[corr] = curve
    assert errs[True][-1] < 0.2 * errs[False][-1]
    # full batches (no SGD noise): the fixed point is the minimizer to 1e-3 relative
    model = _model(X, y, Z, correction=True, correction_sample=40, batch_size=len(X))
    for _ in range(40):
        model.fit_epoch([[(X, y)]])
        info = model.correct([[(X, y)]])
        assert info is not None and 0.0 <= info["step"] <= 1.0
    assert float((model.weights - exact).norm() / exact.norm()) < 1e-3


def test_auto_needs_centers_covered_and_bad_arguments() -> None:
    X, y, Z = _problem()
    assert _model(X, y, Z).correction is not None  # centers are training rows
    far = Z + 10.0  # no center is a training row and 10 sampled rows < p = 30
    assert _model(X, y, far, correction_sample=10).correction is None
    assert _model(X, y, Z, correction=False).correction is None
    with pytest.raises(ValueError, match="correction"):
        _model(X, y, Z, correction="yes")
    with pytest.raises(ValueError, match="correction_sample"):
        _model(X, y, Z, correction_sample=0)
    with pytest.raises(ValueError, match="correction=True needs X"):
        KernelModel(2, Z, "laplacian", bandwidth=2.0, correction=True, verbose=False)
    with pytest.raises(ValueError, match="correction=True needs the cached"):
        _model(X, y, Z, correction=True, cache=False)


def test_variance_reduced_full_batch_step_equals_plain_step() -> None:
    # one batch of all rows: K(Z, X)(f - f~) + n g~ = K(Z, X)(f - y) exactly
    X, y, Z = _problem()
    models = [
        _model(X, y, Z, batch_size=len(X), variance_reduction=vr, projection="every")
        for vr in (True, False)
    ]
    for model in models:
        for _ in range(3):
            model.fit_epoch(model.train_loaders)
    assert models[0]._snapshot is not None and models[1]._snapshot is None
    torch.testing.assert_close(models[0].weights, models[1].weights, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("projection", ["every", "delayed"])
def test_variance_reduced_minibatches_converge_to_lstsq(projection: str) -> None:
    # without the SGD noise floor, minibatch epochs reach the exact minimizer
    X, y, Z = _problem()
    exact = torch.linalg.lstsq(laplacian(X, Z, 2.0), y).solution
    errs, models = {}, {}
    for vr in (True, False):
        models[vr] = model = _model(
            X,
            y,
            Z,
            batch_size=60,
            correction_sample=40,
            variance_reduction=vr,
            projection=projection,
            projection_interval=3,
        )
        for _ in range(12):
            model.fit_epoch(model.train_loaders)
        errs[vr] = float((model.weights - exact).norm() / exact.norm())
    assert errs[True] < 1e-3, errs
    assert errs[True] < 0.1 * errs[False], errs
    # other loaders than the snapshot's: plain steps (the snapshot gradient is not theirs)
    model = models[True]
    model._begin_epoch(model.train_loaders)
    assert model._vr_loaders is not None
    model._begin_epoch([[(X, y)]])
    assert model._vr_loaders is None
