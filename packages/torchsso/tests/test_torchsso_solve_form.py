"""Kron inverses used once (every-step K-FAC): Cholesky factors applied by triangular solves."""

from __future__ import annotations

import copy

import pytest
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
    assert ok and L.shape == (128, 128) and L.mT.is_contiguous()
    assert torch.equal(L, torch.tril(L))
    Ad = A + 0.05 * torch.eye(128, dtype=torch.float64)
    torch.testing.assert_close(L @ L.T, Ad)
    for rows in (3, 16, 17, 40):
        X = torch.randn(rows, 128, dtype=torch.float64)
        torch.testing.assert_close(_solve_right(X, L, True), torch.linalg.solve(Ad, X.T).T)


def _wide_mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                         nn.Linear(40, 4))  # fmt: skip


def _count_lowrank(monkeypatch):
    from torchsso.curvature.shapes import Kron

    calls = {"tried": 0, "used": 0}
    orig = Kron.precondition_dot_lowrank

    def counted(self, *args):
        calls["tried"] += 1
        out = orig(self, *args)
        calls["used"] += out is not None
        return out

    monkeypatch.setattr(Kron, "precondition_dot_lowrank", counted)
    return calls


def _train_wide(lowrank, steps, scale_grads=None, dtype=torch.float32, curv_type="Fisher"):
    model = _wide_mlp().to(dtype)
    opt = SecondOrderOptimizer(
        model, curv_type, {"Linear": "Kron"}, {"damping": 1e-2, "ema_decay": 0.5},
        lr=0.05, momentum=0.9, kl_clip=1e-2,
    )  # fmt: skip
    if not lowrank:
        opt._lowrank_enabled = False
    for s in range(steps):
        g = torch.Generator().manual_seed(100 + s)
        x, y = torch.randn(8, 6, generator=g, dtype=dtype), torch.randint(0, 4, (8,), generator=g)
        inner = ce_closure(opt, model, x, y)

        def closure(inner=inner):
            res = inner()
            if scale_grads is not None:  # e.g. clipping inside the closure, after backward
                for p in model.parameters():
                    p.grad.mul_(scale_grads)
            return res

        opt.step(closure)
    return model


@pytest.mark.parametrize("curv_type", ["Fisher", "Cov", "GaussNewton"])
def test_lowrank_solves_match_the_general_path(monkeypatch, curv_type):
    # batch 8 < the 40-wide middle layer: its K-FAC solves act on the recorded rows,
    # G^-1 (D^T X) A^-1 = (D G^-1)^T (X A^-1); the result must be the general path's
    calls = _count_lowrank(monkeypatch)
    m1 = _train_wide(True, 6, dtype=torch.float64, curv_type=curv_type)
    assert calls["used"] == 6  # the middle layer, every step (the others: not cheaper)
    m2 = _train_wide(False, 6, dtype=torch.float64, curv_type=curv_type)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-10, atol=1e-12)
    if curv_type != "Fisher":
        return
    # float32: the parameter changes agree to float rounding (relative to their norm)
    p0 = [p.detach() for p in _wide_mlp().parameters()]
    m1, m2 = _train_wide(True, 6), _train_wide(False, 6)
    for q, p1, p2 in zip(p0, m1.parameters(), m2.parameters()):
        d1, d2 = p1.detach() - q, p2.detach() - q
        assert float((d1 - d2).norm()) <= 1e-5 * float(d2.norm())


def test_lowrank_rejects_a_gradient_changed_after_backward(monkeypatch):
    # gradients scaled inside the closure are no longer D^T X: the product check refuses the
    # recorded rows and the general path preconditions the scaled gradient
    calls = _count_lowrank(monkeypatch)
    m1 = _train_wide(True, 4, scale_grads=0.5)
    assert calls["tried"] > 0 and calls["used"] == 0
    m2 = _train_wide(False, 4, scale_grads=0.5)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)


def test_lowrank_block_is_exact_and_checks_the_product():
    torch.manual_seed(7)
    lin = nn.Linear(30, 20).double()
    opt = SecondOrderOptimizer(lin, "Fisher", "Kron", {"damping": 1e-3})
    b = opt.blocks[0]
    x, d = torch.randn(5, 30, dtype=torch.float64), torch.randn(5, 20, dtype=torch.float64)
    xa = torch.cat([x, torch.ones(5, 1, dtype=torch.float64)], 1)
    V = d.T @ xa
    grads = [V[:, :30].clone(), V[:, 30].clone()]
    a, g = torch.randn(40, 31, dtype=torch.float64), torch.randn(40, 20, dtype=torch.float64)
    Ad, Gd = a.T @ a / 40 + 0.1 * torch.eye(31), g.T @ g / 40 + 0.2 * torch.eye(20)
    inv = {"A_fac": torch.linalg.cholesky(Ad), "G_fac": torch.linalg.cholesky(Gd),
           "fac_is_chol": torch.ones(2, dtype=torch.float64)}  # fmt: skip
    probe = torch.randn(31, dtype=torch.float64)
    res = b.precondition_dot_lowrank(inv, grads, x, d, probe)
    assert res is not None
    want = torch.linalg.solve(Gd, V) @ torch.linalg.inv(Ad)
    got = torch.cat([res[0][0], res[0][1][:, None]], 1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res[1], (want * V).sum(), rtol=1e-10, atol=0.0)
    # the same with explicit inverses (curvature steps of K-FAC with an inverse interval)
    inv_e = {"A_inv": torch.linalg.inv(Ad), "G_inv": torch.linalg.inv(Gd)}
    res_e = b.precondition_dot_lowrank(inv_e, grads, x, d, probe)
    assert res_e is not None
    got = torch.cat([res_e[0][0], res_e[0][1][:, None]], 1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # not the product of the rows (a changed weight gradient, a changed bias gradient, NaN)
    bad_w = [grads[0] + 1e-3 * grads[0].abs().max(), grads[1]]
    bad_b = [grads[0], grads[1] * 1.01]
    nan = [grads[0].clone(), grads[1]]
    nan[0][0, 0] = float("nan")
    for gs in (bad_w, bad_b, nan):
        assert b.precondition_dot_lowrank(inv, gs, x, d, probe) is None
        assert b.precondition_dot_lowrank(inv_e, gs, x, d, probe) is None
    # an explicit-inverse factor (the float64 / eigh fallback) takes the general path
    inv2 = dict(inv, fac_is_chol=torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert b.precondition_dot_lowrank(inv2, grads, x, d, probe) is None
    # more rows than the layer is wide: the general path is cheaper
    x9, d9 = torch.randn(64, 30, dtype=torch.float64), torch.randn(64, 20, dtype=torch.float64)
    assert b.precondition_dot_lowrank(inv, grads, x9, d9, probe) is None


def test_lowrank_not_used_for_a_layer_called_twice(monkeypatch):
    # a layer applied twice per forward has two records: its gradient is the sum of two row
    # products, so the general path preconditions it
    calls = _count_lowrank(monkeypatch)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(2)
            self.inp, self.mid, self.out = nn.Linear(6, 40), nn.Linear(40, 40), nn.Linear(40, 4)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            return self.out(torch.tanh(self.mid(torch.tanh(self.mid(h)))))

    model = Twice()
    opt = _opt(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)
    for _ in range(3):
        opt.step(ce_closure(opt, model, x, y))
    assert calls["used"] == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
