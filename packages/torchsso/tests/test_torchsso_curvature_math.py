"""Curvature blocks against exact mathematics on small problems."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from optcore.persample import per_sample_grads
from torchsso import SecondOrderOptimizer
from torchsso.curvature.shapes import _split_damping

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.usefixtures("float64"),
]


def _one_step(model, curv_type, shapes, x, y, loss="cross_entropy", **kw):
    """Run one step with lr=0 and return the optimizer (curvature filled in)."""
    opt = SecondOrderOptimizer(
        model, curv_type, shapes, {"damping": 1e-3, "loss": loss, **kw}, lr=0.0
    )
    lossf = F.cross_entropy if loss == "cross_entropy" else F.mse_loss

    def closure():
        opt.zero_grad()
        out = model(x)
        l = lossf(out, y)
        l.backward(create_graph=curv_type == "Hessian")
        return l, out

    opt.step(closure)
    return opt


def _curv(opt, i=0):
    st = opt.state[opt.blocks[i].params[0]]
    return {k[5:]: v for k, v in st.items() if k.startswith("curv_")}


def _aug(x):
    return torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)


def test_linear_kfac_factors_equal_brute_force_cov():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    opt = _one_step(model, "Cov", "Kron", x, y)
    ps = per_sample_grads(model, F.cross_entropy, x, y)
    # first layer: input factor from x, output factor from per-example bias grads
    c0 = _curv(opt, 0)
    a = _aug(x)
    torch.testing.assert_close(c0["A"], a.T @ a / 16)
    gb = ps["0.bias"]
    torch.testing.assert_close(c0["G"], gb.T @ gb / 16)
    # the per-example weight grads are g_i a_i^T: check consistency of the brute force
    torch.testing.assert_close(ps["0.weight"], gb[:, :, None] * x[:, None, :])
    c1 = _curv(opt, 1)
    h = _aug(torch.tanh(model[0](x))).detach()
    torch.testing.assert_close(c1["A"], h.T @ h / 16)
    torch.testing.assert_close(c1["G"], ps["2.bias"].T @ ps["2.bias"] / 16)


def test_conv2d_kfac_factors_equal_brute_force():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=2)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4))
    x, y = torch.randn(5, 2, 6, 6), torch.randint(0, 4, (5,))
    opt = _one_step(model, "Cov", {"Conv2d": "Kron", "Linear": "Kron"}, x, y)
    c = _curv(opt, 0)
    # brute force patches by explicit slicing
    xp = F.pad(x, (1, 1, 1, 1))
    rows = []
    for b in range(5):
        for i in range(3):
            for j in range(3):
                patch = xp[b, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].reshape(-1)
                rows.append(torch.cat([patch, torch.ones(1)]))
    a = torch.stack(rows)
    torch.testing.assert_close(c["A"], a.T @ a / (5 * 9))
    # brute force per-example output gradients, one example at a time
    G = torch.zeros(3, 3)
    for b in range(5):
        s = conv(x[b : b + 1])
        out = model[3](model[2](model[1](s)))
        (gs,) = torch.autograd.grad(F.cross_entropy(out, y[b : b + 1]), s)
        g = gs[0].reshape(3, -1)
        G += g @ g.T
    torch.testing.assert_close(c["G"], G / 5)


def _ggn_linear(lin, x, hout):
    """Exact GGN of mean_i l_i for one linear layer over W~ = [W, b] (row-major)."""
    Wt = torch.cat([lin.weight, lin.bias[:, None]], dim=1).detach()

    def f(W, xi):
        return xi @ W[:, :-1].T + W[:, -1]

    J = torch.vmap(jacrev(f), in_dims=(None, 0))(Wt, x)  # (B, out, out, in+1)
    J = J.reshape(x.shape[0], J.shape[1], -1)
    return torch.einsum("bop,boq,bqr->pr", J, hout, J) / x.shape[0]


def test_single_linear_mse_kron_equals_exact_ggn():
    torch.manual_seed(2)
    lin = nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.randn(10, 3)
    opt = _one_step(lin, "GaussNewton", "Kron", x, y, loss="mse")
    c = _curv(opt)
    hout = torch.eye(3).expand(10, 3, 3) * (2.0 / 3)
    exact = _ggn_linear(lin, x, hout)
    # vec(W~) row-major: index (o, i) -> kron(G, A)
    torch.testing.assert_close(torch.kron(c["G"], c["A"]), exact, atol=1e-5, rtol=1e-5)
    # and the GGN of the loss equals its Hessian for a linear model with MSE
    Wt = torch.cat([lin.weight, lin.bias[:, None]], 1).detach()
    H = hessian(lambda W: F.mse_loss(x @ W[:, :-1].T + W[:, -1], y))(Wt).reshape(15, 15)
    torch.testing.assert_close(exact, H)


def test_single_linear_cross_entropy_exact_fisher_output_factor():
    torch.manual_seed(3)
    lin = nn.Linear(4, 5)
    x, y = torch.randn(12, 4), torch.randint(0, 5, (12,))
    opt = _one_step(lin, "GaussNewton", "Kron", x, y)
    p = torch.softmax(lin(x), 1).detach()
    G = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    torch.testing.assert_close(_curv(opt)["G"], G)


def test_fisher_mc_converges_to_exact():
    torch.manual_seed(4)
    lin = nn.Linear(3, 4)
    x, y = torch.randn(8, 3), torch.randint(0, 4, (8,))
    exact = _curv(_one_step(lin, "GaussNewton", "Kron", x, y))["G"]
    mc = _curv(_one_step(lin, "Fisher", "Kron", x, y, num_mc=4000))["G"]
    torch.testing.assert_close(mc, exact, atol=3e-3, rtol=0.1)


class _Bilin(nn.Module):
    """A layer type torchsso has no closed form for (falls back to torch.func)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4) * 0.3)

    def forward(self, x):
        return torch.tanh(x @ self.w.T) * x[:, :3]


@pytest.mark.parametrize(
    "name,make,xshape",
    [
        ("linear", lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), (9, 4)),
        (
            "linear3d",
            lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(10, 3)),
            (7, 2, 4),
        ),
        (
            "conv",
            lambda: nn.Sequential(
                nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 3)
            ),
            (6, 2, 4, 4),
        ),
        (
            "conv1d",
            lambda: nn.Sequential(nn.Conv1d(2, 3, 2, padding=1), nn.Flatten(), nn.Linear(15, 3)),
            (6, 2, 4),
        ),
        (
            "layernorm",
            lambda: nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)),
            (8, 4),
        ),
        (
            "generic",
            lambda: nn.Sequential(nn.Linear(4, 4), _Bilin(), nn.Linear(3, 3)),
            (8, 4),
        ),
    ],
)
def test_diag_equals_mean_squared_per_example_grads(name, make, xshape):
    torch.manual_seed(5)
    model = make()
    x, y = torch.randn(*xshape), torch.randint(0, 3, (xshape[0],))
    opt = _one_step(model, "Cov", "Diag", x, y)
    ps = per_sample_grads(model, F.cross_entropy, x, y)
    for i, b in enumerate(opt.blocks):
        J = torch.cat(
            [ps[f"{b.name}.{n}" if b.name else n].reshape(xshape[0], -1) for n in b.names], 1
        )
        torch.testing.assert_close(_curv(opt, i)["diag"], (J * J).mean(0), msg=f"{name}:{b.name}")


def test_batchnorm_diag_eval_mode_equals_per_example():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten())
    model.append(nn.Linear(12, 3))
    model(torch.randn(20, 2, 4, 4))  # running statistics
    model.eval()
    x, y = torch.randn(6, 2, 4, 4), torch.randint(0, 3, (6,))
    opt = _one_step(model, "Cov", {"Conv2d": "Diag", "BatchNorm2d": "Diag", "Linear": "Diag"}, x, y)
    ps = per_sample_grads(model, F.cross_entropy, x, y)
    b = opt.blocks[1]
    assert b.name == "1"
    J = torch.cat([ps["1.weight"], ps["1.bias"]], 1)
    torch.testing.assert_close(_curv(opt, 1)["diag"], (J * J).mean(0))


def test_full_equals_exact_fisher():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(10, 3), torch.randint(0, 3, (10,))
    opt = _one_step(model, "GaussNewton", "Full", x, y)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi[None],))[0]

    J = torch.vmap(jacrev(f), in_dims=(None, 0))(params, x)
    p = torch.softmax(model(x), 1).detach()
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    for i, b in enumerate(opt.blocks):
        Jb = torch.cat([J[f"{b.name}.{n}"].reshape(10, 3, -1) for n in b.names], 2)
        exact = torch.einsum("bop,boq,bqr->pr", Jb, H, Jb) / 10
        torch.testing.assert_close(_curv(opt, i)["F"], exact)


def test_full_and_diag_hessian_equal_exact_hessian():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    opt = _one_step(model, "Hessian", "Full", x, y)
    params = {k: v.detach() for k, v in model.named_parameters()}
    H = hessian(lambda p: F.cross_entropy(functional_call(model, p, (x,)), y))(params)
    for i, b in enumerate(opt.blocks):
        keys = [f"{b.name}.{n}" for n in b.names]
        n = [params[k].numel() for k in keys]
        rows = [torch.cat([H[k1][k2].reshape(n1, -1) for k2 in keys], 1) for k1, n1 in zip(keys, n)]
        torch.testing.assert_close(_curv(opt, i)["F"], torch.cat(rows, 0))
    dopt = _one_step(model, "Hessian", "Diag", x, y)
    torch.testing.assert_close(_curv(dopt, 0)["diag"], torch.diagonal(_curv(opt, 0)["F"]))


def test_kron_preconditioning_eigh_is_exact_tikhonov():
    torch.manual_seed(9)
    lin = nn.Linear(3, 2)
    x, y = torch.randn(7, 3), torch.randint(0, 2, (7,))
    opt = _one_step(lin, "Cov", "Kron", x, y, inverse_method="eigh")
    c = _curv(opt)
    b = opt.blocks[0]
    inv = {k[4:]: v for k, v in opt.state[b.params[0]].items() if k.startswith("inv_")}
    V = torch.randn(2, 4)
    got = b.precondition(inv, [V[:, :3], V[:, 3]])
    M = torch.kron(c["G"], c["A"]) + 1e-3 * torch.eye(8)
    want = torch.linalg.solve(M, V.reshape(-1)).reshape(2, 4)
    torch.testing.assert_close(torch.cat([got[0], got[1][:, None]], 1), want)


def test_kron_factored_damping_cholesky():
    torch.manual_seed(10)
    lin = nn.Linear(3, 2)
    x, y = torch.randn(7, 3), torch.randint(0, 2, (7,))
    opt = _one_step(lin, "Cov", "Kron", x, y, pi_type="none", damping_split="sqrt")
    c, b = _curv(opt), opt.blocks[0]
    inv = {k[4:]: v for k, v in opt.state[b.params[0]].items() if k.startswith("inv_")}
    r = 1e-3**0.5
    Ad = c["A"] + r * torch.eye(4)
    Gd = c["G"] + r * torch.eye(2)
    V = torch.randn(2, 4)
    got = b.precondition(inv, [V[:, :3], V[:, 3]])
    want = torch.linalg.solve(Gd, V) @ torch.linalg.inv(Ad)
    torch.testing.assert_close(torch.cat([got[0], got[1][:, None]], 1), want)


@pytest.mark.parametrize("every_step", [False, True])
def test_kron_tikhonov_damping_split(every_step):
    # damping_split="tikhonov": factor dampings (pi d, d / pi) with (a + pi d)(g + d / pi)
    # = a g + damping at the trace means a = tr A / dim A, g = tr G / dim G
    torch.manual_seed(11)
    lin = nn.Linear(3, 2)
    x, y = torch.randn(7, 3), torch.randint(0, 2, (7,))
    opt = _one_step(lin, "Cov", "Kron", x, y, damping_split="tikhonov")
    c, b = _curv(opt), opt.blocks[0]
    a, g = float(torch.trace(c["A"])) / 4, float(torch.trace(c["G"])) / 2
    pi = (a / g) ** 0.5
    s = (a * g) ** 0.5
    d = (s * s + 1e-3) ** 0.5 - s
    assert abs((a + pi * d) * (g + d / pi) - (a * g + 1e-3)) < 1e-9
    assert d < 1e-3**0.5  # less than the sqrt split adds
    opts = {**opt.curv_opts, "solve": every_step}
    inv = b.inverse(c, 1e-3, opts)
    V = torch.randn(2, 4)
    got = b.precondition(inv, [V[:, :3], V[:, 3]])
    Ad = c["A"] + pi * d * torch.eye(4)
    Gd = c["G"] + d / pi * torch.eye(2)
    want = torch.linalg.solve(Gd, V) @ torch.linalg.inv(Ad)
    torch.testing.assert_close(torch.cat([got[0], got[1][:, None]], 1), want)
    # a damping far above the curvature: the two splits agree
    da, dg = _split_damping(torch.trace(c["A"]), 4, torch.trace(c["G"]), 2, 1e8,
                            {"damping_split": "tikhonov"})  # fmt: skip
    assert abs(da * dg - 1e8) / 1e8 < 1e-3 and abs(da / dg - pi * pi) < 1e-6 * pi * pi
    with pytest.raises(ValueError, match="damping_split"):
        SecondOrderOptimizer(lin, "Cov", "Kron", {"damping_split": "cube"})
