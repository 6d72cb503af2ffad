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


def _train_data_parallel(model, opt, rank: int, world: int) -> list[list[float]]:
    """STEPS steps on this rank's share of each batch, gradients averaged over the ranks
    (as DDP does); returns the parameters as plain lists (tensors sent through a
    multiprocessing queue outlive their process badly)."""
    import torch.distributed as dist

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
    return [p.detach().double().reshape(-1).tolist() for p in model.parameters()]


def _run(rank: int, world: int, geometry: str) -> list[list[float]]:
    torch.set_num_threads(1)
    model = _model()
    torch.manual_seed(1)  # the optimizer's probe seed
    opt = psgd.Kron(model.parameters(), lr=0.01, geometry=geometry)
    return _train_data_parallel(model, opt, rank, world)


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


def _count_fits(opt) -> list[int]:
    """Counts the optimizer's preconditioner fits (``_unit_update`` calls) in ``[0]``."""
    fits = [0]
    update = opt._unit_update

    def counted(*args, **kwargs):
        fits[0] += 1
        return update(*args, **kwargs)

    opt._unit_update = counted
    return fits


def _per_group(model, flat: bool):
    """One group per parameter for the optimizers with one preconditioner per group (so
    that there are units to split), else the parameters."""
    return [{"params": [p]} for p in model.parameters()] if flat else model.parameters()


def _assert_split_and_equal(single, ranks, atol: float) -> None:
    """Both ranks equal the single process (to ``atol``) and each other, and the fits
    (4 units, one every step) are split between the ranks, not repeated."""
    params1, fits1 = single
    for params, _ in ranks:
        for a, b in zip(params1, params):
            a, b = torch.tensor(a), torch.tensor(b)
            assert torch.allclose(a, b, atol=atol, rtol=0), (a - b).abs().max()
    assert ranks[0][0] == ranks[1][0]  # ranks hold identical parameters
    fits = [f for _, f in ranks]
    assert fits1 == 4 * STEPS
    assert sum(fits) == fits1 and min(fits) > 0


def _run_whiten(rank: int, world: int, name: str) -> tuple[list[list[float]], int]:
    """A whitening family optimizer under data parallelism; returns the parameters and how
    many preconditioner fits this rank ran."""
    torch.set_num_threads(1)
    model = _model()
    cls = getattr(psgd, name)
    opt = cls(_per_group(model, name == "LRAWhiten"), lr=0.01, momentum=0.9)
    fits = _count_fits(opt)
    return _train_data_parallel(model, opt, rank, world), fits[0]


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["KronWhiten", "LRAWhiten"])
def test_whitening_family_ddp_splits_the_fits_and_equals_single_process(name: str) -> None:
    """Each of 2 gloo ranks fits only its own units' preconditioners (by cost) and
    broadcasts them; the parameters equal a single process's (to 1e-5)."""
    _assert_split_and_equal(_run_whiten(0, 1, name), spawn(2, _run_whiten, name), 1e-5)


_NEWTON = {
    "KronNewton": dict(lr=0.05),
    "KronNewton-fd": dict(lr=0.05, hvp_method="fd"),
    "LRANewton": dict(lr=0.05, rank=3),
    "DenseNewton": dict(lr=0.05),
}


def _run_newton(
    rank: int, world: int, name: str, ddp: bool, distributed: bool | None = None
) -> tuple[list[list[float]], int]:
    """A Newton variant with each rank's closure on its own share of every batch (the model
    wrapped in DDP or not); returns the parameters and how many fits this rank ran."""
    torch.set_num_threads(1)
    model = _model().double()
    net = model
    if ddp and world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    cls = getattr(psgd, name.split("-")[0])
    torch.manual_seed(1)  # the optimizer's probe seed
    params = _per_group(model, name.startswith(("LRA", "Dense")))
    opt = cls(params, **_NEWTON[name], distributed=distributed)
    fits = _count_fits(opt)
    x, y = _data()
    per = x.shape[1] // world
    for t in range(STEPS):
        xs = x[t, rank * per : (rank + 1) * per].double()
        ys = y[t, rank * per : (rank + 1) * per].double()
        opt.step(lambda xs=xs, ys=ys: ((net(xs) - ys) ** 2).mean())
    return [p.detach().reshape(-1).tolist() for p in model.parameters()], fits[0]


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("name", "ddp"),
    [("KronNewton", False), ("KronNewton", True), ("KronNewton-fd", False),
     ("LRANewton", False), ("DenseNewton", True)],
)  # fmt: skip
def test_newton_variants_average_grads_and_hvps_over_ranks(name: str, ddp: bool) -> None:
    """Gradients and H v come from torch.autograd.grad, which DDP does not reduce: the
    optimizer averages them over the 2 gloo ranks, so the parameters equal a single
    process's on the whole batch (float64, to 1e-10), identical on both ranks, with the
    fits split between them."""
    single = _run_newton(0, 1, name, ddp)
    _assert_split_and_equal(single, spawn(2, _run_newton, name, ddp), 1e-10)


@pytest.mark.distributed
def test_newton_distributed_false_steps_each_rank_on_its_own() -> None:
    """``distributed=False``: no averaging, every rank fits all its preconditioners."""
    ranks = spawn(2, _run_newton, "LRANewton", False, False, timeout=120.0)
    assert ranks[0][0] != ranks[1][0]  # each rank followed its own shares
    assert [f for _, f in ranks] == [4 * STEPS, 4 * STEPS]


def _run_mismatched(rank: int, world: int) -> list[str]:
    """Rank 1's model is wider than rank 0's; returns each optimizer's outcome."""
    torch.set_num_threads(1)
    msgs = []
    for name, flag in [("Kron", None), ("KronWhiten", None), ("KronNewton", None),
                       ("Kron", False), ("KronNewton", False)]:  # fmt: skip
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 12 + rank), torch.nn.Linear(12 + rank, 3))
        opt = getattr(psgd, name)(model.parameters(), lr=0.01, distributed=flag)
        x, y = _data()

        def loss(model=model, x=x[0], y=y[0]):
            return ((model(x) - y) ** 2).mean()

        try:
            if name.endswith("Newton"):
                opt.step(loss)
            else:
                loss().backward()
                opt.step()
            msgs.append("stepped")
        except ValueError as e:
            msgs.append(str(e))
    return msgs


@pytest.mark.distributed
def test_different_parameters_on_the_ranks_get_a_clear_error() -> None:
    """Each rank's own optimizer refuses (on both ranks, no hang) unless distributed=False."""
    for msgs in spawn(2, _run_mismatched):
        assert len(msgs) == 5
        for m in msgs[:3]:
            assert "ranks' parameters differ" in m and "distributed=False" in m, m
        assert msgs[3:] == ["stepped", "stepped"]


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


def _run_dtensor(rank: int, world: int) -> dict[str, list[list[float]]]:
    """Parameters as DTensors (sharded like FSDP2, then replicated), full batch on every
    rank; the optimizer is rebuilt from its saved state halfway."""
    import io

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for place in (Shard(0), Replicate()):
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
            pred = torch.func.functional_call(model, full, (x[t],))
            ((pred - y[t]) ** 2).mean().backward()
            opt.step()
            if t == STEPS // 2 - 1:  # resume from a weights-only round trip of the state
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                buf.seek(0)
                opt = psgd.Kron(params, lr=0.01)
                opt.load_state_dict(torch.load(buf, weights_only=True))
        for p in params:
            assert p.placements == (place,)  # the layout is kept
        out[str(place)] = [p.full_tensor().detach().double().reshape(-1).tolist() for p in params]
    return out


@pytest.mark.distributed
def test_dtensor_parameters_match_plain_tensors() -> None:
    """Kron with Shard(0) and with Replicate() DTensor parameters (gathered gradients,
    replicated state) steps like plain tensors."""
    single = [torch.tensor(t) for t in _run(0, 1, "QUAD")]  # Kron's default geometry
    ranks = spawn(2, _run_dtensor, timeout=180.0)
    assert len(ranks[0]) == 2
    for place in ranks[0]:
        for r in ranks:
            for a, b in zip(single, r[place]):
                b = torch.tensor(b)
                assert torch.allclose(a, b, atol=1e-5, rtol=0), (place, (a - b).abs().max())


# (name, class, keyword arguments); Newton variants step with a closure
_FAMILY = [
    ("KronWhiten", "KronWhiten", dict(lr=0.01, momentum=0.9)),
    ("KronWhiten-EQ-diag", "KronWhiten", dict(lr=0.01, geometry="EQ", preconditioner_max_skew=0)),
    ("LRAWhiten", "LRAWhiten", dict(lr=0.01, rank=3, whiten_momentum=True, momentum=0.5)),
    ("LRAWhiten-rank0", "LRAWhiten", dict(lr=0.01, rank=0, weight_decay=0.1)),
    ("KronNewton", "KronNewton", dict(lr=0.05)),
    ("KronNewton-fd", "KronNewton", dict(lr=0.05, hvp_method="fd", geometry="QUAD")),
    ("LRANewton", "LRANewton", dict(lr=0.05, rank=3)),
    ("DenseNewton", "DenseNewton", dict(lr=0.05, grad_clip_max_rms=1.0)),
]
FAMILY_STEPS = 6


def _family_run(params: list[torch.Tensor], cls: str, kw: dict, gather: bool) -> list[torch.Tensor]:
    """``FAMILY_STEPS`` steps on the small regression; the optimizer is rebuilt from a
    ``torch.save``/``torch.load(weights_only=True)`` round trip of its state halfway."""
    import io

    model = _model().double()
    names = [n for n, _ in model.named_parameters()]
    x, y = _data()
    x, y = x.double(), y.double()

    def make() -> torch.optim.Optimizer:
        return getattr(psgd, cls)(params, **kw)

    torch.manual_seed(1)  # the optimizer's probe seed
    opt = make()
    newton = cls.endswith("Newton")
    for t in range(FAMILY_STEPS):

        def loss_fn(t: int = t) -> torch.Tensor:
            ps = [p.full_tensor() if gather else p for p in params]
            out = torch.func.functional_call(model, dict(zip(names, ps)), (x[t],))
            return ((out - y[t]) ** 2).mean()

        if newton:
            opt.step(loss_fn)
        else:
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
        if t == FAMILY_STEPS // 2 - 1:
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            buf.seek(0)
            opt = make()
            opt.load_state_dict(torch.load(buf, weights_only=True))
    return [p.detach() for p in params]


def _run_family_dtensor(rank: int, world: int) -> dict[str, list[list[float]]]:
    """Every family class with Shard(0) and Replicate() DTensor parameters and with plain ones."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for name, cls, kw in _FAMILY:
        init = [p.detach().double() for p in _model().parameters()]
        plain = [torch.nn.Parameter(p.clone()) for p in init]
        ref = _family_run(plain, cls, kw, gather=False)
        out[name + "/plain"] = [p.reshape(-1).tolist() for p in ref]
        out[name + "/init"] = [p.reshape(-1).tolist() for p in init]
        for place in (Shard(0), Replicate()):
            dt = [torch.nn.Parameter(distribute_tensor(p.clone(), mesh, [place])) for p in init]
            got = _family_run(dt, cls, kw, gather=True)
            for p in got:
                assert p.placements == (place,)  # the layout is kept
            out[f"{name}/{place}"] = [p.full_tensor().reshape(-1).tolist() for p in got]
    return out


@pytest.mark.distributed
def test_family_dtensor_parameters_match_plain_tensors() -> None:
    """KronWhiten/LRAWhiten/KronNewton/LRANewton/DenseNewton (and the diagonal special cases)
    with Shard(0) and with Replicate() DTensor parameters step like plain tensors (float64,
    to 1e-10), through a state_dict round trip halfway."""
    ranks = spawn(2, _run_family_dtensor, timeout=180.0)
    keys = [k for k in ranks[0] if not k.endswith(("/plain", "/init"))]
    assert len(keys) == 2 * len(_FAMILY)
    for key in keys:
        name = key.split("/")[0]
        for r in ranks:
            for a, b, c in zip(r[key], r[name + "/plain"], r[name + "/init"]):
                a, b, c = torch.tensor(a), torch.tensor(b), torch.tensor(c)
                assert (b - c).abs().max() > 1e-3, key  # the run moved the parameters
                assert torch.allclose(a, b, atol=1e-10, rtol=0), (key, (a - b).abs().max())
        assert ranks[0][key] == ranks[1][key], key  # ranks hold identical parameters
