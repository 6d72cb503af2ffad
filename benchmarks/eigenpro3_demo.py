"""eigenpro3 quick comparison for the side-by-side demo (``benchmarks/demo.py``).

Digits (scikit-learn's bundled set), a Laplacian kernel model with p = 1000
centers: EigenPro3 (5 epochs) against the exact p-center least-squares solve
(torch, Cholesky of the normal equations) and against EigenPro2 interpolation
with centers = all training points.
"""

from __future__ import annotations

import time

import torch

from eigenpro3 import EigenPro2, KernelModel, accuracy, load_dataset
from eigenpro3.kernels import laplacian
from eigenpro3.preconditioner import single_thread

BANDWIDTH = 2.0


def _exact(X: torch.Tensor, Y: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    kxz = laplacian(X.double(), Z.double(), BANDWIDTH)
    with single_thread():
        return torch.linalg.lstsq(kxz, Y.double()).solution


def run(quick: bool = False) -> list[dict]:
    """Rows ``{package, task, method, metric, value, seconds}``, one per method."""
    _, (X, Y), (Xt, Yt) = load_dataset("digits")
    p = 300 if quick else 1000
    epochs = 2 if quick else 5
    Z = X[torch.randperm(len(X), generator=torch.Generator().manual_seed(0))[:p]]
    task = f"digits, Laplacian p={p}"
    rows = []

    t0 = time.perf_counter()
    model = KernelModel(10, Z, "laplacian", X=X, y=Y, bandwidth=BANDWIDTH, verbose=True)
    model.fit(epochs=epochs)
    acc = accuracy(model.predict(Xt), Yt)
    rows.append(
        {
            "package": "eigenpro3",
            "task": task,
            "method": f"EigenPro3 ({epochs} epochs)",
            "metric": "test accuracy",
            "value": acc,
            "seconds": time.perf_counter() - t0,
        }
    )

    t0 = time.perf_counter()
    alpha = _exact(X, Y, Z)
    acc = accuracy(laplacian(Xt.double(), Z.double(), BANDWIDTH) @ alpha, Yt)
    rows.append(
        {
            "package": "eigenpro3",
            "task": task,
            "method": "exact p-center solve (torch lstsq)",
            "metric": "test accuracy",
            "value": acc,
            "seconds": time.perf_counter() - t0,
        }
    )

    t0 = time.perf_counter()
    ep2 = EigenPro2("laplacian", bandwidth=BANDWIDTH, verbose=True)
    ep2.fit(X, Y, epochs=epochs)
    acc = accuracy(ep2.predict(Xt), Yt)
    rows.append(
        {
            "package": "eigenpro3",
            "task": f"digits, Laplacian p=n={len(X)}",
            "method": f"EigenPro2 interpolation ({epochs} epochs)",
            "metric": "test accuracy",
            "value": acc,
            "seconds": time.perf_counter() - t0,
        }
    )
    return rows


if __name__ == "__main__":
    import sys

    for row in run(quick="--quick" in sys.argv):
        print(row)
