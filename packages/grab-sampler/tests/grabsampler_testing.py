"""Helpers shared by several grab-sampler test modules (for tests only)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def logistic_grads(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Per-example gradients (n, 10*64 + 10) of softmax regression, in closed form."""
    logits = x @ w[:, :-1].T + w[:, -1]
    r = torch.softmax(logits, dim=1)
    r[torch.arange(len(y)), y] -= 1.0
    gw = r[:, :, None] * x[:, None, :]
    return torch.cat([gw.reshape(len(y), -1), r], dim=1)


def max_prefix_norm(g: Tensor, order: list[int]) -> float:
    """Largest norm of the running sum of the centered rows of ``g`` taken in ``order``."""
    c = g[order] - g.mean(dim=0)
    return float(torch.cumsum(c, dim=0).norm(dim=1).max())


def trained_logistic(
    seed: int, data: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor, torch.Generator]:
    """Softmax-regression weights ``w`` (10, 65) after two epochs of SGD (lr 0.3, batch 16)
    on ``data``, the exact per-example gradients there, and the generator (for the caller's
    further draws)."""
    x, y = data
    n = len(y)
    gen = torch.Generator().manual_seed(seed)
    w = 0.01 * torch.randn(10, 65, generator=gen, dtype=torch.float64)
    for _ in range(2):  # two epochs of SGD so that the gradients are realistic
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, 16):
            idx = perm[s : s + 16]
            w -= 0.3 * logistic_grads(w, x[idx], y[idx]).mean(0).reshape(10, 65)
    return w, logistic_grads(w, x, y), gen


def train_hooks_beside_route(model, x, y, ref, grab, batch: int, epochs: int = 3) -> None:
    """Train ``model`` by SGD (lr 0.1, cross-entropy) in the orders of the per-sample
    sampler ``ref``, stepping ``ref`` with ``vmap(grad)`` per-example gradients and the
    hooks-mode ``grab`` through the ordinary backward; asserts that both give the same
    order at every epoch and after the last."""
    loss_fn = nn.CrossEntropyLoss()

    def one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    psg = vmap(grad(one), in_dims=(None, 0, 0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    n = len(y)
    for _ in range(epochs):
        order = list(iter(ref))
        assert list(iter(grab.sampler)) == order
        for s in range(0, n, batch):
            idx = order[s : s + batch]
            p = {k: v.detach() for k, v in model.named_parameters()}
            ref.step(psg(p, x[idx], y[idx]))
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            grab.step()
            opt.step()
    assert list(iter(ref)) == list(iter(grab.sampler))
