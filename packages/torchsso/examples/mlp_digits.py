"""K-FAC on an MLP for scikit-learn's digits (an MNIST-style task that needs no download).

Run: ``python packages/torchsso/examples/mlp_digits.py`` (a few seconds on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import torchsso
from optcore.data import load_sklearn


def main(epochs: int = 5) -> float:
    d = load_sklearn("digits")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    opt = torchsso.SecondOrderOptimizer(
        model, "Fisher", {"Linear": "Kron"},
        curv_kwargs={"damping": 1e-2, "ema_decay": 0.1},
        lr=0.01, momentum=0.9,
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    n = len(d.x_train)
    for epoch in range(epochs):
        perm = torch.randperm(n)
        for i in range(0, n, 128):
            idx = perm[i : i + 128]

            def closure(idx=idx):
                opt.zero_grad()
                out = model(d.x_train[idx])
                loss = F.cross_entropy(out, d.y_train[idx])
                loss.backward()
                return loss, out

            opt.step(closure)
        sched.step()
        with torch.no_grad():
            ce = float(F.cross_entropy(model(d.x_train), d.y_train))
            acc = float((model(d.x_test).argmax(1) == d.y_test).float().mean())
        print(f"epoch {epoch + 1}: train cross-entropy {ce:.4f}, test accuracy {acc:.3f}")
    return acc


if __name__ == "__main__":
    main()
