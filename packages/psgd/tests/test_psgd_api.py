"""Shared battery over every optimizer: bad input, non-finite gradients, closures, state."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

import psgd


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


WHITEN = [
    (psgd.Kron, {}),
    (psgd.KronWhiten, {}),
    (psgd.KronWhiten, {"geometry": "EQ"}),
    (psgd.LRAWhiten, {"rank": 2}),
]
NEWTON = [
    (psgd.KronNewton, {}),
    (psgd.LRANewton, {"rank": 2}),
    (psgd.DenseNewton, {}),
    (psgd.KronNewton, {"hvp_method": "fd"}),
]
ALL = WHITEN + NEWTON


def _ids(rows):
    return [
        f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}"
        for cls, kw in rows
    ]


def _problem():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.zeros(3))
    x = torch.randn(32, 4)
    y = torch.randn(32, 3)

    def loss_fn():
        return ((x @ w.T + b - y) ** 2).mean()

    return [w, b], loss_fn


def _step(opt, loss_fn, newton: bool):
    if newton:
        return opt.step(loss_fn).detach()
    opt.zero_grad()
    loss = loss_fn()
    loss.backward()
    opt.step()
    return loss.detach()


@pytest.mark.parametrize(("cls", "kw"), ALL, ids=_ids(ALL))
def test_loss_decreases(cls, kw) -> None:
    params, loss_fn = _problem()
    opt = cls(params, lr=0.02, **kw)
    newton = cls in (psgd.KronNewton, psgd.LRANewton, psgd.DenseNewton)
    first = float(_step(opt, loss_fn, newton))
    for _ in range(150):
        last = float(_step(opt, loss_fn, newton))
    assert last < 0.7 * first


@pytest.mark.parametrize(("cls", "kw"), ALL, ids=_ids(ALL))
def test_bad_arguments_name_the_argument(cls, kw) -> None:
    params, _ = _problem()
    lr_name = "lr"
    with pytest.raises(ValueError, match=lr_name):
        cls(params, lr=-1.0, **kw)
    with pytest.raises(ValueError, match=lr_name):
        cls(params, lr=math.nan, **kw)
    with pytest.raises(ValueError, match="preconditioner_update_probability"):
        cls(params, preconditioner_update_probability=1.5, **kw)
    with pytest.raises(ValueError, match="preconditioner_update_probability"):
        cls(params, preconditioner_update_probability=-0.1, **kw)
    if cls in (psgd.Kron, psgd.KronWhiten, psgd.KronNewton, psgd.DenseNewton):
        with pytest.raises(ValueError, match="geometry"):
            cls(params, **{**kw, "geometry": "XYZ"})


@pytest.mark.parametrize(("cls", "kw"), ALL, ids=_ids(ALL))
def test_non_finite_gradient_skips_and_warns_once(cls, kw) -> None:
    params, loss_fn = _problem()
    opt = cls(params, lr=0.02, **kw)
    newton = cls in (psgd.KronNewton, psgd.LRANewton, psgd.DenseNewton)
    _step(opt, loss_fn, newton)
    before_p = [p.detach().clone() for p in params]
    before_s = {k: v.clone() for k, v in opt.state[params[0]].items()}
    bad = torch.zeros(3, 4)
    bad[0, 0] = math.nan

    def bad_loss():
        return loss_fn() + (params[0] * bad).sum()

    with pytest.warns(RuntimeWarning, match="non-finite"):
        _step(opt, bad_loss, newton)
    assert torch.equal(params[0].detach(), before_p[0])
    for k, v in before_s.items():
        if k != "step":
            assert torch.equal(opt.state[params[0]][k], v), k
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once only
        _step(opt, bad_loss, newton)


def test_nonfinite_warning_uses_parameter_names() -> None:
    w = torch.nn.Parameter(torch.randn(2, 2))
    opt = psgd.Kron([("layer.weight", w)], lr=0.1)
    w.grad = torch.full((2, 2), math.inf)
    with pytest.warns(RuntimeWarning, match="layer.weight"):
        opt.step()


@pytest.mark.parametrize(("cls", "kw"), NEWTON, ids=_ids(NEWTON))
def test_newton_needs_a_closure_returning_the_loss(cls, kw) -> None:
    params, _ = _problem()
    opt = cls(params, **kw)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: None)


@pytest.mark.parametrize(("cls", "kw"), ALL, ids=_ids(ALL))
def test_sparse_gradient_rejected(cls, kw) -> None:
    if cls in (psgd.KronNewton, psgd.LRANewton, psgd.DenseNewton):
        pytest.skip("Newton variants compute dense gradients themselves")
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = cls(emb.parameters(), **kw)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize(("cls", "kw"), ALL, ids=_ids(ALL))
def test_state_dict_weights_only_round_trip(cls, kw) -> None:
    newton = cls in (psgd.KronNewton, psgd.LRANewton, psgd.DenseNewton)
    params, loss_fn = _problem()
    opt = cls(params, lr=0.02, preconditioner_update_probability=0.5, **kw)
    for _ in range(5):
        _step(opt, loss_fn, newton)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    snapshot = [p.detach().clone() for p in params]
    for _ in range(4):
        _step(opt, loss_fn, newton)
    after = [p.detach().clone() for p in params]

    params2, loss_fn2 = _problem()
    with torch.no_grad():
        for p, s in zip(params2, snapshot):
            p.copy_(s)
    opt2 = cls(params2, lr=0.02, preconditioner_update_probability=0.5, **kw)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(4):
        _step(opt2, loss_fn2, newton)
    for a, b in zip(after, params2):
        assert torch.equal(a, b.detach())


def test_kron_all_diagonal_matches_lra_rank_zero() -> None:
    """A 1-D parameter with a diagonal Kron factor (EQ) is the rank-0 LRA preconditioner."""
    torch.manual_seed(0)
    scales = torch.linspace(0.5, 3.0, 7, dtype=torch.float64)
    p1 = torch.nn.Parameter(torch.zeros(7, dtype=torch.float64))
    p2 = torch.nn.Parameter(torch.zeros(7, dtype=torch.float64))
    torch.manual_seed(1)
    kron = psgd.KronWhiten([p1], lr=0.01, geometry="EQ", preconditioner_init_scale=1.0, damping=0.0)
    torch.manual_seed(1)
    lra = psgd.LRAWhiten([p2], lr=0.01, rank=0, preconditioner_init_scale=1.0, damping=0.0)
    gen = torch.Generator().manual_seed(2)
    for _ in range(50):
        g = scales * torch.randn(7, generator=gen, dtype=torch.float64)
        p1.grad, p2.grad = g.clone(), g.clone()
        kron.step()
        lra.step()
    assert torch.allclose(kron.state[p1]["Q0"] ** 2, lra.state[p2]["d"] ** 2, rtol=1e-10)
    assert torch.allclose(p1.detach(), p2.detach(), rtol=1e-10, atol=1e-14)


def test_finite_difference_fallback_when_no_double_backward() -> None:
    class NoSecond(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**2

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    scale = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    opt = psgd.DenseNewton([p], lr=0.5)
    for _ in range(60):
        opt.step(lambda: (scale * NoSecond.apply(p)).sum())
    assert float(p.detach().abs().max()) < 1e-2
