"""Why 3 epochs of EigenPro3 stop short of the exact p-center solve on the synthetic data.

Computes, for the benchmark problem (n = 40k, d = 100, 10 classes, Laplacian
bandwidth 5, p = 4000 centers drawn from the training rows):

* the eigenvalues ``mu`` of the least-squares Hessian restricted to the model
  space, i.e. of ``K_ZZ^{-1/2} (K_ZX K_XZ / n) K_ZZ^{-1/2}`` (float64), and how
  many lie near ``1/n``;
* the projected diagonal ``K_Z(x, x) = k_x^T K_ZZ^{-1} k_x`` on training rows;
* ``beta_P`` of the Nystrom preconditioner for q up to 3000 (s = p).

SGD at the stable step ``eta(m) = m / (beta_P + (m - 1) lam)`` shrinks the error
along an eigendirection ``mu`` by about ``exp(-n mu / (beta_P + (m - 1) lam))``
per epoch, which is at most ``exp(-n mu / beta_P)``.

Usage (about 4 minutes, one thread)::

    .venv/bin/python benchmarks/eigenpro3_spectrum.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eigenpro3_bench import BW, synthetic

from eigenpro3.kernels import laplacian


def main() -> None:
    torch.set_num_threads(1)
    n, p = 40_000, 4000
    Xa, _ = synthetic(n + n // 4)
    X = Xa[:n]
    Z = X[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:p]].double()
    A = torch.zeros(p, p, dtype=torch.float64)
    for s in range(0, n, 4096):
        k = laplacian(X[s : s + 4096].double(), Z, BW)
        A += k.T @ k
    A /= n
    K = laplacian(Z, Z, BW)
    L = torch.linalg.cholesky(K)
    C = torch.linalg.solve_triangular(
        L, torch.linalg.solve_triangular(L, A, upper=False).T, upper=False
    )
    mu = torch.linalg.eigvalsh((C + C.T) / 2).flip(0)
    print(f"restricted Hessian: top {mu[:3].tolist()}, min {float(mu[-1]):.3e}, 1/n = {1 / n:.3e}")
    for t in (1e-3, 1e-4, 5e-5, 2.5e-5):
        print(f"  eigenvalues below {t:.1e}: {int((mu < t).sum())} of {p}")
    kx = laplacian(X[:2000].double(), Z, BW)
    w = torch.linalg.solve_triangular(L, kx.T, upper=False)
    q = torch.quantile((w * w).sum(0), torch.tensor([0.0, 0.5, 0.9, 1.0], dtype=torch.float64))
    print(f"projected diagonal K_Z(x, x) on 2000 rows, quantiles 0/50/90/100%: {q.tolist()}")
    ev, E = torch.linalg.eigh(K)
    ev, E = ev.flip(0) / p, E.flip(1)
    for q_ in (160, 500, 1000, 2000, 3000):
        lq, lam = ev[q_], ev[:q_]
        diag = K.diagonal() - (E[:, :q_] ** 2 * ((1 - lq / lam) * p * lam)).sum(1)
        print(f"  q = {q_}: beta_P = {float(diag.max()):.3f}")


if __name__ == "__main__":
    main()
