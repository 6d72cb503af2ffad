"""scikit-learn estimators around :class:`eigenpro3.models.KernelModel`.

Needs the optional ``sklearn`` extra (``pip install eigenpro3[sklearn]``).
``KernelRegressor`` fits ``f(x) = sum_j alpha_j K(x, z_j)`` to real targets;
``KernelClassifier`` fits one-hot targets and predicts the arg-max class.
Centers are a random subset of the training inputs (``n_centers`` of them).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "eigenpro3.sklearn needs scikit-learn: install the 'sklearn' extra of eigenpro3"
    ) from err

from eigenpro3.models import KernelModel

__all__ = ["KernelClassifier", "KernelRegressor"]


class _KernelBase(BaseEstimator):
    def __init__(
        self,
        kernel: str = "laplacian",
        bandwidth: float | None = None,
        n_centers: int = 1000,
        epochs: int = 10,
        ridge: float = 0.0,
        batch_size: int | None = None,
        random_state: int = 0,
        verbose: bool = False,
    ) -> None:
        self.kernel = kernel
        self.bandwidth = bandwidth
        self.n_centers = n_centers
        self.epochs = epochs
        self.ridge = ridge
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose

    def _fit_targets(self, X: np.ndarray, Y: np.ndarray) -> Any:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.n_centers < 1:
            raise ValueError(f"n_centers must be >= 1, got {self.n_centers}")
        Xt, Yt = _tensor(X), _tensor(Y)
        if Yt.dim() == 1:
            Yt = Yt.unsqueeze(1)
        n = Xt.shape[0]
        gen = torch.Generator().manual_seed(int(self.random_state))
        p = min(self.n_centers, n)
        centers = Xt[torch.randperm(n, generator=gen)[:p]]
        bandwidth = self.bandwidth
        if bandwidth is None:  # median distance between centers
            dist = torch.cdist(centers[:500], centers[:500])
            off = dist[~torch.eye(len(dist), dtype=torch.bool)]
            bandwidth = float(off.median()) if off.numel() and float(off.median()) > 0 else 1.0
        self.bandwidth_ = bandwidth
        self.model_ = KernelModel(
            Yt.shape[1],
            centers,
            self.kernel,
            X=Xt,
            y=Yt,
            batch_size=self.batch_size,
            ridge=self.ridge,
            seed=int(self.random_state),
            verbose=self.verbose,
            projection="every",
            bandwidth=bandwidth,
        )
        self.history_ = self.model_.fit(epochs=self.epochs)
        self.n_features_in_ = X.shape[1]
        return self

    def _raw_predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "model_")
        X = validate_data(self, X, reset=False)
        out = self.model_.predict(_tensor(X))
        return out.cpu().numpy()


class KernelRegressor(RegressorMixin, _KernelBase):
    """EigenPro3 kernel regression (single or multi-output).

    Args:
        kernel: kernel name (``"laplacian"``, ``"gaussian"``, ``"dispersal"``, ``"ntk_relu"``).
        bandwidth: kernel bandwidth (default: the median distance between centers).
        n_centers: number of model centers drawn from the training inputs.
        epochs: EigenPro3 epochs.
        ridge: ridge term.
        batch_size: batch size (default the critical one).
        random_state: seed.
        verbose: progress bars.
    """

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X: Any, y: Any) -> KernelRegressor:
        X, y = validate_data(self, X, y, multi_output=True, y_numeric=True, dtype=np.float64)
        self._1d = np.ndim(y) == 1
        return self._fit_targets(X, np.asarray(y, dtype=np.float64))

    def predict(self, X: Any) -> np.ndarray:
        out = self._raw_predict(X)
        return out[:, 0] if self._1d else out


class KernelClassifier(ClassifierMixin, _KernelBase):
    """EigenPro3 kernel classification by regression on one-hot targets.

    Same arguments as :class:`KernelRegressor`.
    """

    def fit(self, X: Any, y: Any) -> KernelClassifier:
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        Y = np.eye(len(self.classes_))[codes]
        return self._fit_targets(X, Y)

    def decision_function(self, X: Any) -> np.ndarray:
        out = self._raw_predict(X)
        return out[:, 1] - out[:, 0] if len(self.classes_) == 2 else out

    def predict(self, X: Any) -> np.ndarray:
        out = self._raw_predict(X)
        return self.classes_[out.argmax(1)]


def _tensor(a: Any) -> torch.Tensor:
    """``a`` as a float64 tensor, sharing memory where it can.

    Read-only arrays (joblib memmaps, as in ``GridSearchCV(n_jobs=...)``) are shared
    too: nothing here writes into the data, so torch's warning about non-writable
    arrays is not shown.
    """
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable", category=UserWarning)
            return torch.as_tensor(a, dtype=torch.float64)
    return torch.as_tensor(a, dtype=torch.float64)
