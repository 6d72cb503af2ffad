"""Kron inverses used once (every-step K-FAC): Cholesky factors applied by triangular solves."""

from __future__ import annotations

import copy

import torch
from torch import nn

from optcore.linalg import damped_inverse
from torchsso import SecondOrderOptimizer
from torchsso._testing import ce_closure
from torchsso.curvature.shapes import damped_factor


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5, bias=False), nn.ReLU(),
                         nn.Linear(5, 4))  # fmt: skip


def _train(model, opt, steps, start=0):
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)

        closure = ce_closure(opt, model, x, y)

        opt.step(closure)


def _opt(model, **kw):
    return SecondOrderOptimizer(
        model, "Fisher", {"Linear": "Kron"}, {"damping": 1e-2, "ema_decay": 0.5},
        lr=0.05, momentum=0.9, kl_clip=1e-2, **kw,
    )  # fmt: skip


def test_every_step_uses_factors_and_matches_explicit_inverses():
    m1, m2 = _mlp(), _mlp()
    o1 = _opt(m1)  # curvature and inverses every step: factors + solves
    o2 = _opt(m2, inv_interval=lambda s: True)  # same schedule, explicit inverses
    _train(m1, o1, 6)
    _train(m2, o2, 6)
    st1, st2 = o1.state[o1.blocks[0].params[0]], o2.state[o2.blocks[0].params[0]]
    assert "inv_A_fac" in st1 and "inv_A_inv" not in st1
    assert torch.equal(st1["inv_fac_is_chol"], torch.ones(2))
    assert "inv_A_inv" in st2 and "inv_A_fac" not in st2
    # the factors are the Cholesky factors of the damped curvature the explicit form inverts
    L = st1["inv_A_fac"]
    torch.testing.assert_close(torch.cholesky_inverse(L), st2["inv_A_inv"], rtol=1e-4, atol=1e-5)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-6)
    # a changed interval switches the form back (inverses reused across steps)
    assert not _opt(_mlp(), curv_interval=2)._every_step
    assert _opt(_mlp(), curv_interval=2, inv_interval=1)._every_step


def test_damped_factor_and_mixed_forms_are_exact():
    torch.manual_seed(3)
    a = torch.randn(9, 4)
    A = a.T @ a / 9
    L, ok = damped_factor(A, 0.1)
    assert ok
    torch.testing.assert_close(L @ L.T, A + 0.1 * torch.eye(4))
    assert torch.equal(L, torch.tril(L))
    # not positive definite: falls back to the explicit inverse
    S = torch.diag(torch.tensor([1.0, -1.0, 2.0]))
    Sinv, ok = damped_factor(S, 0.5)
    assert not ok
    torch.testing.assert_close(Sinv, damped_inverse(S, 0.5))
    # a block whose A factor is a Cholesky factor and whose G factor is an explicit inverse
    lin = nn.Linear(3, 2)
    opt = SecondOrderOptimizer(lin, "Cov", "Kron", {"damping": 1e-3})
    b = opt.blocks[0]
    Ad = A + 0.1 * torch.eye(4)
    Gd = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    V = torch.randn(2, 4)
    want = torch.linalg.solve(Gd, V) @ torch.linalg.inv(Ad)
    for ca, cg in [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.0, 0.0)]:
        inv = {
            "A_fac": L if ca else torch.linalg.inv(Ad),
            "G_fac": torch.linalg.cholesky(Gd) if cg else torch.linalg.inv(Gd),
            "fac_is_chol": torch.tensor([ca, cg]),
        }
        got = b.precondition(inv, [V[:, :3], V[:, 3]])
        torch.testing.assert_close(torch.cat([got[0], got[1][:, None]], 1), want)


def test_every_step_state_dict_round_trip_bit_identical():
    m1 = _mlp()
    o1 = _opt(m1)
    _train(m1, o1, 8)
    m2 = _mlp()
    o2 = _opt(m2)
    _train(m2, o2, 4)
    sd_m, sd_o = copy.deepcopy(m2.state_dict()), copy.deepcopy(o2.state_dict())
    m3 = _mlp()
    o3 = _opt(m3)
    m3.load_state_dict(sd_m)
    o3.load_state_dict(sd_o)
    _train(m3, o3, 4, start=4)
    for p1, p3 in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(p1, p3)


def test_padded_factor_and_thin_solves_are_exact():
    # sizes that are multiples of 64 are factored padded; thin right-hand sides are solved
    # from the left: both must give the same X (A + d I)^-1 as a dense solve
    from torchsso.curvature.shapes import _solve_right

    torch.manual_seed(5)
    a = torch.randn(200, 128, dtype=torch.float64)
    A = a.T @ a / 200
    L, ok = damped_factor(A, 0.05)
    assert ok and L.shape == (128, 128) and L.is_contiguous()
    assert torch.equal(L, torch.tril(L))
    Ad = A + 0.05 * torch.eye(128, dtype=torch.float64)
    torch.testing.assert_close(L @ L.T, Ad)
    for rows in (3, 16, 17, 40):
        X = torch.randn(rows, 128, dtype=torch.float64)
        torch.testing.assert_close(_solve_right(X, L, True), torch.linalg.solve(Ad, X.T).T)
