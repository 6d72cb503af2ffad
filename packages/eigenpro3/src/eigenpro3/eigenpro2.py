"""EigenPro2: preconditioned SGD for kernel interpolation with centers = data.

Solves ``K(X, X) alpha = y`` (the minimum-norm interpolant ``f = K(., X) alpha``)
by minibatch SGD on ``1/(2n) |K alpha - y|^2`` in the RKHS with the Nystrom
preconditioner of :mod:`eigenpro3.preconditioner`. One step on batch ``b``::

    r_b        = K(X_b, X) alpha - y_b
    alpha_b   -= eta/m r_b
    alpha_s   += eta/m F F^T K(X_s, X_b) r_b        (subsample coordinates)

:func:`eigenpro2_solve` is the iteration itself; EigenPro3 uses it, warm
started, to project onto the model centers (``X = Z``, ``y = K(Z, Z) alpha``).
:class:`EigenPro2` wraps it as a standalone kernel regressor.

Reference:
    Ma, Belkin. Kernel machines that adapt to GPUs for effective large batch
    training (EigenPro 2.0), SysML 2019.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from eigenpro3._checks import check_features, check_finite, check_matrix, targets_2d
from eigenpro3.blocks import CenterSet, default_memory_bytes
from eigenpro3.kernels import KernelFn, get_kernel
from eigenpro3.preconditioner import Nystrom, build_nystrom

__all__ = ["EigenPro2", "SolveInfo", "eigenpro2_solve"]


class SolveInfo(dict):
    """Result of :func:`eigenpro2_solve`: ``epochs`` run and final ``rel_residual``."""


def eigenpro2_solve(
    centers: CenterSet,
    nystrom: Nystrom,
    weights: Tensor,
    targets: Tensor,
    k_zs: Tensor | None,
    *,
    batch_size: int | None = None,
    tol: float = 1e-3,
    max_epochs: int = 20,
    min_epochs: int = 1,
    decrease: float = 0.0,
    generator: torch.Generator | None = None,
    progress: Any = None,
) -> SolveInfo:
    """Iterate ``weights`` (in place) towards ``K(Z, Z) weights = targets``.

    Batches are contiguous slices of ``Z`` in a fixed order (cheap views of the
    cached kernel; the order of the centers is arbitrary anyway). The relative
    stopping test uses the residuals met during an epoch:
    ``sqrt(sum_b |r_b|^2) <= tol * |targets|`` (they are one step stale, so the
    test is conservative).

    Args:
        centers: the data / centers ``Z`` with its kernel.
        nystrom: preconditioner built on a subsample of ``Z``.
        weights: (p, c) start point, updated in place.
        targets: (p, c) values to interpolate.
        k_zs: optional cached (p, s) block ``K(Z, Z_s)``.
        batch_size: minibatch size (default ``min(m*, p)``).
        tol: relative residual tolerance; ``0`` runs ``max_epochs``.
        max_epochs: epochs over ``Z`` at most.
        min_epochs: epochs over ``Z`` at least.
        decrease: also stop (from the second epoch on) once the epoch residual is
            below ``decrease`` times the first epoch's: an inexact solve whose
            remainder stays in ``targets - K weights`` and is reduced by the next
            warm-started call (error feedback). ``0`` disables it.
        generator: unused, kept for API stability.
        progress: optional callable ``progress(epoch, rel_residual)``.

    Returns:
        ``SolveInfo(epochs=..., rel_residual=...)``.
    """
    p = centers.p
    m = min(nystrom.critical_batch_size(), p) if batch_size is None else min(batch_size, p)
    eta = nystrom.step_size(m)
    idx_s = nystrom.idx
    z_s = centers.centers[idx_s]
    tnorm = float(targets.norm())
    rel = float("inf")
    first = float("inf")
    epochs = 0
    while epochs < max_epochs:
        sq = 0.0
        for start in range(0, p, m):
            b = slice(start, min(start + m, p))
            r = centers.cached_matmul(b, weights)
            r -= targets[b]
            sq += float(r.pow(2).sum())
            k_bs = k_zs[b] if k_zs is not None else centers.kernel_fn(centers.centers[b], z_s)
            g_s = k_bs.T @ r
            size = b.stop - b.start
            lr = (eta if size == m else nystrom.step_size(size)) / size
            weights[b] -= lr * r
            weights.index_add_(0, idx_s, nystrom.correction(g_s), alpha=lr)
        epochs += 1
        rel = sq**0.5 / tnorm if tnorm > 0 else sq**0.5
        if progress is not None:
            progress(epochs, rel)
        if epochs == 1:
            first = rel
        if epochs >= min_epochs and (rel <= tol or (epochs >= 2 and rel <= decrease * first)):
            break
    return SolveInfo(epochs=epochs, rel_residual=rel)


class EigenPro2:
    """Kernel interpolation ``f = K(., X) alpha`` with EigenPro2 (centers = data).

    Args:
        kernel_fn: kernel name (``"laplacian"``, ...) or callable ``K(X, Z)``.
        nystrom_size: Nystrom subsample size (default ``min(n, 1500)``).
        top_q: flattened eigendirections (default ``min(160, s // 8)``).
        batch_size: minibatch size (default the critical batch size ``m*``).
        memory_gb: memory budget for kernel blocks (and the optional cache).
        devices: devices sharding the data / centers; the first is the main one.
        dtype: floating dtype of the data and weights (default float32).
        cache: cache ``K(X, X)`` when it fits the budget (``"auto"``), always or never.
        seed: seed of the subsample and the batch order.
        verbose: show a progress bar.
        **kernel_kwargs: arguments bound to a named kernel (``bandwidth`` ...).

    Example:
        >>> ep = EigenPro2("laplacian", bandwidth=2.0, verbose=False)
        >>> hist = ep.fit(X, y, epochs=20)
        >>> yhat = ep.predict(X_test)
    """

    def __init__(
        self,
        kernel_fn: str | KernelFn,
        *,
        nystrom_size: int | None = None,
        top_q: int | None = None,
        batch_size: int | None = None,
        memory_gb: float | None = None,
        devices: Sequence[torch.device | str] | None = None,
        dtype: torch.dtype = torch.float32,
        cache: bool | str = "auto",
        seed: int = 0,
        verbose: bool = True,
        **kernel_kwargs: float,
    ) -> None:
        self.kernel_fn = get_kernel(kernel_fn, **kernel_kwargs)
        self.nystrom_size = nystrom_size
        self.top_q = top_q
        self.batch_size = batch_size
        self.memory_bytes = default_memory_bytes() if memory_gb is None else int(memory_gb * 2**30)
        self.devices = [torch.device(d) for d in (devices or ["cpu"])]
        self.dtype = dtype
        self.cache = cache
        self.seed = seed
        self.verbose = verbose
        self.centers_: CenterSet | None = None
        self.weights: Tensor | None = None
        self.nystrom: Nystrom | None = None

    def fit(self, X: Tensor, y: Tensor, *, epochs: int = 10, tol: float = 0.0) -> list[dict]:
        """Run ``epochs`` epochs (or until the relative residual is below ``tol``).

        Returns:
            One dict per epoch with ``epoch`` and ``rel_residual``.
        """
        X = check_matrix(X, "X").to(self.devices[0], self.dtype)
        y2 = targets_2d(y, X.shape[0], "y", dtype=self.dtype).to(self.devices[0])
        check_finite(X, "X")
        check_finite(y2, "y")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        gen = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(X.shape[0], generator=gen).to(X.device)
        X, y2 = X[perm], y2[perm]  # contiguous inner batches then see a random order
        n, itemsize = X.shape[0], X.element_size()
        fixed = n * (X.shape[1] + 3 * y2.shape[1]) * itemsize
        budget = self.memory_bytes - fixed
        use_cache = self.cache is True or (self.cache == "auto" and n * n * itemsize <= budget // 2)
        block_budget = budget - (n * n * itemsize if use_cache else 0)
        self.centers_ = CenterSet(
            X, self.kernel_fn, self.devices, budget=block_budget, cache=use_cache
        )
        self.nystrom = build_nystrom(
            X, self.kernel_fn, size=self.nystrom_size, top_q=self.top_q, generator=gen
        )
        k_zs = self.kernel_fn(X, X[self.nystrom.idx]) if use_cache else None
        self.weights = torch.zeros_like(y2)
        history: list[dict] = []
        bar = tqdm(total=epochs, desc="EigenPro2", disable=not self.verbose, leave=False)

        def log(epoch: int, rel: float) -> None:
            history.append({"epoch": epoch, "rel_residual": rel})
            bar.update(1)
            bar.set_postfix(rel_residual=f"{rel:.2e}")

        eigenpro2_solve(
            self.centers_,
            self.nystrom,
            self.weights,
            y2,
            k_zs,
            batch_size=self.batch_size,
            tol=tol,
            max_epochs=epochs,
            generator=gen,
            progress=log,
        )
        bar.close()
        return history

    @torch.no_grad()
    def predict(self, X: Tensor) -> Tensor:
        """``K(X, X_train) alpha`` (n, c)."""
        if self.centers_ is None or self.weights is None:
            raise RuntimeError("EigenPro2 is not fitted yet: call fit(X, y) first")
        X = check_matrix(X, "X")
        check_features(X, self.centers_.d, "X")
        check_finite(X, "X")
        return self.centers_.matmul(X.to(self.devices[0], self.dtype), self.weights)
