"""Hooks mode gives the same orders as the per-sample-gradient route."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from grabsampler import GraB, GraBSampler


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls are much faster single-threaded on a busy shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=0)
        self.lin = nn.Linear(4, 5)
        self.conv = nn.Conv1d(5, 3, 2)
        self.out = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(self.emb(x)))  # (B, T, 5): Linear over a sequence
        h = torch.tanh(self.conv(h.transpose(1, 2)))  # (B, 3, T-1)
        return self.out(h.mean(dim=2))


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def convnet():
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )


def data(kind, n, gen):
    if kind == "mlp":
        return torch.randn(n, 6, generator=gen, dtype=torch.float64)
    if kind == "conv":
        return torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64)
    return torch.randint(0, 7, (n, 4), generator=gen)


MODELS = {"mlp": mlp, "conv": convnet, "seq": Seq}


@pytest.mark.parametrize("kind", ["mlp", "conv", "seq"])
@pytest.mark.parametrize("balance", ["mean", "pair", "recursive_pair"])
def test_hooks_order_equals_per_sample_route(kind, balance):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    n, batch = 24, 6
    model = MODELS[kind]().double()
    x = data(kind, n, gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    params = {k: v.detach() for k, v in model.named_parameters()}
    ref = GraBSampler(range(n), params, balance, seed=4)
    grab = GraB(model, range(n), balance, seed=4)
    assert list(grab.params) == list(params)

    def one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    psg = vmap(grad(one), in_dims=(None, 0, 0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        order = list(iter(ref))
        assert list(iter(grab.sampler)) == order
        for s in range(0, n, batch):
            idx = order[s : s + batch]
            p = {k: v.detach() for k, v in model.named_parameters()}
            ref.step(psg(p, x[idx], y[idx]))
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            grab.step()
            opt.step()
    assert list(iter(ref)) == list(iter(grab.sampler))


def test_hooks_with_batchnorm_dropout_and_eval_pass():
    torch.manual_seed(0)
    n, batch = 20, 5
    model = nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)
    )
    grab = GraB(model, range(n), "mean", loss_reduction="mean")
    assert all("1." not in k for k in grab.params)  # BatchNorm's parameters are not balanced
    x, y = torch.randn(n, 6), torch.randint(0, 3, (n,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    orders = []
    for _ in range(3):
        order = list(iter(grab.sampler))
        orders.append(order)
        for s in range(0, n, batch):
            idx = order[s : s + batch]
            model.train()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            grab.step()
            opt.step()
            model.eval()
            with torch.no_grad():
                model(x)  # eval passes are not captured
    assert all(sorted(o) == list(range(n)) for o in orders)
    assert orders[1] != orders[2]


def test_hooks_errors():
    model = mlp()
    grab = GraB(model, range(4))
    list(iter(grab.sampler))
    with pytest.raises(RuntimeError, match="backward"):
        grab.step()
    model(torch.randn(2, 6))  # forward without backward
    with pytest.raises(RuntimeError, match="backward"):
        grab.step()
    assert grab.sampler.position == 0
    with pytest.raises(ValueError, match="no trainable"):
        GraB(nn.ReLU(), range(3))
    with pytest.raises(ValueError, match="loss_reduction"):
        GraB(model, range(3), loss_reduction="none")
    with pytest.raises(ValueError, match="groups"):
        GraB(nn.Conv2d(2, 2, 3, groups=2), range(3))
    with pytest.raises(TypeError, match="nn.Module"):
        GraB("model", range(3))  # type: ignore[arg-type]
    grab.remove()
