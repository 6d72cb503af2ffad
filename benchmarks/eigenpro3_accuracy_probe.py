"""Accuracy after 3 epochs on the benchmark's synthetic problem: batch size and averaging.

Same data, centers and kernel as ``eigenpro3_bench.py`` part 2 (n = 40k, d = 100,
Laplacian bandwidth 5, p = 4000). Each configuration trains 3 epochs with
``fit_batch`` and prints, per epoch, the test accuracy, the train MSE and the
relative distance of the test predictions to those of the exact p-center solve.
``avg`` = tail averaging: at the end of each epoch the model is replaced by the
average of its iterates over the epoch's second half (Polyak-Ruppert style; an
experiment here, not a model option). ``fit_batch`` loops run the plain iteration (no
per-epoch correction); ``fit_epoch=True`` runs ``model.fit_epoch`` instead (defaults:
with the correction and its SVRG snapshot).

Usage::

    .venv/bin/python benchmarks/eigenpro3_accuracy_probe.py ["batch_size=128, avg=True" ...]
    .venv/bin/python benchmarks/eigenpro3_accuracy_probe.py "fit_epoch=True"
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eigenpro3_bench import BW, exact_solve, one_hot, predict_exact, synthetic

from eigenpro3 import KernelModel, accuracy
from eigenpro3.datasets import batch_loader


def main(specs: list[str]) -> None:
    torch.set_num_threads(1)
    n, p = 40_000, 4000
    Xa, la = synthetic(n + n // 4)
    X, lab, Xt, lt = Xa[:n], la[:n], Xa[n:], la[n:]
    Y = one_hot(lab)
    Z = X[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:p]]
    alpha = exact_solve(X, Y, Z, BW)
    pe = predict_exact(Xt, Z, alpha, BW)
    train_exact = float((predict_exact(X, Z, alpha, BW) - Y).pow(2).mean())
    print(f"exact: test accuracy {100 * accuracy(pe, lt):.2f}%, train MSE {train_exact:.5f}")
    for spec in specs or [""]:
        kw = eval(f"dict({spec})")  # command-line experiment settings
        avg = bool(kw.pop("avg", False))
        whole = bool(kw.pop("fit_epoch", False))  # model.fit_epoch (with its correction)
        model = KernelModel(10, Z, "laplacian", X=X, y=Y, bandwidth=BW, verbose=False, **kw)
        print(f"[{spec or 'defaults'}] batch {model.batch_size}", flush=True)
        gen = torch.Generator().manual_seed(5)
        for epoch in range(1, 4):
            batches = list(batch_loader(X, Y, model.batch_size, generator=gen))
            su, sd, k = torch.zeros_like(model.u), torch.zeros_like(model.d_s), 0
            if whole:
                model.fit_epoch(model.train_loaders)
                batches = []
            for i, (xb, yb) in enumerate(batches):
                model.fit_batch(xb, yb)
                if avg and i >= len(batches) // 2:
                    model.flush()
                    su += model.u
                    sd += model.d_s
                    k += 1
            model.flush()
            if k:
                model.u, model.d_s = su / k, sd / k
                model.project()
            pt = model.predict(Xt)
            mse = float((model.predict(X) - Y).pow(2).mean())
            dist = float((pt - pe).norm() / pe.norm())
            print(
                f"  epoch {epoch}: test accuracy {100 * accuracy(pt, lt):.2f}%, train MSE "
                f"{mse:.5f}, |f - f*| / |f*| on test {dist:.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1:])
