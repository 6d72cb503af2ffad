"""grab-sampler quick comparison for the side-by-side demo.

Softmax regression on scikit-learn's digits (SGD, lr 0.3, batch 16, same
initialization for every ordering): GraB (mean balance) and pair balance
against random reshuffling and shuffle-once. The metric is the full training
loss averaged over epochs 2..E (lower is better), averaged over seeds.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm import tqdm

from grabsampler import GraBSampler

METHODS = [
    ("rr", "random reshuffling"),
    ("so", "shuffle once"),
    ("mean", "GraB mean"),
    ("pair", "GraB pair"),
]


def _digits():
    from optcore.data import load_sklearn

    sp = load_sklearn("digits")
    return sp.x_train, sp.y_train.long()


def _train(kind: str, seed: int, epochs: int, x, y, bar) -> list[float]:
    torch.manual_seed(seed)
    model = nn.Linear(64, 10)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss_fn = nn.CrossEntropyLoss()

    def one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    psg = vmap(grad(one), in_dims=(None, 0, 0))
    sampler = GraBSampler(range(len(y)), params, kind, seed=seed)
    losses = []
    for _ in range(epochs):
        order = list(iter(sampler))
        for s in range(0, len(order), 16):
            idx = order[s : s + 16]
            g = psg(params, x[idx], y[idx])
            sampler.step(g)
            params = {k: v - 0.3 * g[k].mean(0) for k, v in params.items()}
        with torch.no_grad():
            losses.append(float(loss_fn(functional_call(model, params, (x,)), y)))
        bar.update(1)
    return losses


def _warm_up(x, y) -> None:
    model = nn.Linear(64, 10)
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss_fn = nn.CrossEntropyLoss()

    def one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    vmap(grad(one), in_dims=(None, 0, 0))(params, x[:16], y[:16])


def run(quick: bool = False) -> list[dict]:
    """Returns one row per ordering method (see the module docstring)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = _digits()
        epochs, seeds = (4, 1) if quick else (10, 3)
        rows = []
        _warm_up(x, y)  # the first torch.func call of a process takes seconds
        bar = tqdm(total=len(METHODS) * seeds * epochs, desc="grab-sampler digits")
        for kind, label in METHODS:
            t0 = time.perf_counter()
            curves = [_train(kind, s, epochs, x, y, bar) for s in range(seeds)]
            value = sum(sum(c[1:]) / (len(c) - 1) for c in curves) / seeds
            rows.append(
                {
                    "package": "grab-sampler",
                    "task": f"digits softmax regression, B=16, {epochs} epochs",
                    "method": label,
                    "metric": "train loss, mean of epochs 2..E",
                    "value": value,
                    "seconds": time.perf_counter() - t0,
                }
            )
        bar.close()
        return rows
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    for row in run(quick=True):
        print(row)
