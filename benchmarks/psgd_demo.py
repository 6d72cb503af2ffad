"""psgd quick demo: PSGD against torch.optim baselines on built-in data.

``run(quick)`` returns one row per method:
``{"package", "task", "method", "metric", "value", "seconds"}``.
Tasks: an MLP on scikit-learn's digits (Kron vs AdamW, test cross-entropy at equal
steps) and the Rosenbrock function (DenseNewton vs Adam, final loss at equal
iterations).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm import tqdm

import psgd
from psgd.problems import rosenbrock


def _digits(kind: str, steps: int) -> float:
    from optcore.data import load_sklearn

    split = load_sklearn("digits", standardize=False)  # pixels 0..16; constant ones stay 0
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )  # fmt: skip
    if kind == "psgd.Kron":
        opt: torch.optim.Optimizer = psgd.Kron(model.parameters(), lr=1e-3, weight_decay=1e-2)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(0)
    n = split.x_train.shape[0]
    for _ in tqdm(range(steps), desc=f"psgd digits {kind}", leave=False):
        idx = torch.randint(0, n, (128,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(split.x_train[idx] / 16), split.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(split.x_test / 16), split.y_test))


def _rosenbrock(kind: str, iters: int) -> float:
    xy = torch.nn.Parameter(torch.tensor([-1.0, 1.0], dtype=torch.float64))
    if kind == "psgd.DenseNewton":
        opt: Any = psgd.DenseNewton([xy], lr=0.5, preconditioner_init_scale=0.01)
    else:
        opt = torch.optim.Adam([xy], lr=0.02)
    for _ in tqdm(range(iters), desc=f"psgd rosenbrock {kind}", leave=False):
        if kind == "psgd.DenseNewton":
            opt.step(lambda: rosenbrock(xy))
        else:
            opt.zero_grad()
            loss = rosenbrock(xy)
            loss.backward()
            opt.step()
    return float(rosenbrock(xy.detach()))


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Run the demo; ``quick`` shortens it (under 30 s on a CPU)."""
    steps, iters = (300, 600) if quick else (600, 600)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: thread wake-ups cost more than they save
    try:
        return _run(steps, iters)
    finally:
        torch.set_num_threads(threads)


def _run(steps: int, iters: int) -> list[dict[str, Any]]:
    rows = []
    for kind in ("psgd.Kron", "torch.optim.AdamW"):
        t0 = time.perf_counter()
        value = _digits(kind, steps)
        rows.append(
            dict(package="psgd", task=f"digits MLP, {steps} steps", method=kind,
                 metric="test cross-entropy", value=value, seconds=time.perf_counter() - t0)
        )  # fmt: skip
    for kind in ("psgd.DenseNewton", "torch.optim.Adam"):
        t0 = time.perf_counter()
        value = _rosenbrock(kind, iters)
        rows.append(
            dict(package="psgd", task=f"Rosenbrock, {iters} iterations", method=kind,
                 metric="final loss", value=value, seconds=time.perf_counter() - t0)
        )  # fmt: skip
    return rows


if __name__ == "__main__":
    import sys

    for row in run(quick="--quick" in sys.argv):
        print(row)
