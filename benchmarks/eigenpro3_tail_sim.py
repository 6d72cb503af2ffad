"""Dense simulation of the EigenPro3 iteration on the benchmark's synthetic problem.

Used to choose the per-epoch correction of ``KernelModel`` (see the package README,
"Accuracy after 3 epochs"). ``K(X, Z)`` (40k x 4000, 640 MB) is formed once so each
variant runs in seconds; the step is the package's (exact projection after every
batch, the Nystrom preconditioner and step size of a ``KernelModel`` on the same
data). Variants (``--variant``):

* ``sgd``: the plain iteration at batch ``--batch`` (default m*), with the tail
  average of each epoch's second half;
* ``svrg-all`` / ``svrg-after1``: SVRG (Johnson & Zhang 2013): a full-gradient pass at
  the start of every epoch (or of every epoch after the first), steps on
  ``K(Z, x) (f(x) - f_snap(x)) + m * grad(snap)``;
* ``newton`` / ``newton-vr``: after every epoch a full-gradient pass and one step
  along ``M^{-1} g`` with ``M = K_ZZ^2 + (n_rest / s) K_ZS K_SZ`` (exact center rows,
  ``s = --sample`` sampled other rows) and the split line-search estimate; ``-vr``
  also variance-reduces the next epoch's steps with that gradient.

Prints test accuracy, train MSE and the relative distance of the test predictions to
the exact p-center solve after every epoch (and step). One thread.

Usage::

    .venv/bin/python benchmarks/eigenpro3_tail_sim.py --variant newton [--epochs 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eigenpro3_bench import BW, one_hot, synthetic

from eigenpro3 import KernelModel
from eigenpro3.kernels import laplacian


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="sgd")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--sample", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n, p = 40_000, 4000
    Xa, la = synthetic(n + n // 4)
    X, lab, Xt, lt = Xa[:n], la[:n], Xa[n:], la[n:]
    Y = one_hot(lab)
    perm0 = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    Z = X[perm0[:p]]
    kxz = torch.cat([laplacian(X[s : s + 4096], Z, BW) for s in range(0, n, 4096)])
    ktz = torch.cat([laplacian(Xt[s : s + 4096], Z, BW) for s in range(0, len(Xt), 4096)])
    kzz = laplacian(Z, Z, BW)
    a = kxz.double().T @ kxz.double()
    a.diagonal().add_(1e-9 * float(a.diagonal().mean()))
    astar = torch.cholesky_solve(kxz.double().T @ Y.double(), torch.linalg.cholesky(a)).float()
    pe = ktz @ astar
    model = KernelModel(10, Z, "laplacian", X=X, y=Y, bandwidth=BW, verbose=False)
    ny = model.nystrom
    m0 = args.batch or model.batch_size
    lz = torch.linalg.cholesky(kzz.double() + 1e-10 * torch.eye(p, dtype=torch.float64)).float()

    def report(tag: str, alpha: torch.Tensor) -> None:
        pt = ktz @ alpha
        acc = 100 * float((pt.argmax(1) == lt).float().mean())
        mse = float((kxz @ alpha - Y).pow(2).mean())
        dist = float((pt - pe).norm() / pe.norm())
        print(f"{tag}: test accuracy {acc:.2f}%, train MSE {mse:.5f}, dist {dist:.4f}", flush=True)

    def direction(h: torch.Tensor, mm: int) -> torch.Tensor:
        g = torch.cholesky_solve(h, lz) / mm
        g[ny.idx] -= ny.F @ (ny.F.T @ (h[ny.idx] / mm))
        return g

    report("exact", astar)
    rest = perm0[p:]
    g = torch.Generator().manual_seed(7)
    pick = rest[torch.randperm(len(rest), generator=g)[: args.sample]]
    m_est = kzz.double() @ kzz.double()
    m_est += (len(rest) / args.sample) * kxz[pick].double().T @ kxz[pick].double()
    lm = torch.linalg.cholesky(m_est)
    gen = torch.Generator().manual_seed(5)
    alpha = torch.zeros(p, 10)
    snap_r = snap_g = None
    for e in range(args.epochs):
        v = args.variant
        if v == "svrg-all" or (v == "svrg-after1" and e >= 1):
            snap_r = kxz @ alpha - Y
            snap_g = kxz.T @ snap_r / n
        order = torch.randperm(n, generator=gen)
        avg, k = torch.zeros_like(alpha), 0
        for s in range(0, n, m0):
            b = order[s : s + m0]
            mm = len(b)
            r = kxz[b] @ alpha - Y[b]
            if snap_r is not None and snap_g is not None:
                h = kxz[b].T @ (r - snap_r[b]) + mm * snap_g
            else:
                h = kxz[b].T @ r
            alpha -= ny.step_size(mm) * direction(h, mm)
            if s >= n // 2:
                avg += alpha
                k += 1
        report(f"{v} batch {m0} epoch {e + 1}", alpha)
        if v == "sgd":
            report("  tail average", avg / k)
        if v.startswith("newton"):
            r = kxz @ alpha - Y
            grad = kxz.T @ r
            d = torch.cholesky_solve(grad.double(), lm).float()
            ls = rest[torch.randperm(len(rest), generator=g)[:4096]]
            q = (kzz @ d).pow(2).sum(0) + (len(rest) / len(ls)) * (kxz[ls] @ d).pow(2).sum(0)
            t = ((grad * d).sum(0) / q).clamp(0, 1)
            if v == "newton-vr":
                snap_r, snap_g = r, grad / n
            alpha -= d * t
            report(f"  after the correction (mean step {float(t.mean()):.3f})", alpha)


if __name__ == "__main__":
    main()
