"""K-FAC on a small ConvNet with BatchNorm for CIFAR-10.

CIFAR-10 is read from ``$DATA_DIR/cifar-10-batches-py`` (the python pickles: download
``cifar-10-python.tar.gz`` from the CIFAR-10 page of the University of Toronto and
unpack it into ``$DATA_DIR``). Without ``DATA_DIR`` the example runs on the built-in
digits set (8x8 images, padded to 1x12x12), so it always runs on CPU in under 2 minutes.

Run: ``DATA_DIR=~/data python packages/torchsso/examples/convnet_cifar10.py``
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

import torchsso
from optcore.data import load_cifar10, load_sklearn


def data(max_train: int = 5000):
    root = os.environ.get("DATA_DIR")
    if root:
        s = load_cifar10(root)
        x, y, xt, yt = (
            s.x_train[:max_train],
            s.y_train[:max_train],
            s.x_test[:2000],
            s.y_test[:2000],
        )
        return x, y, xt, yt, 3, 32
    s = load_sklearn("digits")

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t.reshape(-1, 1, 8, 8), (2, 2, 2, 2))

    return pad(s.x_train), s.y_train, pad(s.x_test), s.y_test, 1, 12


def convnet(channels: int, size: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (size // 4) ** 2, 10),
    )  # fmt: skip


def main(epochs: int = 3) -> float:
    x, y, xt, yt, c, size = data()
    torch.manual_seed(0)
    model = convnet(c, size)
    opt = torchsso.SecondOrderOptimizer(
        model, "Fisher", {"Conv2d": "Kron", "Linear": "Kron", "BatchNorm2d": "Unit"},
        curv_kwargs={"damping": 1e-2, "ema_decay": 0.1},
        lr=0.01, momentum=0.9, non_reg_for_bn=True, weight_decay=1e-4,
        curv_interval=2,
    )  # fmt: skip
    n = len(x)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n)
        for i in range(0, n, 128):
            idx = perm[i : i + 128]

            def closure(idx=idx):
                opt.zero_grad()
                out = model(x[idx])
                loss = F.cross_entropy(out, y[idx])
                loss.backward()
                return loss, out

            loss = opt.step(closure)
        model.eval()
        with torch.no_grad():
            acc = float((model(xt).argmax(1) == yt).float().mean())
        print(f"epoch {epoch + 1}: last batch loss {float(loss):.4f}, test accuracy {acc:.3f}")
    return acc


if __name__ == "__main__":
    main()
