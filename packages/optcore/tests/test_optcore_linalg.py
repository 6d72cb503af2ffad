import pytest
import torch

from optcore.linalg import (
    damped_inverse,
    inverse_root,
    safe_eigh,
    solve_triangular_left,
    solve_triangular_right,
    topk_eigh,
)


def spd(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=dtype)
    return A @ A.T / n + 0.1 * torch.eye(n, dtype=dtype)


def test_safe_eigh_reconstructs_and_damps():
    A = spd(6)
    evals, evecs = safe_eigh(A, damping=0.5)
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, A + 0.5 * torch.eye(6))
    ref = torch.linalg.eigvalsh(A)
    torch.testing.assert_close(evals, ref + 0.5)


def test_safe_eigh_symmetrizes_and_keeps_dtype():
    A = spd(5, dtype=torch.float32)
    skew = torch.triu(torch.ones(5, 5), 1)
    evals, _ = safe_eigh(A + skew - skew.T)  # antisymmetric part is dropped
    torch.testing.assert_close(evals, torch.linalg.eigvalsh(A), atol=1e-5, rtol=1e-5)
    assert evals.dtype == torch.float32


def test_safe_eigh_rejects_nonfinite_and_nonsquare():
    with pytest.raises(ValueError, match="non-finite"):
        safe_eigh(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        safe_eigh(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="damping"):
        safe_eigh(torch.eye(2), damping=-1.0)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_inverse_root(p):
    A = spd(7, seed=p)
    R = inverse_root(A, p, damping=0.01)
    M = torch.linalg.matrix_power(R, p) @ (A + 0.01 * torch.eye(7))
    torch.testing.assert_close(M, torch.eye(7, dtype=torch.float64), atol=1e-8, rtol=0)


def test_damped_inverse_and_singular_fallback():
    A = spd(5)
    torch.testing.assert_close(
        damped_inverse(A, 0.1) @ (A + 0.1 * torch.eye(5)), torch.eye(5, dtype=torch.float64)
    )
    singular = torch.zeros(3, 3)
    inv = damped_inverse(singular, 0.0)  # Cholesky fails; eigen fallback stays finite
    assert torch.isfinite(inv).all()
    torch.testing.assert_close(damped_inverse(singular, 2.0), torch.eye(3) / 2.0)


def test_topk_eigh_matrix_and_callable():
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64))
    spectrum = 0.7 ** torch.arange(50, dtype=torch.float64)
    A = Q @ torch.diag(spectrum) @ Q.T
    evals, evecs = topk_eigh(A, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(evals, spectrum[:5], atol=1e-8, rtol=1e-8)
    # eigenvectors up to sign
    overlap = (evecs.T @ Q[:, :5]).abs()
    torch.testing.assert_close(overlap, torch.eye(5, dtype=torch.float64), atol=1e-6, rtol=0)
    ev2, _ = topk_eigh(
        lambda X: A @ X, 3, n=50, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(ev2, spectrum[:3], atol=1e-8, rtol=1e-8)
    with pytest.raises(ValueError, match="k must be"):
        topk_eigh(A, 0)
    with pytest.raises(ValueError, match="n is required"):
        topk_eigh(lambda X: X, 2)


def test_triangular_helpers():
    L = torch.tril(spd(4)) + torch.eye(4, dtype=torch.float64)
    B = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(L @ solve_triangular_left(L, B), B)
    C = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(solve_triangular_right(L.T, C, upper=True) @ L.T, C)
