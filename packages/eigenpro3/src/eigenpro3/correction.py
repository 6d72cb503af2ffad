"""Once-per-epoch model-space correction: a preconditioned full-gradient step.

EigenPro3's stochastic steps converge slowly along directions of the model
space that only a few training points see: when the centers are training
points, ``K(., z_j)`` minus its part along the top eigenfunctions is mostly
"seen" by the row ``z_j`` itself, so its curvature is about ``1 / n`` of the
top one, and constant-step SGD on the (non-interpolating) p-center problem
also keeps a noise floor around the minimizer.

After each epoch this module takes one step from the current coefficients
``alpha`` along ``d = M^{-1} g`` with ``g = sum_x K(Z, x) (f(x) - y(x))`` the
full gradient (one pass over the data) and ``M`` an estimate of the
least-squares Hessian ``sum_x K(Z, x) K(x, Z)`` that is exact for the rows that
coincide with centers and sampled for the others (Falkon-style; Rudi,
Carratino, Rosasco 2017)::

    M = K(Z, Z) diag(count) K(Z, Z) + (n_rest / s) K(Z, S) K(S, Z)

(``count_j``: training rows equal to center ``j``; ``S``: ``s`` rows drawn
from the other ``n_rest`` rows). The step length per output is the exact
minimizer of the quadratic along ``d`` with the same split estimate of
``d^T H d`` on a fresh sample, clipped to ``[0, 1]``. ``M`` is symmetric
positive definite, so the step is a descent step and the fixed point (the
p-center least-squares minimizer, where ``g = 0``) is unchanged; only the
speed depends on how well ``M`` approximates the Hessian.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor

from eigenpro3.blocks import CenterSet
from eigenpro3.preconditioner import single_thread

__all__ = ["HessianCorrection", "covers_centers", "match_rows"]


def covers_centers(match: Tensor, p: int, sample: int) -> bool:
    """Whether ``M`` can have full rank: distinct matched centers plus sampled rows >= ``p``."""
    matched = int(match[match >= 0].unique().numel())
    return matched + min(sample, int((match < 0).sum())) >= p


def match_rows(x: Tensor, z: Tensor, *, chunk: int = 65536) -> Tensor:
    """For each row of ``x`` the index of an identical row of ``z`` (``-1`` if none).

    Rows are keyed by two random projections (float64), candidates found by
    binary search and then checked for exact equality, so a match is never
    wrong (a missed match only makes the correction less effective).
    """
    g = torch.Generator().manual_seed(12345)
    v = torch.randn(z.shape[1], 2, generator=g, dtype=torch.float64).to(z.device)
    kz = z.double() @ v
    order = kz[:, 0].argsort()
    sorted_keys = kz[order, 0].contiguous()
    out = torch.full((x.shape[0],), -1, dtype=torch.long)
    for s in range(0, x.shape[0], chunk):
        xs = x[s : s + chunk].to(z.device)
        kx = xs.double() @ v
        pos = torch.searchsorted(sorted_keys, kx[:, 0].contiguous()).clamp(max=len(order) - 1)
        for shift in (0, -1):
            cand = order[(pos + shift).clamp(min=0)]
            close = ((kx - kz[cand]).abs() <= 1e-9 * (1.0 + kz[cand].abs())).all(1)
            same = close & (xs == z[cand].to(xs.dtype)).all(1)
            hit = same.cpu() & (out[s : s + chunk] < 0)
            out[s : s + chunk][hit] = cand.cpu()[hit]
    return out


class HessianCorrection:
    """The Hessian estimate ``M`` (factored in float64, kept in the model dtype) and the step.

    Args:
        centers: the model centers with the cached ``K(Z, Z)`` (one device).
        X: the training rows (all of them; every process holds all of ``X``).
        sample: rows ``s`` drawn from the rows that are not centers.
        ridge: ridge term ``lambda`` (adds ``n lambda K(Z, Z)`` to ``M``).
        generator: random generator of the samples.
        match: :func:`match_rows` of ``X`` against the centers, if already known.
    """

    def __init__(
        self,
        centers: CenterSet,
        X: Tensor,
        *,
        sample: int,
        ridge: float,
        generator: torch.Generator,
        match: Tensor | None = None,
    ) -> None:
        if centers.cache is None or len(centers.cache) != 1:
            raise ValueError("the model-space correction needs the cached K(Z, Z) on one device")
        self.centers = centers
        self.X = X
        self.n = X.shape[0]
        self.ridge = ridge
        self.generator = generator
        kzz = centers.cache[0]
        p = centers.p
        match = match_rows(X, centers.centers) if match is None else match
        self.count = torch.bincount(match[match >= 0], minlength=p).to(kzz.device, kzz.dtype)
        self.rest = (match < 0).nonzero().flatten()
        self.sample_size = sample
        self.sample = min(sample, len(self.rest))
        m32 = (kzz * self.count).mm(kzz)  # K diag(count) K (K symmetric), model dtype
        if self.sample:
            pick = self.rest[torch.randperm(len(self.rest), generator=generator)[: self.sample]]
            scale = len(self.rest) / self.sample
            rows = max(1, min(self.sample, 2048))
            for a in range(0, self.sample, rows):
                xs = X[pick[a : a + rows]].to(centers.main, centers.dtype)
                block = centers.block(xs, 0)
                m32.addmm_(block.T, block, alpha=scale)
        m = m32.double()
        del m32
        if ridge > 0:
            m.add_(kzz.double(), alpha=self.n * ridge)
        jitter = 1e-10 * float(m.diagonal().mean())
        m.diagonal().add_(jitter)
        with single_thread() if kzz.device.type == "cpu" else nullcontext():
            factor, info = torch.linalg.cholesky_ex(m)
        del m
        if int(info) != 0:
            raise ValueError("kernel_fn: the Hessian estimate is not positive definite")
        # solves in the model dtype: an inexact d only changes the (exact) line search's
        # direction, never the fixed point
        self.factor = factor.to(kzz.dtype)
        del factor

    def curvature(self, d: Tensor, kzz_d: Tensor, rows: int = 4096) -> Tensor:
        """Estimate of ``sum_x (K(x, Z) d)^2`` per output (exact on the center rows)."""
        q = (self.count.unsqueeze(1) * kzz_d.pow(2)).sum(0).double()
        k = min(rows, len(self.rest))
        if k:
            pick = self.rest[torch.randperm(len(self.rest), generator=self.generator)[:k]]
            xs = self.X[pick].to(self.centers.main, self.centers.dtype)
            pred = self.centers.matmul(xs, d)
            q += (len(self.rest) / k) * pred.pow(2).sum(0).double()
        return q

    def step(
        self, grad_sum: Tensor, n_rows: int, kzz_matmul: Callable[[Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Direction ``d = M^{-1} g`` (scaled to ``n`` rows) and per-output lengths ``t``.

        Args:
            grad_sum: ``sum_x K(Z, x) (f(x) - y(x))`` over ``n_rows`` rows, plus the
                ridge part ``n_rows lambda K(Z, Z) alpha`` (p, c).
            n_rows: the number of rows summed.
            kzz_matmul: ``w -> K(Z, Z) @ w``.

        Returns:
            ``(d, t)``: the update is ``alpha <- alpha - d * t``.
        """
        g = grad_sum * (self.n / n_rows)  # same units as M
        d = torch.cholesky_solve(g.to(self.factor.dtype), self.factor).to(grad_sum.dtype)
        kzz_d = kzz_matmul(d)
        q = self.curvature(d, kzz_d)
        if self.ridge > 0:
            q += self.n * self.ridge * (d * kzz_d).sum(0).double()
        num = (g.double() * d.double()).sum(0)
        t = torch.where(q > 0, num / q.clamp(min=1e-300), torch.zeros_like(q)).clamp(0.0, 1.0)
        return d, t.to(grad_sum.dtype)
