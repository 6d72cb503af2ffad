"""Quick side-by-side demo: torchsso K-FAC and VOGN vs torch.optim SGD / Adam on digits.

``run(quick)`` trains an MLP 64-256-256-10 on scikit-learn's digits with each method
for the same number of epochs and returns one row per method (training cross-entropy; the test accuracy
is noted in the task column). No peer libraries are needed.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import torchsso
from optcore.data import load_sklearn

__all__ = ["run"]


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def _methods():
    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), False

    def adam(m):
        return torch.optim.Adam(m.parameters(), lr=1e-3), False

    def kfac(m):
        opt = torchsso.SecondOrderOptimizer(
            m, "Fisher", {"Linear": "Kron"}, {"damping": 1e-2, "ema_decay": 0.1},
            lr=0.01, momentum=0.9,
        )  # fmt: skip
        return opt, True

    def vogn(m):
        opt = torchsso.VIOptimizer(
            m, 1437, "Cov", {"Linear": "Diag"}, {"ema_decay": 0.1, "damping": 1e-2}, lr=2e-3,
            momentum=0.9, prior_variance=1.0, kl_weighting=0.2,
        )  # fmt: skip
        return opt, True

    return {"SGD": sgd, "Adam": adam, "torchsso K-FAC": kfac, "torchsso VOGN": vogn}


def run(quick: bool = False) -> list[dict]:
    """Train each method on digits; return rows for the side-by-side table."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is fastest, and the CPU is shared
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool) -> list[dict]:
    d = load_sklearn("digits")
    epochs = 3 if quick else 8
    rows = []
    n = len(d.x_train)
    for name, make in _methods().items():
        model = _mlp(0)
        opt, closure_style = make(model)
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        bar = tqdm(range(epochs), desc=f"torchsso demo: {name}", leave=False)
        for _ in bar:
            perm = torch.randperm(n, generator=g)
            for i in range(0, n, 128):
                idx = perm[i : i + 128]
                x, y = d.x_train[idx], d.y_train[idx]
                if closure_style:

                    def closure(x=x, y=y, opt=opt, model=model):
                        opt.zero_grad()
                        out = model(x)
                        loss = F.cross_entropy(out, y)
                        loss.backward()
                        return loss, out

                    opt.step(closure)
                else:
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            ce = float(F.cross_entropy(model(d.x_train), d.y_train))
            if isinstance(opt, torchsso.VIOptimizer):
                acc = float((opt.prediction(d.x_test, 10).argmax(1) == d.y_test).float().mean())
            else:
                acc = float((model(d.x_test).argmax(1) == d.y_test).float().mean())
        rows.append({"package": "torchsso", "task": f"digits MLP, {epochs} epochs (test acc {acc:.3f})",
                     "method": name, "metric": "train cross-entropy", "value": ce,
                     "seconds": seconds})  # fmt: skip
    return rows


if __name__ == "__main__":
    for r in run(quick=True):
        print(r)
