"""Variational inference (VOGN) on digits: calibrated predictions vs Adam.

Prints test accuracy and expected calibration error (ECE) of the Bayesian model
average of the network linearised at the posterior mean
(``torchsso.prediction(model, x, mc_samples=100, linearized=True)``), of the sampled
network (``mc_samples=20``) and of an Adam-trained MLP. Both optimizers use the settings
the benchmark (``benchmarks/torchsso_bench.py``) chose on a validation split held out from
the training split: VOGN prior variance 1, KL weighting 0.2, lr 2e-3, 55 epochs; Adam lr
1e-3, 35 epochs.

Run: ``python packages/torchsso/examples/vi_calibration.py`` (under a minute on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import torchsso
from optcore.data import load_sklearn


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def main(epochs: int = 55, adam_epochs: int = 35) -> None:
    d = load_sklearn("digits")
    n = len(d.x_train)
    model = mlp()
    opt = torchsso.VIOptimizer(
        model, n, "Cov", {"Linear": "Diag"}, {"ema_decay": 0.1, "damping": 1e-2},
        lr=2e-3, momentum=0.9, prior_variance=1.0, kl_weighting=0.2, num_mc_samples=1,
    )  # fmt: skip
    adam_model = mlp()
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-3)
    for ep in range(epochs):
        perm = torch.randperm(n)
        for i in range(0, n, 128):
            idx = perm[i : i + 128]
            x, y = d.x_train[idx], d.y_train[idx]

            def closure(x=x, y=y):
                opt.zero_grad()
                out = model(x)
                loss = F.cross_entropy(out, y)
                loss.backward()
                return loss, out

            opt.step(closure)
            if ep < adam_epochs:
                adam.zero_grad()
                F.cross_entropy(adam_model(x), y).backward()
                adam.step()
    with torch.no_grad():
        p_lin = torchsso.prediction(model, d.x_test, mc_samples=100, linearized=True)
        p_vi = torchsso.prediction(model, d.x_test, mc_samples=20)
        p_adam = torch.softmax(adam_model(d.x_test), 1)
    rows = (("VOGN, linearised (100)", p_lin), ("VOGN, sampled (20)", p_vi), ("Adam", p_adam))
    for name, p in rows:
        acc = float((p.argmax(1) == d.y_test).float().mean())
        print(
            f"{name:22s} test accuracy {acc:.3f}  ECE {torchsso.expected_calibration_error(p, d.y_test):.4f}"
        )


if __name__ == "__main__":
    main()
