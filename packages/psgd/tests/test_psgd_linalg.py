"""Block products of ``psgd._linalg`` against plain products (several recursion levels)."""

from __future__ import annotations

import pytest
import torch

import psgd._linalg as L
from psgd import factors as F


@pytest.fixture(autouse=True)
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(L, "_BLOCK", 3)  # n = 29 recurses three levels, with odd halves


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("n", [5, 29])
def test_herm_mm_is_the_product(dtype: torch.dtype, n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, 11, generator=gen, dtype=dtype)
    out = L.herm_mm(a, a.mH)
    torch.testing.assert_close(out, a @ a.mH, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, out.mH, rtol=1e-14, atol=1e-14)
    # a Hermitian product of two different factors: (F P) F with F, P Hermitian
    f, p = a @ a.mH, torch.eye(n, dtype=dtype) + 0.1 * (a @ a.mH)
    torch.testing.assert_close(L.herm_mm(f @ p, f), f @ p @ f, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_triangular_products(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    n = 29
    q = torch.triu(torch.randn(n, n, generator=gen, dtype=dtype))
    u = torch.triu(torch.randn(n, n, generator=gen, dtype=dtype))
    out = L.triu_addmm_(q.clone(), u, q, -0.3)
    torch.testing.assert_close(out, q - 0.3 * u @ q, rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.tril(out, -1), torch.zeros_like(out))
    p = torch.full((n, n), float("nan"), dtype=dtype)  # the output's old contents are ignored
    L.gram_triu_into(p, q)
    torch.testing.assert_close(p, q.mH @ q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p, p.mH, rtol=1e-14, atol=1e-14)
    x = torch.randn(n, 7, generator=gen, dtype=dtype)
    torch.testing.assert_close(L.triu_left_mm(q, x), q @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(L.triu_right_mm_t(x.mT, q), x.mT @ q.mT, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(L.triu_t_left_mm(q, x), q.mH @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(L.triu_right_mm(x.mT, u), x.mT @ u, rtol=1e-12, atol=1e-12)
    # P g from the triangular factors equals P_1 g P_2^T (and along dims of a 3-D tensor)
    q2 = torch.triu(torch.randn(7, 7, generator=gen, dtype=dtype))
    g = torch.randn(n, 7, generator=gen, dtype=dtype)
    want = F.precondition(g, [q.mH @ q, q2.mH @ q2])
    torch.testing.assert_close(F.precondition_triangular(g, [q, q2]), want)
    d = torch.rand(7, generator=gen, dtype=torch.float64).to(dtype) + 0.5
    want = F.precondition(g, [q.mH @ q, (d * d.conj()).real.to(dtype)])
    torch.testing.assert_close(F.precondition_triangular(g, [q, d]), want)
    g3 = torch.randn(3, n, 7, generator=gen, dtype=dtype)
    q0 = torch.triu(torch.randn(3, 3, generator=gen, dtype=dtype))
    want = F.precondition(g3, [q0.mH @ q0, q.mH @ q, q2.mH @ q2])
    torch.testing.assert_close(F.precondition_triangular(g3, [q0, q, q2]), want)
    # through a non-contiguous output as well
    big = torch.zeros(n, 2 * n, dtype=dtype)
    L.gram_triu_into(big[:, ::2], q)
    torch.testing.assert_close(big[:, ::2], q.mH @ q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", ["EQ", "QUAD"])
def test_factor_step_matches_the_plain_formula(geometry: str) -> None:
    """One fitting step with block products equals the textbook update."""
    gen = torch.Generator().manual_seed(1)
    m, n = 13, 29
    h = torch.randn(m, n, generator=gen, dtype=torch.float64)
    v = torch.randn(m, n, generator=gen, dtype=torch.float64)
    a1 = torch.randn(m, m, generator=gen, dtype=torch.float64)
    a2 = torch.randn(n, n, generator=gen, dtype=torch.float64)
    p1 = a1 @ a1.T / m + torch.eye(m, dtype=torch.float64)
    p2 = a2 @ a2.T / n + torch.eye(n, dtype=torch.float64)
    qs = [p1.clone(), p2.clone()]
    F.update_factors(qs, [None, None], [None, None], h, v if geometry == "EQ" else None,
                     geometry=geometry, lr=0.1, beta_lip=0.0)  # fmt: skip
    if geometry == "EQ":
        c1, c2 = torch.linalg.cholesky(p1, upper=True), torch.linalg.cholesky(p2, upper=True)
        a = c1 @ h @ c2.T
        b = torch.linalg.solve_triangular(c1.T, v, upper=False)
        b = torch.linalg.solve_triangular(c2, b, upper=True, left=False)
        want = []
        for c, t1, t2 in ((c1, a @ a.T, b @ b.T), (c2, a.T @ a, b.T @ b)):
            s = float(0.1 / L.norm_lower_bound_herm(t1 + t2).float())  # bound kept in float32
            c = c - s * torch.triu(t1 - t2) @ c
            want.append(c.T @ c)
    else:
        pg = p1 @ h @ p2
        want = []
        for p, t1, k in ((p1, pg @ pg.T, n), (p2, pg.T @ pg, m)):
            s = float(0.1 / (L.norm_lower_bound_herm(t1).float() + k))
            e = torch.eye(p.shape[0], dtype=p.dtype) - s * (t1 - k * torch.eye(p.shape[0]))
            want.append(e @ p @ e)
    for got, ref in zip(qs, want):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_solve_along_each_dimension(dtype: torch.dtype) -> None:
    """``x`` times ``Q^{-H}`` along a dimension, for 2-D and 3-D ``x``."""
    gen = torch.Generator().manual_seed(2)
    q = torch.triu(torch.randn(6, 6, generator=gen, dtype=dtype)) + 4 * torch.eye(6, dtype=dtype)
    m = torch.linalg.inv(q).mH  # Q^{-H}
    x = torch.randn(6, 6, generator=gen, dtype=dtype)
    torch.testing.assert_close(L.solve_upper_h_along(q, x, 0), m @ x)
    torch.testing.assert_close(L.solve_upper_h_along(q, x, 0, transposed=True), m @ x)
    torch.testing.assert_close(L.solve_upper_h_along(q, x, 1), x @ m.mT)
    x3 = torch.randn(2, 6, 3, generator=gen, dtype=dtype)
    torch.testing.assert_close(L.solve_upper_h_along(q, x3, 1), L.apply_along(m, x3, 1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_fresh_block_products_ignore_the_outputs_old_contents(dtype: torch.dtype) -> None:
    """``fresh=True`` writes each block's first product with ``beta=0``: NaN garbage in the
    output is never read, and the result equals accumulating into zeros exactly."""
    gen = torch.Generator().manual_seed(3)
    n = 29
    t = torch.randn(n, n, generator=gen, dtype=dtype)
    x = torch.randn(n, 6, generator=gen, dtype=dtype)
    a = torch.randn(n, 9, generator=gen, dtype=dtype)
    for upper in (True, False):
        tri = torch.triu(t) if upper else torch.tril(t)
        got = torch.full((n, 6), float("nan"), dtype=dtype)
        L._tri_left_acc(got, tri, x, upper=upper, fresh=True)
        want = torch.zeros(n, 6, dtype=dtype)
        L._tri_left_acc(want, tri, x, upper=upper)
        assert torch.equal(got, want)
        torch.testing.assert_close(got, tri @ x, rtol=1e-12, atol=1e-12)
    got = torch.full((n, n), float("nan"), dtype=dtype)
    L._herm_acc(got, a, a.mH, fresh=True)
    want = torch.zeros(n, n, dtype=dtype)
    L._herm_acc(want, a, a.mH)
    assert torch.equal(L._mirror_(got), L._mirror_(want))
    torch.testing.assert_close(got, a @ a.mH, rtol=1e-12, atol=1e-12)


def test_unmirrored_grams_sum_to_the_mirrored_sum() -> None:
    """``mirror=False`` leaves the lower off-diagonal blocks unset; mirroring the sum of two
    such Grams gives exactly the sum of the two mirrored Grams (the ``"EQ"`` bound's input)."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(29, 8, generator=gen, dtype=torch.float64)
    b = torch.randn(29, 8, generator=gen, dtype=torch.float64)
    for dim in (0, 1):
        x, y = (a, b) if dim == 0 else (a.mT, b.mT)
        full = L.unfold_gram(x, dim, False) + L.unfold_gram(y, dim, False)
        both = L.unfold_gram(x, dim, False, mirror=False) + L.unfold_gram(
            y, dim, False, mirror=False
        )
        assert torch.equal(L._mirror_(both), full)
        assert torch.equal(
            torch.triu(L.unfold_gram(x, dim, False, mirror=False)),
            torch.triu(L.unfold_gram(x, dim, False)),
        )
        torch.testing.assert_close(full, x @ x.mT + y @ y.mT if dim == 0 else x.mT @ x + y.mT @ y)
