"""Projection onto the model centers: solve ``K(Z, Z) theta = u``.

EigenPro3 keeps the exact values ``u = K(Z, Z) theta`` of its projected part
and, after a batch (or every ``T`` batches with temporary centers in between),
recovers the coefficients ``theta``. Two solvers:

* ``"cholesky"``: one Cholesky factor ``L`` of the cached ``K(Z, Z)``,
  computed once (in the model dtype when that is accurate enough, else in
  float64), then two triangular solves with all ``c`` right-hand sides at
  once per projection. O(p^2) memory, used when it fits the budget.
* ``"eigenpro2"``: the warm-started inner EigenPro2 iteration (O(p) extra
  memory) with a check of the exact residual: it goes on for up to
  ``5 * inner_max_epochs`` epochs until ``|u - K theta| <= inner_tol |u|``,
  then falls back to Cholesky when the factor fits, else halves the longest
  delayed interval.

Only the coefficients' parameterization depends on the solver: the training
step acts on ``u`` and the exact p-center least-squares minimizer stays the
fixed point either way.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from eigenpro3.blocks import CenterSet
from eigenpro3.eigenpro2 import eigenpro2_solve
from eigenpro3.preconditioner import Nystrom, single_thread

__all__ = ["CholeskyFactor", "Projector", "choose_interval"]

MAX_INTERVAL = 64  # longest cost-chosen delayed projection interval
HARD_ROUNDS = 5  # an inner solve runs at most this many times inner_max_epochs epochs
_FACTOR_TOL = 1e-3  # relative solve error accepted for a factor in the model dtype


class CholeskyFactor:
    """``K^{-1} u`` by a Cholesky factor of a symmetric positive definite ``K``.

    The factor is taken in ``dtype`` (float32 halves memory and solve time) when
    the solve of a random right-hand side is accurate to ``1e-3`` relative,
    otherwise in float64 (with a ``1e-10`` relative diagonal jitter).

    Raises:
        ValueError: naming ``kernel_fn`` when ``K`` is not positive definite.
    """

    def __init__(self, k: Tensor, dtype: torch.dtype) -> None:
        self.out_dtype = dtype
        scale = float(k.diagonal().mean())
        self.factor: Tensor | None = None
        if dtype != torch.float64:
            self.factor = self._factor(k, dtype, 1e-6 * scale)
            if self.factor is not None and not self._accurate(k):
                self.factor = None
        if self.factor is None:
            self.factor = self._factor(k, torch.float64, 1e-10 * scale)
        if self.factor is None:
            raise ValueError("kernel_fn: K(Z, Z) is not positive definite (Cholesky failed)")

    @staticmethod
    def _factor(k: Tensor, dtype: torch.dtype, jitter: float) -> Tensor | None:
        a = k.to(dtype=dtype, copy=True)
        a.diagonal().add_(jitter)
        factor, info = torch.linalg.cholesky_ex(a)
        del a
        return factor if int(info) == 0 else None

    def _accurate(self, k: Tensor) -> bool:
        g = torch.Generator().manual_seed(0)
        v = torch.randn(k.shape[0], 2, generator=g, dtype=torch.float64).to(k.device)
        b = (k.double() @ v) if k.shape[0] <= 4096 else (k @ v.to(k.dtype)).double()
        err = float((self.solve(b).double() - v).norm() / v.norm())
        return err <= _FACTOR_TOL

    def solve(self, u: Tensor) -> Tensor:
        """``K^{-1} u`` for (p, c) ``u``, in the model dtype."""
        assert self.factor is not None
        f = self.factor
        y = torch.linalg.solve_triangular(f, u.to(f.dtype), upper=False)
        x = torch.linalg.solve_triangular(f.mT, y, upper=True)
        return x.to(self.out_dtype)

    @property
    def nbytes(self) -> int:
        assert self.factor is not None
        return self.factor.numel() * self.factor.element_size()


def choose_interval(
    *,
    p: int,
    d: int,
    c: int,
    m: int,
    solve_epochs: float,
    cached: bool,
    exact: bool,
    cap: int,
    budget: int,
) -> int:
    """Batches ``T`` between projections minimizing the estimated flops per batch.

    A solve costs about ``2 p^2 c`` (two triangular solves) with Cholesky, or
    ``solve_epochs`` passes over ``K(Z, Z)`` with EigenPro2; delaying by ``T``
    batches adds the temporary centers' kernel products, about
    ``m^2 (T - 1) (d + c)`` per batch on average. ``T`` is capped by ``cap``
    and by the memory the temporary centers take.
    """
    if exact:
        solve = 2.0 * p * p * c
    else:
        per_epoch = p * p * (c if cached else d + c)
        solve = max(solve_epochs, 1.0) * 2.0 * per_epoch
    t_max = max(1, min(cap, budget // max(1, 4 * m * (d + c) * 8)))
    best_t, best = 1, solve
    for t in range(2, t_max + 1):
        cost = solve / t + m * m * (t - 1) * (d + c)
        if cost < best:
            best_t, best = t, cost
    return best_t


class Projector:
    """Solves ``K(Z, Z) theta = u`` for a :class:`~eigenpro3.models.KernelModel`.

    Args:
        centers: the model centers (with the optional cached ``K(Z, Z)``).
        solver: ``"cholesky"`` or ``"eigenpro2"``.
        budget: bytes left for a Cholesky factor (EigenPro2 fallback check).
        tol, max_epochs, decrease: the inner EigenPro2 stopping rules.
        dtype: model dtype.
        generator: random generator for the inner solves.
    """

    def __init__(
        self,
        centers: CenterSet,
        *,
        solver: str,
        budget: int,
        tol: float,
        max_epochs: int,
        decrease: float,
        dtype: torch.dtype,
        generator: torch.Generator,
    ) -> None:
        self.centers = centers
        self.solver = solver
        self.budget = budget
        self.tol, self.max_epochs, self.decrease = tol, max_epochs, decrease
        self.dtype = dtype
        self.generator = generator
        self.chol: CholeskyFactor | None = None
        self.fallback = False  # EigenPro2 missed inner_tol: Cholesky from then on
        self.inner_epochs = 2.0  # running estimate of inner epochs per solve
        self.interval_cap = MAX_INTERVAL
        self.last: dict[str, float] = {}
        if solver == "cholesky":
            self._ensure_factor()

    @property
    def exact(self) -> bool:
        return self.solver == "cholesky" or self.fallback

    def can_cholesky(self) -> bool:
        """Whether a Cholesky factor of the cached ``K(Z, Z)`` fits the budget."""
        cache = self.centers.cache
        p = self.centers.p
        return cache is not None and len(cache) == 1 and 8 * p * p <= self.budget

    def _ensure_factor(self) -> CholeskyFactor:
        if self.chol is None:
            cache = self.centers.cache
            if cache is None or len(cache) != 1:
                raise ValueError(
                    "inner_solver='cholesky' needs the cached K(Z, Z) on one device "
                    "(cache=True, a single entry in devices)"
                )
            with single_thread() if cache[0].device.type == "cpu" else nullcontext():
                self.chol = CholeskyFactor(cache[0], self.dtype)
        return self.chol

    def kzz_matmul(self, w: Tensor, rows: int) -> Tensor:
        """``K(Z, Z) @ w`` in row blocks (from the cache when there is one)."""
        p = self.centers.p
        rows = max(1, min(p, rows))
        return torch.cat(
            [self.centers.cached_matmul(slice(a, min(a + rows, p)), w) for a in range(0, p, rows)]
        )

    def solve(
        self, theta: Tensor, u: Tensor, nystrom: Nystrom, k_zs: Tensor | None, rows: int
    ) -> Tensor:
        """New ``theta`` with ``K(Z, Z) theta = u`` (``theta`` is the warm start)."""
        if self.exact:
            self.last = {"epochs": 0.0, "rel_residual": 0.0}
            return self._ensure_factor().solve(u)
        ctx = single_thread() if self.centers.main.type == "cpu" else nullcontext()
        epochs, rel = 0, float("inf")
        unorm = float(u.norm())
        with ctx:
            while epochs < HARD_ROUNDS * self.max_epochs:
                info = eigenpro2_solve(
                    self.centers,
                    nystrom,
                    theta,
                    u,
                    k_zs,
                    tol=self.tol,
                    max_epochs=self.max_epochs,
                    decrease=self.decrease,
                    generator=self.generator,
                )
                epochs += int(info["epochs"])
                res = float((u - self.kzz_matmul(theta, rows)).norm())
                rel = res / unorm if unorm > 0 else res
                if rel <= self.tol or self.decrease > 0:
                    break
        if rel > self.tol and self.decrease == 0 and self.can_cholesky():
            theta = self._ensure_factor().solve(u)
            self.fallback = True  # later projections go straight to Cholesky
            rel = 0.0
        self.last = {"epochs": float(epochs), "rel_residual": rel}
        if rel > self.tol:
            self.interval_cap = max(1, self.interval_cap // 2)
        elif epochs <= self.max_epochs:
            self.interval_cap = min(MAX_INTERVAL, 2 * self.interval_cap)
        self.inner_epochs = 0.7 * self.inner_epochs + 0.3 * epochs
        return theta
