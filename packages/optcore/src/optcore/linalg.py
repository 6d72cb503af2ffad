"""Linear algebra helpers for curvature matrices.

All functions take symmetric (Hermitian) positive semi-definite matrices
unless stated otherwise. Eigendecompositions symmetrize their input, and when
LAPACK fails to converge (or returns non-finite values) they retry in float64
before giving up with a clear error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "damped_inverse",
    "inverse_root",
    "safe_eigh",
    "solve_triangular_left",
    "solve_triangular_right",
    "topk_eigh",
]


def _square(A: Tensor, arg: str = "A") -> None:
    if not isinstance(A, Tensor):
        raise TypeError(f"{arg} must be a Tensor, got {type(A).__name__}")
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(
            f"{arg} must be a square matrix (or a batch of them), got {tuple(A.shape)}"
        )


def _check_damping(damping: float) -> None:
    if not (damping >= 0.0) or damping == float("inf"):
        raise ValueError(f"damping must be finite and non-negative, got {damping}")


def safe_eigh(A: Tensor, *, damping: float = 0.0) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of the symmetric part of ``A + damping * I``.

    Retries in float64 when the first attempt fails or is non-finite, and
    returns results in ``A``'s dtype. Eigenvalues are ascending.

    Raises:
        ValueError: if ``A`` is not square or holds non-finite values.
        torch.linalg.LinAlgError: if even the float64 attempt fails.
    """
    _square(A)
    _check_damping(damping)
    if not torch.isfinite(A).all():
        raise ValueError("A holds non-finite values (NaN or inf)")
    sym = 0.5 * (A + A.mH)
    if damping:
        sym = sym + damping * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    try:
        evals, evecs = torch.linalg.eigh(sym)
        if torch.isfinite(evals).all() and torch.isfinite(evecs).all():
            return evals, evecs
    except torch.linalg.LinAlgError:
        pass
    evals, evecs = torch.linalg.eigh(
        sym.to(torch.complex128 if sym.is_complex() else torch.float64)
    )
    return evals.to(A.real.dtype), evecs.to(A.dtype)


def inverse_root(A: Tensor, p: float, *, damping: float = 0.0, eps: float = 0.0) -> Tensor:
    """``(A + damping I)^(-1/p)`` through an eigendecomposition.

    Eigenvalues are clamped below at ``eps`` (after damping) so that a
    semi-definite ``A`` with ``damping=0`` still has a finite root.
    """
    if not p > 0:
        raise ValueError(f"p must be positive, got {p}")
    evals, evecs = safe_eigh(A, damping=damping)
    floor = max(eps, torch.finfo(evals.dtype).tiny)
    scale = evals.clamp_min(floor).pow(-1.0 / p)
    return (evecs * scale.unsqueeze(-2).to(evecs.dtype)) @ evecs.mH


def damped_inverse(A: Tensor, damping: float) -> Tensor:
    """``(A + damping I)^{-1}`` by Cholesky, falling back to float64 and then eigh.

    Raises:
        ValueError: if ``A`` is not square, non-finite, or ``damping`` is negative.
    """
    _square(A)
    _check_damping(damping)
    if not torch.isfinite(A).all():
        raise ValueError("A holds non-finite values (NaN or inf)")
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    M = 0.5 * (A + A.mH) + damping * eye
    for dtype in (A.dtype, torch.float64):
        L, info = torch.linalg.cholesky_ex(M.to(dtype))
        if int(info.max()) == 0:
            inv = torch.cholesky_inverse(L)
            if torch.isfinite(inv).all():
                return inv.to(A.dtype)
    return inverse_root(A, 1.0, damping=damping, eps=1e-12)


def topk_eigh(
    A: Tensor | Callable[[Tensor], Tensor],
    k: int,
    *,
    n: int | None = None,
    iters: int = 8,
    oversample: int = 10,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` eigenpairs of a symmetric PSD operator by randomized subspace iteration.

    Args:
        A: an ``(n, n)`` matrix, or a callable mapping an ``(n, m)`` block to ``A @ block``.
        k: number of eigenpairs.
        n: operator size (required when ``A`` is a callable).
        iters: power iterations (more: sharper eigenvalues for slow spectral decay).
        oversample: extra subspace columns.
        generator: seeds the random start.
        dtype, device: of the start block when ``A`` is a callable.

    Returns:
        ``(evals, evecs)``: ``k`` eigenvalues in descending order and ``(n, k)``
        orthonormal eigenvectors.
    """
    matvec: Callable[[Tensor], Tensor]
    if isinstance(A, Tensor):
        _square(A)
        if A.dim() != 2:
            raise ValueError(f"A must be a single matrix, got shape {tuple(A.shape)}")
        mat = A
        n = A.shape[0]
        dtype, device = A.dtype, A.device

        def _dense(X: Tensor) -> Tensor:
            return mat @ X

        matvec = _dense

    elif callable(A):
        if n is None:
            raise ValueError("n is required when A is a callable")
        matvec = A
        dtype = dtype or torch.get_default_dtype()
    else:
        raise TypeError(f"A must be a Tensor or a callable, got {type(A).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if iters < 0:
        raise ValueError(f"iters must be non-negative, got {iters}")
    m = min(n, k + max(oversample, 0))
    X = torch.randn(
        n, m, generator=generator, dtype=dtype, device=generator.device if generator else device
    )
    X = X.to(device=device)
    Q, _ = torch.linalg.qr(matvec(X))
    for _ in range(iters):
        Q, _ = torch.linalg.qr(matvec(Q))
    # Rayleigh-Ritz on the subspace, in float64 for accuracy.
    B = Q.mH @ matvec(Q)
    evals, V = safe_eigh(B.to(torch.float64))
    order = torch.argsort(evals, descending=True)[:k]
    evecs = Q.to(torch.float64) @ V[:, order]
    return evals[order].to(dtype), evecs.to(dtype)


def solve_triangular_left(L: Tensor, B: Tensor, *, upper: bool = False) -> Tensor:
    """Solve ``L X = B`` for triangular ``L``."""
    _square(L, "L")
    return torch.linalg.solve_triangular(L, B, upper=upper, left=True)


def solve_triangular_right(L: Tensor, B: Tensor, *, upper: bool = False) -> Tensor:
    """Solve ``X L = B`` for triangular ``L``."""
    _square(L, "L")
    return torch.linalg.solve_triangular(L, B, upper=upper, left=False)
