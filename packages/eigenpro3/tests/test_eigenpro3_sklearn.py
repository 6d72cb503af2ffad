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


def test_read_only_input_is_used_as_is_without_a_warning() -> None:
    """Read-only float64 arrays (joblib memmaps) fit and predict like writable copies,
    stay unchanged, and raise no torch warning about non-writable memory."""
    import warnings

    rng = np.random.default_rng(1)
    X = rng.normal(size=(120, 3))
    y = np.cos(X[:, 0])
    ro_X, ro_y = X.copy(), y.copy()
    ro_X.setflags(write=False)
    ro_y.setflags(write=False)
    kw = dict(bandwidth=2.0, n_centers=40, epochs=3)
    want = KernelRegressor(**kw).fit(X, y).predict(X)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = KernelRegressor(**kw).fit(ro_X, ro_y).predict(ro_X)
    assert not [w for w in seen if "writable" in str(w.message)]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ro_X, X)
    np.testing.assert_array_equal(ro_y, y)


@parametrize_with_checks(
    [KernelRegressor(n_centers=50, epochs=3), KernelClassifier(n_centers=50, epochs=3)]
)
def test_sklearn_estimator_checks(estimator, check) -> None:
    with single_thread():
        check(estimator)
