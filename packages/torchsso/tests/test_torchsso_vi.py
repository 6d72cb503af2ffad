"""VIOptimizer: VOGN / noisy K-FAC math, sampling covariance, prediction, state."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchsso
from torchsso import VIOptimizer
from torchsso._testing import ce_closure


def _data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_vogn_first_step_matches_formula():
    """At the first step (no posterior yet) VOGN runs at the mean:
    mu' = mu - lr (s + delta)^-1 (g + delta mu), s = mean of squared per-example grads."""
    torch.manual_seed(0)
    m = nn.Linear(5, 3)
    x, y = _data()
    N, tau, pv, lr = 100, 0.5, 2.0, 0.1
    opt = VIOptimizer(
        m, N, "Cov", "Diag", {"ema_decay": 1.0}, lr=lr, kl_weighting=tau, prior_variance=pv
    )
    mu = torch.cat([m.weight.detach().reshape(-1), m.bias.detach()])
    from optcore.persample import per_sample_grads

    ps = per_sample_grads(m, F.cross_entropy, x, y)
    J = torch.cat([ps["weight"].reshape(32, -1), ps["bias"]], 1)
    s, g = (J * J).mean(0), J.mean(0)
    opt.step(ce_closure(opt, m, x, y))
    delta = tau / (N * pv)
    want = mu - lr * (g + delta * mu) / (s + delta)
    got = torch.cat([m.weight.detach().reshape(-1), m.bias.detach()])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shape", ["Diag", "Kron", "Full"])
def test_posterior_samples_have_the_stated_covariance(shape):
    """Empirical covariance of eps equals (tau/N) (C + delta)^-1 for the block's damped C."""
    torch.manual_seed(1)
    m = nn.Linear(2, 2)
    x, y = _data(16)
    x, y = x[:, :2], y % 2
    N, tau = 50, 1.0
    opt = VIOptimizer(m, N, "Cov", shape, {"ema_decay": 1.0}, lr=0.0, kl_weighting=tau)
    opt.step(ce_closure(opt, m, x, y))
    b = opt.blocks[0]
    st = opt.state[b.params[0]]
    delta = opt.prior_precision()
    if shape == "Diag":
        P = torch.diag(st["curv_diag"] + delta)
        order = None
    elif shape == "Full":
        P = st["curv_F"] + delta * torch.eye(6)
        order = None
    else:
        A, G = st["curv_A"], st["curv_G"]
        import math

        pi = math.sqrt((torch.trace(A) / 3) / (torch.trace(G) / 2))
        r = math.sqrt(delta)
        P = torch.kron(G + r / pi * torch.eye(2), A + pi * r * torch.eye(3))
        order = True
    cov_true = torch.linalg.inv(P) * tau / N
    S = 40000
    draws = []
    for _ in range(S):
        e = opt.sample_params()[0]
        if order:
            draws.append(torch.cat([e[0], e[1][:, None]], 1).reshape(-1))
        else:
            draws.append(torch.cat([t.reshape(-1) for t in e]))
    E = torch.stack(draws)
    cov = E.T @ E / S
    err = (cov - cov_true).abs().max() / cov_true.abs().max()
    assert err < 0.05


def test_prediction_mean_and_average():
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = _data()
    opt = VIOptimizer(m, 32, "Cov", "Diag", lr=0.05, num_mc_samples=2)
    for _ in range(3):
        opt.step(ce_closure(opt, m, x, y))
    p0 = torchsso.prediction(m, x, mc_samples=0)
    torch.testing.assert_close(p0, torch.softmax(m(x), 1).detach())
    w = [p.clone() for p in m.parameters()]
    p5 = torchsso.prediction(m, x, mc_samples=5)
    assert torch.allclose(p5.sum(1), torch.ones(32))
    assert not torch.allclose(p5, p0)
    for a, b in zip(w, m.parameters()):  # the mean is restored
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="model"):
        torchsso.prediction(nn.Linear(2, 2), x)
    with pytest.raises(ValueError, match="mc_samples"):
        opt.prediction(x, -1)


@pytest.mark.parametrize("shape", ["Diag", "Kron"])
def test_linearized_prediction_is_the_network_linearised_at_the_mean(shape):
    """linearized=True averages softmax(f(mu) + J eps) over the same draws eps as the
    sampled predictive: equal to it for a model linear in its weights, and equal to
    central differences of f along eps for a nonlinear one."""
    x, y = _data()
    x = x.double()
    for nonlinear in (False, True):
        torch.manual_seed(3)
        m = (
            nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
            if nonlinear
            else nn.Linear(5, 3)
        ).double()
        opt = VIOptimizer(m, 32, "Cov", shape, {"damping": 1e-2}, lr=0.05, seed=1)
        for _ in range(3):
            opt.step(ce_closure(opt, m, x, y))
        lin = torchsso.prediction(
            m, x, mc_samples=4, linearized=True, generator=torch.Generator().manual_seed(5)
        )
        draws = torch.Generator().manual_seed(5)
        if not nonlinear:
            torch.testing.assert_close(
                lin, torchsso.prediction(m, x, mc_samples=4, generator=draws)
            )
            continue
        params = opt.blocks_params()
        mu = [p.detach().clone() for p in params]
        want = torch.zeros_like(lin)
        h = 1e-4
        with torch.no_grad():
            f0 = m(x)
            for _ in range(4):
                eps = [e for es in opt.sample_params(draws) for e in es]
                outs = []
                for sign in (1.0, -1.0):
                    for p, a, e in zip(params, mu, eps):
                        p.copy_(a + sign * h * e)
                    outs.append(m(x))
                for p, a in zip(params, mu):
                    p.copy_(a)
                want += torch.softmax(f0 + (outs[0] - outs[1]) / (2 * h), dim=1)
        torch.testing.assert_close(lin, want / 4, rtol=1e-7, atol=1e-8)
        assert not torch.allclose(lin, torchsso.prediction(m, x, mc_samples=4), atol=1e-6)
        for a, p in zip(mu, params):  # the mean is untouched
            assert torch.equal(a, p)
    with pytest.raises(TypeError, match="linearized"):
        opt.prediction(x, 2, linearized=1)  # type: ignore[arg-type]


def test_kl_warmup_schedule_and_bad_args():
    m = nn.Linear(5, 3)
    opt = VIOptimizer(
        m, 10, "Fisher", "Kron", kl_weighting=2.0, warmup_kl_weighting_init=0.1,
        warmup_kl_weighting_steps=10,
    )  # fmt: skip
    assert opt.tau(0) == pytest.approx(0.2)
    assert opt.tau(5) == pytest.approx(1.1)
    assert opt.tau(50) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="dataset_size"):
        VIOptimizer(m, 0, "Fisher", "Kron")
    with pytest.raises(ValueError, match="num_mc_samples"):
        VIOptimizer(m, 10, "Fisher", "Kron", num_mc_samples=0)
    with pytest.raises(ValueError, match="prior_variance"):
        VIOptimizer(m, 10, "Fisher", "Kron", prior_variance=0.0)
    with pytest.raises(ValueError, match="Hessian"):
        VIOptimizer(m, 10, "Hessian", "Diag")


@pytest.mark.parametrize("shape", ["Diag", "Kron"])
def test_prediction_leaves_the_training_run_alone_and_follows_its_generator(shape):
    """Predicting between steps (sampled and linearised) does not change the trained
    weights; the draws come from the generator given, or from torch's global one."""
    x, y = _data()

    def run(predict: bool) -> tuple[list[torch.Tensor], VIOptimizer]:
        torch.manual_seed(3)
        m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
        opt = VIOptimizer(m, 64, "Cov", shape, {"damping": 1e-2}, lr=0.05, seed=2)
        for _ in range(6):
            opt.step(ce_closure(opt, m, x, y))
            if predict:
                torchsso.prediction(m, x, mc_samples=3)
                torchsso.prediction(m, x, mc_samples=2, linearized=True)
        return [p.detach().clone() for p in m.parameters()], opt

    plain, _ = run(False)
    interleaved, opt = run(True)
    for a, b in zip(plain, interleaved):
        assert torch.equal(a, b)

    torch.manual_seed(11)
    first = opt.prediction(x, 3)
    torch.manual_seed(11)
    assert torch.equal(first, opt.prediction(x, 3))
    torch.manual_seed(12)
    assert not torch.allclose(first, opt.prediction(x, 3))
    given = [opt.prediction(x, 3, generator=torch.Generator().manual_seed(4)) for _ in range(2)]
    assert torch.equal(given[0], given[1])
    with pytest.raises(TypeError, match="generator"):
        opt.prediction(x, 3, generator=4)  # type: ignore[arg-type]


@pytest.mark.cuda
@pytest.mark.parametrize("shape", ["Diag", "Kron"])
def test_vi_on_cuda_draws_the_same_noise_as_on_the_cpu(shape):
    """The optimizer's generator lives on the host: on CUDA the steps and the posterior
    draws use the same noise as on the CPU, so the runs agree to rounding."""
    x, y = _data()
    runs = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(3)
        m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double().to(device)
        xd, yd = x.double().to(device), y.to(device)
        opt = VIOptimizer(m, 64, "Cov", shape, {"damping": 1e-2}, lr=0.05, seed=2)
        for _ in range(4):
            opt.step(ce_closure(opt, m, xd, yd))
        pred = opt.prediction(xd, 3, generator=torch.Generator().manual_seed(1))
        runs.append(([p.detach().cpu() for p in m.parameters()], pred.cpu()))
    for a, b in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("shape", ["Diag", "Kron"])
def test_vi_state_dict_round_trip(shape):
    def make():
        torch.manual_seed(3)
        m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
        return m, VIOptimizer(m, 64, "Fisher", shape, lr=0.05, momentum=0.5, num_mc_samples=2)

    def train(m, opt, a, b):
        for s in range(a, b):
            x, y = _data(seed=s)
            opt.step(ce_closure(opt, m, x, y))

    m1, o1 = make()
    train(m1, o1, 0, 8)
    m2, o2 = make()
    train(m2, o2, 0, 4)
    sdm, sdo = copy.deepcopy(m2.state_dict()), copy.deepcopy(o2.state_dict())
    m3, o3 = make()
    m3.load_state_dict(sdm)
    o3.load_state_dict(sdo)
    train(m3, o3, 4, 8)
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", ["Diag", "Kron"])
def test_vi_learns(shape):
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = _data(64)
    opt = VIOptimizer(
        m, 64, "Cov", shape, lr=0.05, momentum=0.9, num_mc_samples=2, kl_weighting=0.1,
        init_precision=1e-2,
    )  # fmt: skip
    l0 = float(F.cross_entropy(m(x), y).detach())
    for _ in range(30):
        opt.step(ce_closure(opt, m, x, y))
    p = torchsso.prediction(m, x, mc_samples=4)
    assert float(F.nll_loss(p.log(), y)) < 0.7 * l0
