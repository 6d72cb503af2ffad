"""Herding: balanced orders have a much smaller prefix discrepancy than random ones."""

from __future__ import annotations

import pytest
import torch

from grabsampler import GraBSampler

optcore_data = pytest.importorskip("optcore.data")


def logistic_grads(w, x, y):
    """Per-example gradients (n, 10*64 + 10) of softmax regression, in closed form."""
    logits = x @ w[:, :-1].T + w[:, -1]
    r = torch.softmax(logits, dim=1)
    r[torch.arange(len(y)), y] -= 1.0
    gw = r[:, :, None] * x[:, None, :]
    return torch.cat([gw.reshape(len(y), -1), r], dim=1)


def max_prefix_norm(g, order):
    c = g[order] - g.mean(dim=0)
    return float(torch.cumsum(c, dim=0).norm(dim=1).max())


def herding(kind, seed, data):
    x, y = data
    n = len(y)
    gen = torch.Generator().manual_seed(seed)
    w = 0.01 * torch.randn(10, 65, generator=gen, dtype=torch.float64)
    for _ in range(2):  # two epochs of SGD so that the gradients are realistic
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, 16):
            idx = perm[s : s + 16]
            g = logistic_grads(w, x[idx], y[idx]).mean(0)
            w -= 0.3 * g.reshape(10, 65)
    g = logistic_grads(w, x, y)
    if kind == "rr":
        return max_prefix_norm(g, torch.randperm(n, generator=gen).tolist())
    sampler = GraBSampler(range(n), [w], kind, seed=seed)
    for _ in range(2):  # epoch 1 learns the stale mean; epoch 2 is balanced with it
        order = list(iter(sampler))
        for s in range(0, n, 16):
            sampler.step(g[order[s : s + 16]])
    return max_prefix_norm(g, list(iter(sampler)))


@pytest.fixture
def one_thread():
    """Tiny matmuls are much faster single-threaded on a busy shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_mean_and_pair_beat_random_reshuffling_on_digits(one_thread):
    split = optcore_data.load_sklearn("digits", dtype=torch.float64)
    data = (split.x_train, split.y_train.long())
    res = {k: sum(herding(k, s, data) for s in range(5)) / 5 for k in ("rr", "mean", "pair")}
    assert res["mean"] <= 0.7 * res["rr"], res
    assert res["pair"] <= 0.7 * res["rr"], res
