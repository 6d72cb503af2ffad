"""Two gloo processes (data-parallel) give the same parameters as one process."""

from __future__ import annotations

import pytest
import torch

import psgd
from optcore.testing import spawn

STEPS = 20


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS, 16, 6, generator=gen)
    y = torch.sin(x[..., :3]) + 0.1 * torch.randn(STEPS, 16, 3, generator=gen)
    return x, y


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def _run(rank: int, world: int, geometry: str) -> list[list[float]]:
    import torch.distributed as dist

    torch.set_num_threads(1)
    model = _model()
    torch.manual_seed(1)  # the optimizer's probe seed
    opt = psgd.Kron(model.parameters(), lr=0.01, geometry=geometry)
    x, y = _data()
    per = x.shape[1] // world
    for t in range(STEPS):
        xs = x[t, rank * per : (rank + 1) * per]
        ys = y[t, rank * per : (rank + 1) * per]
        opt.zero_grad()
        ((model(xs) - ys) ** 2).mean().backward()
        if world > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
    # plain lists: tensors sent through a multiprocessing queue outlive their process badly
    return [p.detach().double().reshape(-1).tolist() for p in model.parameters()]


@pytest.mark.distributed
@pytest.mark.parametrize("geometry", ["QUAD", pytest.param("EQ", marks=pytest.mark.slow)])
def test_two_process_ddp_equals_single_process(geometry: str) -> None:
    single = [torch.tensor(t) for t in _run(0, 1, geometry)]
    ranks = [[torch.tensor(t) for t in r] for r in spawn(2, _run, geometry, timeout=120.0)]
    for r in ranks:
        for a, b in zip(single, r):
            assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    for a, b in zip(ranks[0], ranks[1]):
        assert torch.equal(a, b)  # ranks hold identical parameters


def test_owners_split_work_by_cost() -> None:
    from optcore.distributed import assign_by_cost
    from psgd.factors import factor_cost

    costs = [
        factor_cost((12, 6), (True, True)),
        factor_cost((12,), (False,)),
        factor_cost((3, 12), (True, True)),
    ]
    owners = assign_by_cost(costs, 2)
    assert sorted(set(owners)) == [0, 1]


def _run_dtensor(rank: int, world: int, placement: str) -> list[list[float]]:
    """Parameters as DTensors (sharded like FSDP2, or replicated), full batch on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    place = Shard(0) if placement == "shard" else Replicate()
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    params = [
        torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [place]))
        for p in model.parameters()
    ]
    torch.manual_seed(1)  # the optimizer's probe seed, as in _run
    opt = psgd.Kron(params, lr=0.01)
    x, y = _data()
    for t in range(STEPS):
        opt.zero_grad()
        full = {n: p.full_tensor() for n, p in zip(names, params)}
        out = torch.func.functional_call(model, full, (x[t],))
        ((out - y[t]) ** 2).mean().backward()
        opt.step()
    for p in params:
        assert p.placements == (place,)  # the layout is kept
    return [p.full_tensor().detach().double().reshape(-1).tolist() for p in params]


@pytest.mark.distributed
@pytest.mark.parametrize("placement", ["shard", "replicate"])
def test_dtensor_parameters_match_plain_tensors(placement: str) -> None:
    """DTensor parameters (gathered gradients, replicated state) step like plain ones."""
    single = [torch.tensor(t) for t in _run(0, 1, "EQ")]
    ranks = [[torch.tensor(t) for t in r] for r in spawn(2, _run_dtensor, placement, timeout=120.0)]
    for r in ranks:
        for a, b in zip(single, r):
            assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
