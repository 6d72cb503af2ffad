"""General kernel models ``f(x) = sum_j alpha_j K(x, z_j)`` trained with EigenPro3.

The iteration (Abedsoltan, Belkin, Pandit, 2023) is projected, preconditioned
SGD in the RKHS restricted to the model space ``C = span{K(., z_j)}``. With the
Nystrom preconditioner ``P`` built on a subsample ``X_s`` of the centers (so
``P`` maps ``C`` into ``C``), one step on a batch ``(X_m, y_m)`` reads, in
coefficients::

    r     = K(X_m, Z) alpha - y_m                      (residuals)
    h     = K(Z, X_m) r                                (gradient values at Z)
    alpha <- alpha - eta (I - S F F^T K(X_s, Z)) (K(Z, Z)^{-1} h / m + ridge alpha)

where ``S`` puts subsample rows into place. Because ``X_s`` is part of ``Z``,
``K(X_s, Z) K(Z, Z)^{-1} h = h[s]``: the preconditioner costs nothing extra and
the exact p-center least-squares minimizer stays the fixed point.

The projection ``K(Z, Z)^{-1}`` is never formed. The model keeps the exact
target values ``u = K(Z, Z) theta`` of the projected part and re-solves
``K(Z, Z) theta = u`` by a warm-started inner EigenPro2 (relative stopping
test); ``alpha = theta + S d`` with the cheap subsample part ``d`` kept exactly.

Delayed projection (EigenPro4 style): between solves the model also holds the
batches since the last solve as temporary centers; solving every ``T`` batches
(and at the end of every epoch) is chosen automatically when its estimated
cost is lower. Kernel blocks are evaluated in row chunks sized to a memory
budget, so memory stays O(p (d + c + q)) plus one block (plus ``K(Z, Z)`` when
it fits the budget and caching is on).

After each epoch of :meth:`~eigenpro3.training.TrainingLoops.fit_epoch` an optional
model-space correction (:mod:`eigenpro3.correction`; on by default when cheap)
takes one full-gradient step preconditioned by an estimate of the p-center
Hessian, and its full gradient serves the next epoch as an SVRG snapshot
(``K(Z, x) (f(x) - f~(x)) + m g~`` replaces ``K(Z, x) r``). Both keep the exact
minimizer as the fixed point; they remove the slow, single-center directions and
the constant-step noise floor that the preconditioner cannot reach.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from eigenpro3._checks import check_features, check_finite, check_matrix, targets_2d
from eigenpro3.blocks import (
    CenterSet,
    chunked_kernel_matmul,
    default_memory_bytes,
    rows_for_budget,
)
from eigenpro3.checkpoint import Checkpointing
from eigenpro3.correction import HessianCorrection, covers_centers, match_rows
from eigenpro3.datasets import batch_loader
from eigenpro3.kernels import KernelFn, get_kernel
from eigenpro3.preconditioner import build_nystrom, preconditioned_top_eigenvalue
from eigenpro3.projection import Projector, choose_interval
from eigenpro3.training import TrainingLoops
from optcore.distributed import get_rank, get_world_size

__all__ = ["KernelModel"]

ScoreFn = Callable[[Tensor, Tensor], Any]


class KernelModel(TrainingLoops, Checkpointing):
    """A kernel model with ``p`` centers trained by EigenPro3.

    Args:
        n_outputs: number of outputs ``c`` (classes for one-hot targets).
        centers: (p, d) model centers ``Z`` (need not be training points).
        kernel_fn: kernel name (``"laplacian"``, ``"gaussian"``, ``"dispersal"``,
            ``"ntk_relu"``) or a callable ``K(X, Z)``.
        X, y: optional training data; ``model.train_loaders`` is built from them.
        devices: devices sharding the centers (default: the centers' device); the
            first is the main device holding the weights.
        batch_size: training batch size (default ``min(m*, n)``, ``m*`` the
            critical batch size of the preconditioned kernel).
        nystrom_size: Nystrom subsample size ``s`` (default ``min(p, 1500)``).
        top_q: flattened eigendirections ``q`` (default ``min(160, s // 8)``).
        ridge: ridge term ``lambda`` of ``1/(2n) sum |f(x) - y|^2 + lambda/2 |f|^2``.
        memory_gb: memory budget for kernel blocks and caches (default a quarter
            of the machine's memory, at most 8 GiB).
        dtype: weights and kernel dtype (default float32, float64 if the centers are).
        projection: ``"auto"``, ``"every"`` (solve after every batch) or ``"delayed"``.
        projection_interval: batches between solves in delayed mode (default: by cost).
        inner_tol: relative residual tolerance of the inner EigenPro2 solves.
        inner_max_epochs: epochs over the centers per inner EigenPro2 run. After each run
            the exact residual is checked; a solve that misses ``inner_tol`` goes on
            for up to 5 runs, then falls back to a float64 Cholesky solve when the
            cached ``K(Z, Z)`` and its factor fit the budget.
        inner_decrease: an inner solve also stops once it has cut its residual by this
            factor; the rest stays in ``u - K(Z, Z) theta`` and is removed by later
            warm-started solves (``0``: always solve to ``inner_tol``).
        inner_solver: ``"auto"`` (default: ``"cholesky"`` when the cached ``K(Z, Z)``
            and a Cholesky factor fit the budget on one device, else ``"eigenpro2"``),
            ``"eigenpro2"`` (O(p) extra memory) or ``"cholesky"``: one Cholesky
            factorization at construction, then exact triangular solves (see
            :mod:`eigenpro3.projection`).
        cache: cache ``K(Z, Z)``: ``"auto"`` (when it fits half the budget), ``True``, ``False``.
        correction: after every epoch of :meth:`fit_epoch` / :meth:`fit`, one pass over
            the data for the full gradient and one step along it preconditioned by
            an estimate of the p-center least-squares Hessian (exact on the training
            rows that are centers, sampled on the others), with a line search (see
            :mod:`eigenpro3.correction`; the fixed point is unchanged). ``"auto"``
            (default): on when ``X`` is given, the inner solver is Cholesky,
            ``p <= 8192``, its float64 factorization (``24 p^2`` bytes while it is
            built, then one ``p x p`` factor in the model dtype) fits the budget and the
            training rows equal to centers plus ``correction_sample`` reach ``p``.
        correction_sample: rows sampled for the non-center part of the estimate.
        variance_reduction: with the correction on, the next :meth:`fit_epoch` over the
            same loaders uses its full gradient ``g~`` at the point ``alpha~`` before the
            step as an SVRG snapshot (Johnson & Zhang 2013): the batch gradient becomes
            ``K(Z, x) (f(x) - f~(x)) + m g~`` (unbiased, the same fixed point, no SGD
            noise floor); one more ``c`` columns in each step's first product.
        seed: seed of the Nystrom subsample, the loaders and the inner batch order.
        verbose: show tqdm progress bars.
        **kernel_kwargs: arguments bound to a named kernel (``bandwidth``, ``depth``).

    Raises:
        ValueError / TypeError: for bad input, naming the argument.
    """

    def __init__(
        self,
        n_outputs: int,
        centers: Tensor,
        kernel_fn: str | KernelFn,
        X: Tensor | None = None,
        y: Tensor | None = None,
        devices: Sequence[torch.device | str] | None = None,
        *,
        batch_size: int | None = None,
        nystrom_size: int | None = None,
        top_q: int | None = None,
        ridge: float = 0.0,
        memory_gb: float | None = None,
        dtype: torch.dtype | None = None,
        projection: str = "auto",
        projection_interval: int | None = None,
        inner_tol: float = 1e-3,
        inner_max_epochs: int = 10,
        inner_decrease: float = 0.0,
        inner_solver: str = "auto",
        cache: bool | str = "auto",
        correction: bool | str = "auto",
        correction_sample: int = 2000,
        variance_reduction: bool = True,
        seed: int = 0,
        verbose: bool = True,
        **kernel_kwargs: float,
    ) -> None:
        if isinstance(n_outputs, bool) or not isinstance(n_outputs, int) or n_outputs < 1:
            raise ValueError(f"n_outputs must be a positive int, got {n_outputs!r}")
        if projection not in ("auto", "every", "delayed"):
            raise ValueError(f"projection must be 'auto', 'every' or 'delayed', got {projection!r}")
        if not ridge >= 0 or not math.isfinite(ridge):
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
        if projection_interval is not None and projection_interval < 1:
            raise ValueError(f"projection_interval must be >= 1, got {projection_interval}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        centers = check_matrix(centers, "centers")
        check_finite(centers, "centers")
        self.dtype = dtype or (torch.float64 if centers.dtype == torch.float64 else torch.float32)
        if not self.dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {self.dtype}")
        self.devices = [torch.device(d) for d in (devices or [centers.device])]
        if not self.devices:
            raise ValueError("devices must name at least one device")
        self.main = self.devices[0]
        self.kernel_fn = get_kernel(kernel_fn, **kernel_kwargs)
        self.n_outputs = n_outputs
        self.ridge = float(ridge)
        self.projection = projection
        self.projection_interval = projection_interval
        self.inner_tol = inner_tol
        self.inner_max_epochs = inner_max_epochs
        self.inner_decrease = inner_decrease
        if inner_solver not in ("auto", "eigenpro2", "cholesky"):
            raise ValueError(
                f"inner_solver must be 'auto', 'eigenpro2' or 'cholesky', got {inner_solver!r}"
            )
        if correction not in ("auto", True, False):
            raise ValueError(f"correction must be 'auto', True or False, got {correction!r}")
        if correction_sample < 1:
            raise ValueError(f"correction_sample must be >= 1, got {correction_sample}")
        self.verbose = verbose
        self.variance_reduction = bool(variance_reduction)
        # SVRG snapshot: (alpha~, mean gradient values g~ at Z, K(Z, Z)^{-1} g~, loaders)
        self._snapshot: tuple[Tensor, Tensor, Tensor, list[Any]] | None = None
        self._vr_loaders: list[Any] | None = None
        self.seed = seed
        self.world_size, self.rank = get_world_size(), get_rank()
        centers = centers.to(self.main, self.dtype)
        p, d = centers.shape
        self.X: Tensor | None = None
        self.y: Tensor | None = None
        if (X is None) != (y is None):
            raise ValueError("X and y must be given together")
        if X is not None:
            X = check_matrix(X, "X")
            check_features(X, d, "X")
            check_finite(X, "X")
            self.X = X.to(dtype=self.dtype)
            self.y = targets_2d(y, X.shape[0], "y", dtype=self.dtype, n_outputs=n_outputs)

        itemsize = centers.element_size()
        s = min(p, 1500) if nystrom_size is None else nystrom_size
        c = n_outputs
        fixed = itemsize * (p * (d + 4 * c) + s * (s + 2 * c + 160)) + 8 * s * s
        self.memory_bytes = default_memory_bytes() if memory_gb is None else int(memory_gb * 2**30)
        if self.memory_bytes <= fixed:
            raise ValueError(
                f"memory_gb is too small: the model state needs about {fixed / 2**30:.3g} GiB "
                f"but memory_gb allows {self.memory_bytes / 2**30:.3g} GiB"
            )
        budget = self.memory_bytes - fixed
        use_cache = cache is True or (cache == "auto" and p * (p + s) * itemsize <= budget // 2)
        if use_cache:
            budget -= p * (p + s) * itemsize
        if inner_solver == "auto":
            one = len(self.devices) == 1
            inner_solver = "cholesky" if use_cache and one and 8 * p * p <= budget else "eigenpro2"
        self.inner_solver = inner_solver
        factor_budget = budget
        if inner_solver == "cholesky":
            budget -= p * p * itemsize
        want = correction is True or (
            correction == "auto" and self.X is not None and inner_solver == "cholesky"
        )
        match = None
        if correction == "auto" and want:
            want = p <= 8192 and 3 * 8 * p * p <= budget
            if want:
                assert self.X is not None
                match = match_rows(self.X, centers)
                want = covers_centers(match, p, correction_sample)
        if want:
            if self.X is None:
                raise ValueError("correction=True needs X and y passed to KernelModel")
            if not use_cache or len(self.devices) != 1:
                raise ValueError(
                    "correction=True needs the cached K(Z, Z) on one device "
                    "(cache=True, a single entry in devices)"
                )
            budget -= itemsize * p * p
        rows_for_budget(p, itemsize, budget)  # raises when not even one row fits
        self._budget = budget
        self._gen = torch.Generator().manual_seed(seed)
        self.centers = CenterSet(
            centers, self.kernel_fn, self.devices, budget=budget, cache=use_cache
        )
        self.nystrom = build_nystrom(
            centers, self.kernel_fn, size=nystrom_size, top_q=top_q, generator=self._gen
        )
        self._refresh_nystrom_blocks()
        self.projector = Projector(
            self.centers,
            solver=inner_solver,
            budget=factor_budget,
            tol=inner_tol,
            max_epochs=inner_max_epochs,
            decrease=inner_decrease,
            dtype=self.dtype,
            generator=self._gen,
        )
        if self.X is not None:
            self._measure_spectrum(self.X)
        self.correction: HessianCorrection | None = None
        if want:
            assert self.X is not None
            self.correction = HessianCorrection(
                self.centers,
                self.X.to(self.main),
                sample=correction_sample,
                ridge=self.ridge,
                generator=self._gen,
                match=match,
            )
        self.theta = torch.zeros(p, c, dtype=self.dtype, device=self.main)
        self.u = torch.zeros_like(self.theta)
        self.d_s = torch.zeros(len(self.nystrom.idx), c, dtype=self.dtype, device=self.main)
        self._temps_x: list[Tensor] = []
        self._temps_a: list[Tensor] = []
        self._since_solve = 0
        m_star = self.nystrom.critical_batch_size()
        n = len(self.X) if self.X is not None else m_star
        self.batch_size = int(batch_size) if batch_size is not None else max(1, min(m_star, n))
        self._train_loaders: list[Any] | None = None

    # ------------------------------------------------------------------ state
    def _refresh_nystrom_blocks(self) -> None:
        idx = self.nystrom.idx
        z_s = self.centers.centers[idx]
        self._k_zs = (
            chunked_kernel_matmul(
                self.kernel_fn,
                self.centers.centers,
                z_s,
                torch.eye(len(idx), dtype=self.dtype, device=self.main),
                budget=self._budget,
            )
            if self.centers.cache is not None
            else None
        )
        self._k_ss = self.kernel_fn(z_s, z_s) if self.ridge > 0 else None

    def _measure_spectrum(self, x: Tensor) -> None:
        """Set ``nystrom.lam_data`` from up to 1024 training rows (max over processes).

        The top eigenvalue of ``P H_b`` on ``b`` sampled rows is biased upwards by
        each row's own contribution, about ``beta_P / b`` for kernels whose rows are
        nearly orthogonal (high dimensions): on the synthetic d = 100 benchmark data
        ``lam_b - beta_P / b`` stayed at 1.18-1.32e-3 for b = 256 ... 8192 while
        ``lam_b`` fell from 5.0e-3 to 1.3e-3. The iteration's operator is ``H_n`` on
        all ``n`` rows, so ``beta_P (1/b - 1/n)`` is subtracted (never more than
        3/4 of the measurement; no correction when ``b = n``).
        """
        rows = x[torch.randperm(len(x), generator=self._gen)[:1024]] if len(x) else x
        lam = 0.0
        if len(rows):
            lam = preconditioned_top_eigenvalue(
                self.kernel_fn,
                rows.to(self.main, self.dtype),
                self.centers.centers[self.nystrom.idx],
                self.nystrom.F,
                generator=self._gen,
            )
            n = len(x)  # every process holds all of X (train_loaders shard it)
            bias = self.nystrom.beta_p * (1.0 / len(rows) - 1.0 / n)
            lam = max(lam - bias, 0.25 * lam)
        if self.world_size > 1:
            t = torch.tensor([lam], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            lam = float(t)
        self.nystrom.lam_data = lam

    @property
    def weights(self) -> Tensor:
        """Coefficients ``alpha`` (p, c) of the projected model."""
        alpha = self.theta.clone()
        alpha.index_add_(0, self.nystrom.idx, self.d_s)
        return alpha

    @property
    def train_loaders(self) -> list[Any]:
        """Loaders over ``X, y`` (this process's shard under ``torch.distributed``)."""
        if self.X is None or self.y is None:
            raise ValueError("train_loaders needs X and y passed to KernelModel")
        if self._train_loaders is None:
            xs, ys = self.X[self.rank :: self.world_size], self.y[self.rank :: self.world_size]
            local = max(1, math.ceil(self.batch_size / self.world_size))
            gen = torch.Generator().manual_seed(self.seed + 1 + self.rank)
            self._train_loaders = [batch_loader(xs, ys, local, generator=gen)]
        return self._train_loaders

    # -------------------------------------------------------------- training
    def _interval(self, m: int) -> int:
        """Batches between projections: 1 (every batch) or a cost-minimizing ``T``."""
        pr = self.projector
        if self.projection == "every" or self.world_size > 1:
            return 1
        if self.projection_interval is not None:
            return min(self.projection_interval, pr.interval_cap)
        best_t = choose_interval(
            p=self.centers.p,
            d=self.centers.d,
            c=self.n_outputs,
            m=m,
            solve_epochs=pr.inner_epochs,
            cached=self.centers.cache is not None,
            exact=pr.exact,
            cap=pr.interval_cap,
            budget=self._budget,
        )
        if self.projection == "delayed":
            return max(best_t, min(2, pr.interval_cap))
        return best_t

    @property
    def last_inner(self) -> dict[str, float]:
        """The last projection's inner ``epochs`` and exact ``rel_residual``."""
        return self.projector.last

    @torch.no_grad()
    def project(self) -> None:
        """Solve ``K(Z, Z) theta = u`` (warm started) and drop temporary centers.

        See :mod:`eigenpro3.projection` for the solvers and the exact-residual
        check of the EigenPro2 solve (before that check, projecting an unsolved
        ``theta`` made long delayed intervals drift or diverge).
        """
        self.theta = self.projector.solve(
            self.theta, self.u, self.nystrom, self._k_zs, self.batch_size
        )
        self._temps_x.clear()
        self._temps_a.clear()
        self._since_solve = 0

    @torch.no_grad()
    def correct(self, train_loaders: Any) -> dict[str, float] | None:
        """The model-space correction step after an epoch (no-op when it is off).

        One pass over ``train_loaders`` for the full gradient at the current
        model, then ``alpha <- alpha - t M^{-1} g`` (see :mod:`eigenpro3.correction`).
        Returns the step lengths and the mean squared error before the step.
        """
        corr = self.correction
        if corr is None:
            return None
        if corr.ridge != self.ridge:  # changed by load_state_dict
            corr = self.correction = HessianCorrection(
                self.centers, corr.X, sample=corr.sample_size, ridge=self.ridge, generator=self._gen
            )
        self.flush()
        loaders = (
            list(train_loaders) if isinstance(train_loaders, (list, tuple)) else [train_loaders]
        )
        alpha = self.weights
        grad = torch.zeros_like(alpha)
        stats = [0.0, 0.0]  # rows, squared error
        for batch in chain.from_iterable(loaders):
            x = self._check_x(batch[0])
            y2 = targets_2d(batch[1], len(x), "y", dtype=self.dtype, n_outputs=self.n_outputs)
            y2 = y2.to(self.main)
            if len(x) == 0:
                continue

            def residual(pred: Tensor, sl: slice, y2: Tensor = y2) -> Tensor:
                pred -= y2[sl]
                stats[1] += float(pred.pow(2).sum())
                return pred

            grad += self.centers.residual_step(x, alpha, residual)
            stats[0] += len(x)
        if self.world_size > 1:
            flat = torch.cat([grad.flatten().double().cpu(), torch.tensor(stats).double()])
            dist.all_reduce(flat)
            grad = flat[:-2].reshape(grad.shape).to(self.main, self.dtype)
            stats = [float(flat[-2]), float(flat[-1])]
        rows = round(stats[0])
        if rows == 0:
            return None
        kzz = self._kzz_matmul
        if self.ridge > 0:
            grad += (rows * self.ridge) * kzz(alpha)
        if self.variance_reduction:
            g_mean = grad / rows
            if self.ridge > 0:
                g_mean -= self.ridge * kzz(alpha)  # the data part only
            theta_g = self.projector.solve(
                torch.zeros_like(g_mean), g_mean, self.nystrom, self._k_zs, self.batch_size
            )
            self._snapshot = (alpha, g_mean, theta_g, loaders)
        d, t = corr.step(grad, rows, kzz)
        d.mul_(t)
        self.theta.sub_(d)
        self.u.sub_(kzz(d))
        return {
            "step": float(t.mean()),
            "mse_before": stats[1] / (rows * self.n_outputs),
        }

    def _begin_epoch(self, loaders: list[Any]) -> None:
        """Use the SVRG snapshot in this epoch when it was taken over these loaders."""
        snap = self._snapshot
        same = snap is not None and len(snap[3]) == len(loaders)
        if same and snap is not None:
            same = all(a is b for a, b in zip(snap[3], loaders, strict=True))
        self._vr_loaders = loaders if same and self.variance_reduction else None

    def _end_epoch(self) -> None:
        self._vr_loaders = None

    def _kzz_matmul(self, w: Tensor) -> Tensor:
        return self.projector.kzz_matmul(w, max(1, self.centers._rows()))

    def flush(self) -> None:
        """Project pending temporary centers (no-op when there are none)."""
        if self._since_solve:
            self.project()

    def _check_x(self, x: Tensor, name: str = "x") -> Tensor:
        x = check_matrix(x, name)
        check_features(x, self.centers.d, name)
        check_finite(x, name)
        return x.to(self.main, self.dtype)

    def _temp_values(self, x: Tensor) -> Tensor | None:
        if not self._temps_x:
            return None
        tx, ta = torch.cat(self._temps_x), torch.cat(self._temps_a)
        return chunked_kernel_matmul(self.kernel_fn, x, tx, ta, budget=self._budget)

    @torch.no_grad()
    def fit_batch(self, x: Tensor, y: Tensor) -> float:
        """One EigenPro3 step on the batch ``(x, y)``; returns its mean squared error.

        Under ``torch.distributed`` every process passes its own part of the
        global batch (possibly empty); gradients are summed across processes.
        """
        if len(x) == 0:
            x = torch.zeros(0, self.centers.d, dtype=self.dtype, device=self.main)
            y2 = torch.zeros(0, self.n_outputs, dtype=self.dtype, device=self.main)
        else:
            x = self._check_x(x)
            y2 = targets_2d(y, len(x), "y", dtype=self.dtype, n_outputs=self.n_outputs)
            y2 = y2.to(self.main)
        if self.nystrom.lam_data == 0.0:
            self._measure_spectrum(x)
        temp = self._temp_values(x) if len(x) else None
        sq = [0.0]
        chunks: list[Tensor] = []

        def residual(pred: Tensor, sl: slice) -> Tensor:
            if temp is not None:
                pred += temp[sl]
            pred -= y2[sl]
            sq[0] += float(pred.pow(2).sum())
            chunks.append(pred)
            return pred

        alpha = self.weights
        snap = self._snapshot if self._vr_loaders is not None else None
        c = self.n_outputs
        if snap is not None and len(x):

            def vr_residual(pred2: Tensor, sl: slice) -> Tensor:
                r = residual(pred2[:, :c], sl)  # f(x) - y, loss recorded
                r_vr = r + y2[sl] - pred2[:, c:]  # f(x) - f~(x)
                chunks[-1] = r_vr  # temporary centers carry f - f~ (g~ lives at Z)
                return r_vr

            w = torch.cat([alpha, snap[0]], 1)
            h = self.centers.residual_step(x, w, vr_residual, out_cols=c)
        elif len(x):
            h = self.centers.residual_step(x, alpha, residual)
        else:
            h = torch.zeros_like(alpha)
        m, sum_sq = len(x), sq[0]
        if self.world_size > 1:
            extra = torch.tensor([float(m), sum_sq], dtype=torch.float64)
            flat = torch.cat([h.flatten().double().cpu(), extra])
            dist.all_reduce(flat)
            h = flat[:-2].reshape(h.shape).to(self.main, self.dtype)
            m, sum_sq = round(float(flat[-2])), float(flat[-1])
        if m == 0:
            return float("nan")
        if snap is not None:
            h += m * snap[1]
        eta = self.nystrom.step_size(m)
        lam = self.ridge
        idx = self.nystrom.idx
        g_s = h[idx] / m
        if lam > 0 and self._k_ss is not None:
            g_s += lam * (self.u[idx] + self._k_ss @ self.d_s)
        shrink = 1.0 - eta * lam
        self.u.mul_(shrink).add_(h, alpha=-eta / m)
        self.d_s.mul_(shrink).add_(self.nystrom.correction(g_s), alpha=eta)
        self.theta.mul_(shrink)
        if snap is not None:
            self.theta.sub_(snap[2], alpha=eta)
        t = self._interval(m)
        if t > 1:
            for a in self._temps_a:
                a.mul_(shrink)
            if len(x):
                self._temps_x.append(x)
                self._temps_a.append(torch.cat(chunks).mul_(-eta / m))
            self._since_solve += 1
            if self._since_solve >= t:
                self.project()
        else:
            self._since_solve += 1
            self.project()
        return sum_sq / (m * self.n_outputs)

    # ------------------------------------------------------------- inference
    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Model outputs ``f(x)`` (n, c), computed in chunks (includes pending temporaries)."""
        x = self._check_x(x)
        out = self.centers.matmul(x, self.weights)
        temp = self._temp_values(x)
        return out if temp is None else out + temp

    def __call__(self, x: Tensor) -> Tensor:
        return self.predict(x)
