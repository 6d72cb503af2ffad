"""Herding: balanced orders have a much smaller prefix discrepancy than random ones."""

from __future__ import annotations

import pytest
import torch
from grabsampler_testing import max_prefix_norm, trained_logistic

from grabsampler import GraBSampler

optcore_data = pytest.importorskip("optcore.data")


def herding(kind, seed, data):
    n = len(data[1])
    w, g, gen = trained_logistic(seed, data)
    if kind == "rr":
        return max_prefix_norm(g, torch.randperm(n, generator=gen).tolist())
    sampler = GraBSampler(range(n), [w], kind, seed=seed)
    for _ in range(2):  # epoch 1 learns the stale mean; epoch 2 is balanced with it
        order = list(iter(sampler))
        for s in range(0, n, 16):
            sampler.step(g[order[s : s + 16]])
    return max_prefix_norm(g, list(iter(sampler)))


def test_mean_and_pair_beat_random_reshuffling_on_digits(one_thread):
    split = optcore_data.load_sklearn("digits", dtype=torch.float64)
    data = (split.x_train, split.y_train.long())
    res = {k: sum(herding(k, s, data) for s in range(5)) / 5 for k in ("rr", "mean", "pair")}
    assert res["mean"] <= 0.7 * res["rr"], res
    assert res["pair"] <= 0.7 * res["rr"], res
