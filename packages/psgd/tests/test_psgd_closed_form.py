"""Fitted preconditioners against closed forms on fixed quadratics.

Whitening: ``P -> (E[g g^T])^{-1/2}``; Newton: ``P -> |H|^{-1}``. The relative error
must fall as the preconditioner step size is annealed (constant steps leave an
error proportional to the step).
"""

from __future__ import annotations

import math

import pytest
import torch

import psgd

GEOMS = list(psgd.GEOMETRIES)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: avoid thread-pool wake-ups dominating on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _spd(n: int, cond: float, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    e = torch.logspace(0, math.log10(cond), n, dtype=torch.float64)
    return q @ torch.diag(e) @ q.T


def _mpow(a: torch.Tensor, p: float) -> torch.Tensor:
    e, v = torch.linalg.eigh(a)
    return v @ torch.diag(e.abs() ** p) @ v.T


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double() - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("geometry", GEOMS)
def test_kron_whiten_converges_to_inverse_sqrt_covariance(geometry: str) -> None:
    gen = torch.Generator().manual_seed(0)
    c1, c2 = _spd(4, 10.0, gen), _spd(3, 10.0, gen)
    target = _mpow(torch.kron(c1, c2), -0.5)
    l1, l2 = torch.linalg.cholesky(c1), torch.linalg.cholesky(c2)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    opt = psgd.KronWhiten(
        [p], lr=0.0, geometry=geometry, preconditioner_max_skew=math.inf, damping=0.0
    )
    errors = []
    for lr in (0.1, 0.03, 0.01):
        opt.param_groups[0]["lr_preconditioner"] = lr
        for _ in range(300):
            p.grad = l1 @ torch.randn(4, 3, generator=gen, dtype=torch.float64) @ l2.T
            opt.step()
        errors.append(_rel(opt.preconditioner(p), target))
    assert errors[-1] < 0.2, errors
    assert errors[-1] < errors[0], errors
    assert errors[-1] < errors[0], errors
    assert torch.equal(p.detach(), torch.zeros(4, 3, dtype=torch.float64))  # lr = 0


@pytest.mark.parametrize("geometry", GEOMS)
def test_kron_newton_converges_to_inverse_abs_hessian(geometry: str) -> None:
    gen = torch.Generator().manual_seed(1)
    h1 = _spd(4, 10.0, gen)
    h2 = torch.diag(torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64))  # indefinite
    hess = torch.kron(h1, h2)
    target = _mpow(hess, -1.0)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    opt = psgd.KronNewton(
        [p], lr=0.0, geometry=geometry, preconditioner_max_skew=math.inf, damping=0.0
    )
    errors = []
    for lr in (0.1, 0.03, 0.01):
        opt.param_groups[0]["lr_preconditioner"] = lr
        for _ in range(300):
            opt.step(lambda: 0.5 * p.reshape(-1) @ hess @ p.reshape(-1))
        errors.append(_rel(opt.preconditioner(p), target))
    assert errors[-1] < 0.1, errors


@pytest.mark.parametrize("geometry", GEOMS)
def test_dense_newton_converges_to_inverse_abs_hessian(geometry: str) -> None:
    gen = torch.Generator().manual_seed(2)
    hess = _spd(6, 20.0, gen)
    hess[0] *= -1
    hess[:, 0] *= -1
    hess[0, 0] *= -1  # similarity by diag(-1, 1, ...) keeps the spectrum; then flip a sign:
    hess = hess - 3.0 * torch.outer(hess[:, 1], hess[:, 1]) / hess[1, 1]
    target = _mpow(hess, -1.0)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    # EQ's rank-one fitting gradients are heavy-tailed: a moving max of the bound slows it down
    beta = 0.0 if geometry == "EQ" else 0.9
    opt = psgd.DenseNewton([p], lr=0.0, geometry=geometry, damping=0.0, beta_lipschitz=beta)
    errors = []
    for lr in (0.1, 0.03, 0.01):
        opt.param_groups[0]["lr_preconditioner"] = lr
        for _ in range(300):
            opt.step(lambda: 0.5 * p @ hess @ p)
        errors.append(_rel(opt.preconditioner(p), target))
    assert errors[-1] < 0.1, errors


def test_lra_newton_converges_for_low_rank_plus_diagonal_hessian() -> None:
    gen = torch.Generator().manual_seed(3)
    d = torch.diag(torch.linspace(1.0, 5.0, 12, dtype=torch.float64))
    u = torch.randn(12, 1, generator=gen, dtype=torch.float64)
    hess = d + u @ u.T
    target = _mpow(hess, -1.0)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(12, dtype=torch.float64))
    opt = psgd.LRANewton([p], lr=0.0, rank=1, damping=0.0)
    errors = []
    for lr in (0.1, 0.03, 0.01):
        opt.param_groups[0]["lr_preconditioner"] = lr
        for _ in range(600):
            opt.step(lambda: 0.5 * p @ hess @ p)
        errors.append(_rel(opt.preconditioner(p), target))
    assert errors[-1] < 0.05, errors
    assert errors[-1] < errors[0]


def test_lra_whiten_diagonal_converges() -> None:
    torch.manual_seed(0)
    scales = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = psgd.LRAWhiten([p], lr=0.0, rank=0, damping=0.0)
    for lr in (0.1, 0.03, 0.01):
        opt.param_groups[0]["lr_preconditioner"] = lr
        for _ in range(400):
            p.grad = scales * torch.randn(4, dtype=torch.float64)
            opt.step()
    diag = torch.diagonal(opt.preconditioner(p))
    assert _rel(diag, 1.0 / scales) < 0.1


def test_whitening_p_applied_to_gradient_matches_closed_form_product() -> None:
    """The applied update equals the dense ``P`` (from the factors) times the gradient."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    opt = psgd.KronWhiten([p], lr=1.0, geometry="QEP", preconditioner_max_skew=math.inf)
    for _ in range(5):
        p.grad = torch.randn(5, 3, dtype=torch.float64)
        opt.step()
    opt.param_groups[0]["preconditioner_update_probability"] = 0.0
    big = opt.preconditioner(p)
    g = torch.randn(5, 3, dtype=torch.float64)
    before = p.detach().clone()
    p.grad = g
    opt.step()
    assert torch.allclose(before - p.detach(), (big @ g.reshape(-1)).reshape(5, 3), atol=1e-10)


@pytest.mark.parametrize("geometry", GEOMS)
def test_geometry_invariants(geometry: str) -> None:
    """EQ: stored P has a triangular Cholesky factor (P SPD); Q0.5EQ1.5: Q stays close to
    symmetric positive definite; QUAD: P symmetric PD; all: P = Q^H Q stays SPD."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(6, 5, dtype=torch.float64))
    opt = psgd.KronWhiten([p], lr=0.0, geometry=geometry, preconditioner_max_skew=math.inf)
    scale = torch.linspace(0.1, 10.0, 6, dtype=torch.float64)[:, None]
    for _ in range(100):
        p.grad = scale * torch.randn(6, 5, dtype=torch.float64)
        opt.step()
    for i in range(2):
        q = opt.state[p][f"Q{i}"]
        cache = opt.state[p].get(f"P{i}")
        big = q if geometry in ("EQ", "QUAD") else cache
        assert torch.allclose(big, big.mT, atol=1e-10)
        assert float(torch.linalg.eigvalsh(big).min()) > 0
        if geometry == "EQ":
            chol = torch.linalg.cholesky(big, upper=True)
            assert torch.equal(chol, torch.triu(chol))
        if geometry == "Q0.5EQ1.5":
            asym = torch.linalg.norm(q - q.mT) / torch.linalg.norm(q)
            assert float(asym) < 0.05
            assert float(torch.linalg.eigvalsh(0.5 * (q + q.mT)).min()) > 0
