import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from optcore.curvature import gnvp, hvp
from optcore.tree import flatten, unflatten


def small_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    return model, x, y, names, params


def exact_hessian(model, x, y, names, params):
    def loss_of_flat(theta):
        p = unflatten(theta, dict(zip(names, params)))
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    theta = flatten([p.detach() for p in params])
    return hessian(loss_of_flat)(theta)


@pytest.mark.parametrize("method,tol", [("autograd", 1e-10), ("fd", 1e-5)])
def test_hvp_equals_exact_hessian_times_vector(method, tol):
    model, x, y, names, params = small_problem()
    H = exact_hessian(model, x, y, names, params)
    v = [torch.randn_like(p) for p in params]
    got = hvp(lambda: F.cross_entropy(model(x), y), params, v, method=method)
    want = H @ flatten(v)
    torch.testing.assert_close(flatten(got), want, atol=tol, rtol=tol)
    # fd restores the parameters exactly
    assert all(p.grad is None for p in params)


def test_hvp_fd_restores_params_bitwise():
    model, x, y, _, params = small_problem(1)
    before = [p.detach().clone() for p in params]
    hvp(
        lambda: F.cross_entropy(model(x), y),
        params,
        [torch.randn_like(p) for p in params],
        method="fd",
    )
    assert all(torch.equal(a, b) for a, b in zip(before, params))


def test_hvp_of_linear_loss_is_zero():
    w = torch.randn(3, requires_grad=True)
    (hv,) = hvp(lambda: (w * 2.0).sum(), [w], [torch.ones(3)])
    assert torch.equal(hv, torch.zeros(3))


def test_gnvp_equals_explicit_jt_h_j():
    model, x, y, names, params = small_problem(2)
    theta = flatten([p.detach() for p in params])

    def out_of_flat(t):
        return functional_call(model, unflatten(t, dict(zip(names, params))), (x,))

    J = jacrev(out_of_flat)(theta).reshape(-1, theta.numel())
    out = out_of_flat(theta)
    H_out = hessian(lambda o: F.cross_entropy(o.reshape(out.shape), y))(out.reshape(-1))
    G = J.T @ H_out @ J
    v = [torch.randn_like(p) for p in params]
    got = gnvp(lambda: model(x), lambda o: F.cross_entropy(o, y), params, v)
    torch.testing.assert_close(flatten(got), G @ flatten(v), atol=1e-10, rtol=1e-8)


def test_curvature_bad_input():
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"vectors\[0\] has shape"):
        hvp(lambda: w.square().sum(), [w], [torch.ones(2)])
    with pytest.raises(ValueError, match="method"):
        hvp(lambda: w.square().sum(), [w], [torch.ones(3)], method="bogus")
    with pytest.raises(ValueError, match="scalar"):
        hvp(lambda: w.square(), [w], [torch.ones(3)])
    with pytest.raises(TypeError, match="scalar Tensor"):
        hvp(lambda: None, [w], [torch.ones(3)])  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="eps"):
        hvp(lambda: w.square().sum(), [w], [torch.ones(3)], method="fd", eps=-1.0)


def _fd_dtensor_worker(rank: int, world_size: int) -> float:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    gen = torch.Generator().manual_seed(0)
    # large entries make the default finite-difference step (scaled by ||p||) matter: a
    # step taken from one rank's shard alone changes the result by ~1e-7 relative
    p_full = 1e4 * torch.randn(8, 3, generator=gen, dtype=torch.float64)
    v_full = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    plain = p_full.clone().requires_grad_(True)
    want = hvp(lambda: torch.sin(3 * plain).sum(), [plain], [v_full], method="fd")[0]
    p = distribute_tensor(p_full, mesh, [Shard(0)]).requires_grad_(True)
    v = distribute_tensor(v_full, mesh, [Shard(0)])
    got = hvp(lambda: torch.sin(3 * p).sum(), [p], [v], method="fd")[0]
    return float((got.full_tensor() - want).abs().max() / want.abs().max())


@pytest.mark.distributed
def test_hvp_fd_of_sharded_dtensor_takes_the_step_from_the_whole_tensor():
    from optcore.testing import spawn

    errs = spawn(2, _fd_dtensor_worker)
    assert max(errs) < 1e-10, errs
