"""Levenberg-Marquardt damping adaptation (Martens & Grosse 2015, sec. 6.5): the quadratic
model, the reduction ratio rho against exact mathematics, the damping rule, state, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

from torchsso import SecondOrderOptimizer, VIOptimizer
from torchsso._testing import ce_closure


def _mse_closure(opt, model, x, y):
    return ce_closure(opt, model, x, y, loss_fn=F.mse_loss)


def _linear_problem(n=32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return x, y


def _quadratic_opt(damping, lr, **kw):
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    opt = SecondOrderOptimizer(
        lin, "GaussNewton", {"Linear": "Kron"},
        {"damping": damping, "loss": "mse", "pi_type": "none",
         "damping_adaptation": {"interval": 1, "min_damping": 1e-12, **kw}},
        lr=lr, kl_clip=None,
    )  # fmt: skip
    return lin, opt


def _exact_model(lin, x, y, delta, damping):
    """g^T d + 1/2 d^T (H + damping I) d with the exact Hessian of the MSE loss."""
    params = {k: v.detach() for k, v in lin.named_parameters()}
    names = list(params)

    def f(flat):
        w = flat[: lin.weight.numel()].view_as(lin.weight)
        b = flat[lin.weight.numel() :]
        return F.mse_loss(functional_call(lin, {names[0]: w, names[1]: b}, (x,)), y)

    theta = torch.cat([p.reshape(-1) for p in params.values()])
    flat_d = torch.cat([d.reshape(-1) for d in delta])
    g = torch.func.grad(f)(theta)
    H = hessian(f)(theta)
    return float(
        g @ flat_d + 0.5 * flat_d @ (H + damping * torch.eye(len(theta), dtype=H.dtype)) @ flat_d
    )


def test_predicted_reduction_equals_exact_quadratic_model():
    x, y = _linear_problem()
    lin, opt = _quadratic_opt(1e-3, 0.5)
    # one step without adaptation effects on the check: the model at the current point
    closure = _mse_closure(opt, lin, x, y)
    opt.step(closure)  # builds the (exact, ema_decay 1) Kron curvature of this batch
    closure()
    grads = [p.grad.detach().clone() for p in lin.parameters()]
    g = torch.Generator().manual_seed(1)
    delta = [0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype) for p in lin.parameters()]
    got = float(opt.predicted_reduction(grads, delta, 0.3))
    want = _exact_model(lin, x, y, delta, 0.3)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_rho_is_one_on_an_exact_quadratic_and_damping_falls():
    # linear model + MSE: the loss is exactly quadratic and Kron(A, G) is its exact Hessian,
    # so with (almost) no damping the actual change equals the predicted one
    x, y = _linear_problem()
    lin, opt = _quadratic_opt(1e-10, 0.5)
    before = [p.detach().clone() for p in lin.parameters()]
    loss0 = float(F.mse_loss(lin(x), y).detach())
    opt.step(_mse_closure(opt, lin, x, y))
    st = opt.state[opt.blocks[0].params[0]]
    assert st["damping_rho"] == pytest.approx(1.0, abs=1e-8)
    omega = (19 / 20) ** 1
    assert opt.current_damping() == pytest.approx(1e-10 * omega, rel=1e-12)
    # and rho is (actual change) / (exact model), whatever the damping
    lin2, opt2 = _quadratic_opt(0.05, 0.5)
    opt2.step(_mse_closure(opt2, lin2, x, y))
    delta = [p.detach() - b for p, b in zip(lin2.parameters(), before)]
    actual = float(F.mse_loss(lin2(x), y).detach()) - loss0
    # the model at the starting point (lin2 was built from the same seed as lin)
    torch.manual_seed(0)
    start = nn.Linear(4, 3).double()
    want = actual / _exact_model(start, x, y, delta, 0.05)
    rho = opt2.state[opt2.blocks[0].params[0]]["damping_rho"]
    assert rho == pytest.approx(want, rel=1e-9)
    # the damping term makes the model predict less decrease than the exact quadratic gives
    assert rho > 1.0
    assert not math.isclose(rho, 1.0, rel_tol=1e-3)


def test_damping_rises_after_a_step_that_raises_the_loss():
    # the curvature is estimated once on inputs 10x smaller (curv_interval large), so the
    # model under-estimates the curvature 100x: the step overshoots and the loss rises
    xs, ys = _linear_problem(scale=0.1)
    x, y = _linear_problem(seed=1)
    lin, opt = _quadratic_opt(1e-3, 1.0, interval=2)
    opt.curv_interval = 1000
    opt.step(_mse_closure(opt, lin, xs, ys))  # step 1: curvature from the small inputs
    assert opt.current_damping() == 1e-3  # not an adaptation step (interval 2)
    loss0 = float(F.mse_loss(lin(x), y).detach())
    opt.step(_mse_closure(opt, lin, x, y))
    assert float(F.mse_loss(lin(x), y).detach()) > loss0
    st = opt.state[opt.blocks[0].params[0]]
    assert st["damping_rho"] < 0.25
    assert opt.current_damping() == pytest.approx(1e-3 / (19 / 20) ** 2, rel=1e-12)


def test_damping_bounds_and_gradients_of_the_re_evaluation_are_dropped():
    x, y = _linear_problem()
    lin, opt = _quadratic_opt(1e-3, 0.5, min_damping=9e-4)
    closure = _mse_closure(opt, lin, x, y)
    for _ in range(5):
        opt.step(closure)
        assert all(p.grad is None for p in lin.parameters())
    assert opt.current_damping() == 9e-4


def test_adaptive_state_dict_round_trip_bit_identical_and_damping_moves():
    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
        opt = SecondOrderOptimizer(
            model, "Fisher", {"Linear": "Kron"},
            {"damping": 1e-2, "damping_adaptation": {"interval": 3}}, lr=0.05, momentum=0.9,
        )  # fmt: skip
        return model, opt

    def train(model, opt, start, steps):
        for s in range(start, start + steps):
            g = torch.Generator().manual_seed(s)
            x, y = torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)
            opt.step(ce_closure(opt, model, x, y))

    m1, o1 = make()
    train(m1, o1, 0, 20)
    assert o1.current_damping() != 1e-2
    m2, o2 = make()
    train(m2, o2, 0, 10)
    sd_m, sd_o = copy.deepcopy(m2.state_dict()), copy.deepcopy(o2.state_dict())
    m3, o3 = make()
    m3.load_state_dict(sd_m)
    o3.load_state_dict(sd_o)
    assert o3.current_damping() == o2.current_damping()
    train(m3, o3, 10, 10)
    assert o3.current_damping() == o1.current_damping()
    for p1, p3 in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(p1, p3)


def test_bad_adaptation_arguments():
    model = nn.Linear(3, 2)

    def make(**ck):
        return SecondOrderOptimizer(model, "Fisher", "Kron", {"damping": 1e-2, **ck})

    with pytest.raises(ValueError, match="unknown keys"):
        make(damping_adaptation={"intervall": 5})
    with pytest.raises(ValueError, match="interval"):
        make(damping_adaptation={"interval": 0})
    with pytest.raises(ValueError, match="omega"):
        make(damping_adaptation={"omega": 1.5})
    with pytest.raises(ValueError, match="min_damping"):
        make(damping_adaptation={"min_damping": 1.0, "max_damping": 0.1})
    with pytest.raises(ValueError, match="min_damping, max_damping"):
        make(damping_adaptation={"min_damping": 0.1})
    with pytest.raises(TypeError, match="damping_adaptation"):
        make(damping_adaptation="yes")
    with pytest.raises(ValueError, match="schedule"):
        SecondOrderOptimizer(
            model, "Fisher", "Kron", {"damping": lambda s: 1e-2, "damping_adaptation": True}
        )
    with pytest.raises(ValueError, match="acc_steps"):
        SecondOrderOptimizer(model, "Fisher", "Kron", {"damping_adaptation": True}, acc_steps=2)
    with pytest.raises(ValueError, match="VIOptimizer"):
        VIOptimizer(model, 10, "Cov", "Diag", {"damping_adaptation": True})


def test_re_evaluation_runs_no_backward_through_the_network():
    x, y = _linear_problem()
    lin, opt = _quadratic_opt(1e-3, 0.5)  # adaptation on every step
    calls = []
    lin.weight.register_hook(lambda g: calls.append(1))
    forwards = []
    lin.register_forward_hook(lambda *a: forwards.append(torch.is_grad_enabled()))
    for _ in range(3):
        opt.step(_mse_closure(opt, lin, x, y))
    assert len(calls) == 3  # gradients of the steps' own backward passes only
    assert forwards == [True, False] * 3  # the re-evaluations run without autograd
    assert torch.is_grad_enabled()
    assert "damping_rho" in opt.state[opt.blocks[0].params[0]]
