"""Nystrom preconditioner of EigenPro, built on a subsample of the centers.

The Hessian of the square loss ``L(f) = 1/(2n) sum_i |f(x_i) - y_i|^2`` in the
RKHS is the covariance operator ``(1/n) sum_i K(., x_i) (x) K(., x_i)``. Its top
eigenpairs are estimated from ``K_ss / s`` on a subsample ``X_s`` of size ``s``:
eigenvalues ``lam_1 >= ... >= lam_{q+1}`` and unit eigenvectors ``e_i`` give the
eigenfunctions ``psi_i = K(., X_s) e_i / sqrt(s lam_i)``. EigenPro replaces the
gradient ``g`` by ``P g = g - sum_{i<=q} (1 - lam_{q+1}/lam_i) <psi_i, g> psi_i``,
flattening the top ``q`` directions to ``lam_{q+1}``. In coefficients on
``X_s`` the correction is ``F F^T g(X_s)`` with
``F = E diag(sqrt((1 - lam_{q+1}/lam_i) / (s lam_i)))``.

The subsample is drawn from the model centers, so every ``psi_i`` lies in the
model space: the preconditioner commutes with the projection onto it, the
correction needs no extra solve, and the iteration keeps the exact p-center
least-squares minimizer as its fixed point.

Critical batch size ``m* = beta_P / lam_{q+1}`` and step size
``eta(m) = m / (beta_P + (m - 1) lam_{q+1})`` follow Ma & Belkin (2017), with
``beta_P`` the largest diagonal of the preconditioned kernel on the subsample.

References:
    Ma, Belkin. Diving into the shallows (EigenPro), NeurIPS 2017.
    Ma, Belkin. Kernel machines that adapt to GPUs (EigenPro2), SysML 2019.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from eigenpro3.kernels import KernelFn
from optcore.linalg import safe_eigh, topk_eigh

__all__ = [
    "Nystrom",
    "build_nystrom",
    "kernel_diag_max",
    "preconditioned_top_eigenvalue",
    "single_thread",
]


@dataclass
class Nystrom:
    """Spectral data of the preconditioner (all tensors on the main device)."""

    idx: Tensor  # (s,) indices of the subsample among the centers
    F: Tensor  # (s, q) correction factor, model dtype
    eigvals: Tensor  # (q + 1,) top eigenvalues of K_ss / s, float64, descending
    beta: float  # max K(x, x) over the centers
    beta_p: float  # max diagonal of the preconditioned kernel on the subsample
    lam_data: float = 0.0  # top eigenvalue of P H measured on training data (0: not yet)

    @property
    def lam_next(self) -> float:
        """Top eigenvalue after preconditioning: ``max(lam_{q+1}, lam_data)``."""
        return max(float(self.eigvals[-1]), self.lam_data)

    @property
    def top_q(self) -> int:
        return int(self.F.shape[1])

    def critical_batch_size(self) -> int:
        """``m* = beta_P / lam_{q+1}`` (at least 1)."""
        return max(1, int(self.beta_p / self.lam_next))

    def step_size(self, m: int) -> float:
        """Largest stable step for batch size ``m``: ``m / (beta_P + (m - 1) lam_{q+1})``."""
        return m / (self.beta_p + (m - 1) * self.lam_next)

    def correction(self, g_s: Tensor) -> Tensor:
        """``F F^T g_s`` for values ``g_s`` (s, c) of a gradient on the subsample."""
        return self.F @ (self.F.T @ g_s)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run small dense factorizations on one thread (restored afterwards).

    On a loaded CPU, multi-threaded LAPACK ``eigh`` of a few hundred rows can be
    a thousand times slower than the single-threaded call.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def kernel_diag_max(kernel_fn: KernelFn, x: Tensor, *, chunk: int = 256) -> float:
    """``max_i K(x_i, x_i)`` computed from diagonal blocks of size ``chunk``."""
    best = -float("inf")
    for s in range(0, x.shape[0], chunk):
        xs = x[s : s + chunk]
        best = max(best, float(kernel_fn(xs, xs).diagonal().max()))
    return best


def _kernel64(kernel_fn: KernelFn, x: Tensor) -> tuple[Tensor, bool]:
    """``K(x, x)`` in float64 when the callable supports it (second value: was it)."""
    try:
        k = kernel_fn(x.double(), x.double())
        if k.dtype == torch.float64:
            return k, True
    except (RuntimeError, TypeError):
        pass
    return kernel_fn(x, x).double(), False


def build_nystrom(
    centers: Tensor,
    kernel_fn: KernelFn,
    *,
    size: int | None = None,
    top_q: int | None = None,
    generator: torch.Generator | None = None,
    psd_tol: float | None = None,
) -> Nystrom:
    """Eigendecompose ``K_ss / s`` (float64) on a random subsample of the centers.

    Args:
        centers: (p, d) model centers.
        kernel_fn: kernel callable.
        size: subsample size ``s`` (default ``min(p, 1500)``).
        top_q: number of flattened eigendirections ``q`` (default ``min(160, s // 8)``).
        generator: random generator for the subsample.
        psd_tol: negative eigenvalues below ``-psd_tol * lam_max`` reject the kernel
            (default ``1e-7 s`` in float64, ``1e-4`` if the kernel only runs in float32).

    Raises:
        ValueError: for a kernel that is not positive semidefinite (naming
            ``kernel_fn``), non-finite kernel values, or a bad ``size`` / ``top_q``.
    """
    p = centers.shape[0]
    s = min(p, 1500) if size is None else int(size)
    if not 1 <= s <= p:
        raise ValueError(f"nystrom_size must lie in [1, {p}] (the number of centers), got {s}")
    if top_q is not None and not 0 <= top_q <= s - 1:
        raise ValueError(f"top_q must lie in [0, nystrom_size - 1] = [0, {s - 1}], got {top_q}")
    q = min(max(1, min(160, s // 8)), s - 1) if top_q is None else int(top_q)
    perm = torch.randperm(p, generator=generator)[:s].sort().values
    idx = perm.to(centers.device)
    zs = centers[idx]
    k_ss, is64 = _kernel64(kernel_fn, zs)
    if not torch.isfinite(k_ss).all():
        raise ValueError("kernel_fn returned non-finite values on the centers")
    if k_ss.shape != (s, s):
        raise ValueError(f"kernel_fn must return a ({s}, {s}) block here, got {tuple(k_ss.shape)}")
    tol = (1e-7 * s if is64 else 1e-4) if psd_tol is None else psd_tol
    with single_thread():
        if s <= 600:
            evals, evecs = safe_eigh(k_ss)  # ascending
            lam_max, lam_min = float(evals[-1]), float(evals[0])
            evals, evecs = evals.flip(0), evecs.flip(1)
        else:
            evals, evecs = topk_eigh(
                k_ss, min(q + 1, s), oversample=40, iters=6, generator=generator
            )
            lam_max = float(evals[0])
            shifted = k_ss + (tol * lam_max) * torch.eye(s, dtype=k_ss.dtype, device=k_ss.device)
            _, info = torch.linalg.cholesky_ex(shifted)
            lam_min = 0.0 if int(info) == 0 else -float("inf")
            if lam_min < 0:
                lam_min = float(torch.linalg.eigvalsh(k_ss)[0])
    if lam_max <= 0 or lam_min < -tol * lam_max:
        raise ValueError(
            "kernel_fn is not positive semidefinite: K(Z_s, Z_s) has eigenvalue "
            f"{lam_min:.3e} (largest {lam_max:.3e}, tolerance {tol:.1e} relative)"
        )
    evals = evals / s
    tiny = 1e-12 * float(evals[0])
    top = evals[: q + 1].clamp(min=tiny)
    lam_next = float(top[q]) if q >= 0 else float(top[0])
    lam_q = top[:q]
    scale = ((1.0 - lam_next / lam_q) / (s * lam_q)).clamp(min=0.0).sqrt()
    f64 = evecs[:, :q] * scale
    diag = k_ss.diagonal()
    # preconditioned diagonal: K(x, x) - sum_i (1 - lam_{q+1}/lam_i) s lam_i e_i(x)^2
    shrink = ((1.0 - lam_next / lam_q) * s * lam_q).unsqueeze(0)
    beta_p = float((diag - (evecs[:, :q] ** 2 * shrink).sum(1)).max())
    beta = kernel_diag_max(kernel_fn, centers)
    # centers outside the subsample may have a larger diagonal (e.g. the NTK): scale up
    beta_p = beta_p * max(1.0, beta / float(diag.max()))
    beta_p = max(beta_p, lam_next)
    return Nystrom(idx=idx, F=f64.to(centers.dtype), eigvals=top, beta=beta, beta_p=beta_p)


def preconditioned_top_eigenvalue(
    kernel_fn: KernelFn,
    x: Tensor,
    z_s: Tensor,
    F: Tensor,
    *,
    iters: int = 30,
    generator: torch.Generator | None = None,
) -> float:
    """Top eigenvalue of ``P H_b`` for the data covariance ``H_b`` of the rows ``x``.

    The Nystrom spectrum only sees the subsample; this measures the operator the
    iteration actually applies. Functions ``K(., x) v + K(., X_s) w`` are mapped by
    ``H_b`` to ``K(., x) a`` with ``a = (K_bb v + K_bs w) / b``, and ``P`` adds
    ``-K(., X_s) F F^T K_sb a``. The nonzero eigenvalues of this linear map on the
    coefficients ``(v, w)`` are those of ``P H_b``: power iteration in float64.
    """
    b = x.shape[0]
    xd, zd, fd = x.double(), z_s.double(), F.double()
    k_bb = kernel_fn(xd, xd).double()
    k_bs = kernel_fn(xd, zd).double()
    v = torch.randn(b, 1, generator=generator, dtype=torch.float64).to(k_bb.device)
    return _power(k_bb, k_bs, fd, v, iters)


def _power(k_bb: Tensor, k_bs: Tensor, fd: Tensor, v: Tensor, iters: int) -> float:
    b = k_bb.shape[0]
    w = torch.zeros(k_bs.shape[1], 1, dtype=torch.float64, device=k_bb.device)
    lam = 0.0
    for _ in range(iters):
        norm = float(torch.cat([v, w]).norm())
        if norm == 0:
            break
        v, w = v / norm, w / norm
        a = (k_bb @ v + k_bs @ w) / b
        w = -(fd @ (fd.T @ (k_bs.T @ a)))
        v = a
        lam = float(torch.cat([v, w]).norm())
    return lam
