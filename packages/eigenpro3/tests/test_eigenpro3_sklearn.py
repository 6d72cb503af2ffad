"""scikit-learn estimator wrappers: behaviour and scikit-learn's own checks."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn.utils.estimator_checks import parametrize_with_checks

from eigenpro3.preconditioner import single_thread
from eigenpro3.sklearn import KernelClassifier, KernelRegressor


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def test_classifier_on_digits() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, random_state=0)
    clf = KernelClassifier(bandwidth=5.0, n_centers=500, epochs=5).fit(Xtr, ytr)
    assert clf.score(Xte, yte) > 0.95
    assert set(clf.predict(Xte)) <= set(range(10))
    assert clf.get_params()["bandwidth"] == 5.0


def test_regressor_fits_smooth_function() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 3))
    y = np.sin(X[:, 0]) + 0.5 * X[:, 1]
    reg = KernelRegressor(kernel="gaussian", bandwidth=2.0, n_centers=100, epochs=10).fit(X, y)
    assert reg.predict(X).shape == (300,)
    assert reg.score(X, y) > 0.9


@parametrize_with_checks(
    [KernelRegressor(n_centers=50, epochs=3), KernelClassifier(n_centers=50, epochs=3)]
)
def test_sklearn_estimator_checks(estimator, check) -> None:
    with single_thread():
        check(estimator)
