"""Delayed-projection stability check of eigenpro3 (small analogue of the n = 1M drift).

Trains one epoch of ``KernelModel`` on the synthetic 10-class mixture of
``eigenpro3_bench.py`` and prints the training loss at each projecting batch and at
the batch after it, the inner solves' epochs / exact residuals and the test accuracy.

Usage::

    .venv/bin/python benchmarks/eigenpro3_projection_repro.py N P \\
        "projection_interval=64, inner_max_epochs=2"
"""

from __future__ import annotations

import ast
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eigenpro3_bench import one_hot, synthetic

from eigenpro3 import KernelModel, accuracy


def _kwargs(text: str) -> dict:
    tree = ast.parse(f"f({text})", mode="eval").body
    assert isinstance(tree, ast.Call)
    return {k.arg: ast.literal_eval(k.value) for k in tree.keywords}


def main() -> None:
    n, p = int(sys.argv[1]), int(sys.argv[2])
    kw = _kwargs(sys.argv[3]) if len(sys.argv) > 3 else {}
    X, labels = synthetic(n + 10000, seed=0)
    Xt, lt, X, labels = X[n:], labels[n:], X[:n], labels[:n]
    Z = X[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:p]]
    t0 = time.time()
    m = KernelModel(10, Z, "laplacian", X=X, y=one_hot(labels), bandwidth=5.0, verbose=False, **kw)
    print("batch", m.batch_size, "interval", m._interval(m.batch_size), flush=True)
    before, after, inner = [], [], []
    prev = 0
    for i, (xb, yb) in enumerate(m.train_loaders[0]):
        loss = m.fit_batch(xb, yb)
        if prev == 0 and i > 0:
            after.append(round(loss, 4))
        if m._since_solve == 0:
            before.append(round(loss, 4))
            info = getattr(m, "last_inner", {})
            if info:
                inner.append((info["epochs"], round(info["rel_residual"], 5)))
        prev = m._since_solve
    m.flush()
    print("loss at projecting batches", before)
    print("loss right after them     ", after)
    print("inner (epochs, exact rel residual)", inner)
    print("test acc", accuracy(m.predict(Xt), lt), "seconds", round(time.time() - t0, 1))


if __name__ == "__main__":
    main()
