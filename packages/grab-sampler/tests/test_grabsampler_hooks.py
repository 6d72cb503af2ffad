"""Hooks mode gives the same orders as the per-sample-gradient route."""

from __future__ import annotations

import pytest
import torch
from grabsampler_testing import train_hooks_beside_route
from torch import nn
from torch.func import functional_call, grad, vmap

from grabsampler import GraB, GraBSampler

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


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
    if kind in ("mlp", "conv1d"):
        return torch.randn(n, 6, generator=gen, dtype=torch.float64)
    if kind in ("conv", "convmix", "norm"):
        return torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64)
    return torch.randint(0, 7, (n, 4), generator=gen)


def convmix():
    """Grouped, reflect/circular-padded, 'same'-padded 2-d convolutions and a Conv3d."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, groups=2, padding=1, padding_mode="circular"),
        nn.Tanh(),
        nn.Conv2d(4, 2, (2, 3), padding="same", dilation=(1, 2), bias=False),
        nn.Unflatten(1, (1, 2)),  # (B, 1, 2, 8, 8): a depth-2 volume
        nn.Conv3d(1, 3, (2, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        nn.Tanh(),
        nn.Conv3d(3, 2, 1, padding=1, padding_mode="replicate", groups=1),
        nn.Flatten(),
        nn.Linear(2 * 3 * 6 * 6, 3),
    )


def conv1d_grouped():
    return nn.Sequential(
        nn.Unflatten(1, (2, 3)),  # (B, 2, 3)
        nn.Conv1d(2, 4, 2, groups=2, padding=1, padding_mode="reflect"),
        nn.Tanh(),
        nn.Conv1d(4, 2, 3, padding="same", groups=2),
        nn.Flatten(),
        nn.Linear(2 * 4, 3),
    )


def normnet():
    """LayerNorm (over two dims, one without bias), GroupNorm, eval-mode BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2),  # (B, 4, 3, 3)
        nn.GroupNorm(2, 4),
        nn.Tanh(),
        nn.LayerNorm((3, 3), bias=False),
        nn.Flatten(),
        nn.Linear(36, 6),
        nn.LayerNorm(6),
        nn.BatchNorm1d(6).eval(),
        nn.Tanh(),
        nn.Linear(6, 3),
    )


MODELS = {
    "norm": normnet,
    "mlp": mlp,
    "conv": convnet,
    "seq": Seq,
    "convmix": convmix,
    "conv1d": conv1d_grouped,
}


@pytest.mark.parametrize(
    ("kind", "balance"),
    [
        (k, b)
        for k in ["mlp", "conv", "seq", "convmix", "conv1d", "norm"]
        for b in ["mean", "pair", "recursive_pair"]
        if k in ("mlp", "conv", "seq") or b != "recursive_pair"
    ],
)
def test_hooks_order_equals_per_sample_route(kind, balance):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    n, batch = 24, 6
    model = MODELS[kind]().double()
    x = data(kind, n, gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    params = {k: v.detach() for k, v in model.named_parameters()}
    ref = GraBSampler(range(n), params, balance, seed=4)
    grab = GraB(model, range(n), balance, seed=4)
    assert list(grab.params) == list(params)
    train_hooks_beside_route(model, x, y, ref, grab, batch)


def test_hooks_with_batchnorm_dropout_and_eval_pass():
    torch.manual_seed(0)
    n, batch = 20, 5
    model = nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)
    )
    grab = GraB(model, range(n), "mean", loss_reduction="mean")
    assert list(grab.params) == [k for k, _ in model.named_parameters()]  # BatchNorm's too
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
    with pytest.raises(TypeError, match="nn.Module"):
        GraB("model", range(3))  # type: ignore[arg-type]
    grab.remove()


@pytest.mark.parametrize("kind", ["mlp", "conv", "seq", "convmix", "conv1d", "norm"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_hooks_rows_equal_per_sample_gradients(kind, reduction):
    """Each layer's rows give the per-sample gradients' Gram matrix, cross terms and sums."""
    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(3)
    n = 5
    model = MODELS[kind]().double()
    x = data(kind, n, gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    per = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    grab = GraB(model, range(n), loss_reduction=reduction)
    loss_fn(model(x), y).backward()
    rows = []
    for i, (_, m) in enumerate(grab.layers):
        rows.extend(grab._layer_rows(m, grab._inputs[i], grab._grads[i]))
    assert len(rows) == len(grab.params)
    for r, name in zip(rows, grab.params):
        dense = per[name].reshape(n, -1)
        aux = torch.randn(2, dense.shape[1], generator=gen, dtype=torch.float64)
        w = torch.randn(2, n, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(r.gram(), dense @ dense.T, msg=name)
        torch.testing.assert_close(r.cross(aux), dense @ aux.T, msg=name)
        torch.testing.assert_close(r.combine(w), w @ dense, msg=name)
        if hasattr(r, "combine_into"):
            out = aux.clone()
            r.combine_into(out, w)
            torch.testing.assert_close(out, aux + w @ dense, msg=name)
    grab.remove()


def test_hooks_train_mode_batchnorm_rows_sum_to_batch_gradient():
    """Train-mode BatchNorm: per-example rows of gamma/beta add up to the batch gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten())
    grab = GraB(model, range(8), loss_reduction="mean")
    x = torch.randn(8, 1, 5, 5, dtype=torch.float64)
    model.double()
    target = torch.randn(8, 27, dtype=torch.float64)
    nn.functional.mse_loss(model(x), target).backward()
    rows = []
    for i, (_, m) in enumerate(grab.layers):
        rows.extend(grab._layer_rows(m, grab._inputs[i], grab._grads[i]))
    ones = torch.ones(1, 8, dtype=torch.float64)
    for r, (name, p) in zip(rows, grab.params.items()):
        torch.testing.assert_close(r.combine(ones)[0] / 8, p.grad.reshape(-1), msg=name)
    bn = model[1]
    xh = (model[0](x) - model[0](x).mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        model[0](x).var((0, 2, 3), unbiased=False, keepdim=True) + bn.eps
    )
    torch.testing.assert_close(grab._inputs[1][0], xh.detach())
