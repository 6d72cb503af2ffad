"""Hooks mode takes mean balance's epoch sum from backward's own weight gradient.

For a wide ``nn.Linear`` layer the plain sum of the batch's per-example
gradients is the layer's weight gradient of that forward call (times ``B`` for
a mean loss); :class:`~grabsampler.GraB` keeps a reference to it from the
backward node and adds it to the epoch sum instead of a product. These tests
check that the stored vectors are the same as with the product, that the
shortcut is really taken where it should be, and that it is refused whenever
the captured tensor may be wrong (changed in place through ``.grad``, a second
backward through the same graph).
"""

from __future__ import annotations

import pytest
import torch
from grabsampler_testing import train_hooks_beside_route
from torch import nn

from grabsampler import GraB, GraBSampler

WIDE = 130  # 130 x 130 = 16,900 entries: above the shared small block, own storage block


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


class Net(nn.Module):
    """A wide square Linear used once or twice per forward pass, a bias-free head."""

    def __init__(self, twice: bool = False):
        super().__init__()
        self.twice = twice
        self.inp = nn.Linear(6, WIDE)
        self.lin = nn.Linear(WIDE, WIDE)
        self.out = nn.Linear(WIDE, 3, bias=False)

    def forward(self, x):
        h = torch.tanh(self.lin(torch.tanh(self.inp(x))))
        if self.twice:  # weight sharing: the same layer called again
            h = torch.tanh(self.lin(h))
        return self.out(h)


def spy(grab, used):
    orig = grab._weight_sum

    def wrapped(*args):
        r = orig(*args)
        used.append(r is not None)
        return r

    grab._weight_sum = wrapped


def one_step(scenario, shortcut):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = Net(twice=scenario == "shared").double()
    x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=gen)
    grab = GraB(model, range(64), seed=3)
    used: list[bool] = []
    if shortcut:
        spy(grab, used)
    else:
        grab._weight_sum = lambda *a: None
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    iter(grab.sampler)
    for s in range(0, 8, 4):  # two batches: the stored sums are nonzero in the second
        xb, yb = x[s : s + 4], y[s : s + 4]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        if scenario == "extra":  # the weight also enters the loss outside the layer
            loss = loss + 0.3 * model.lin.weight.square().sum()
        if scenario == "double":
            loss.backward(retain_graph=True)
            loss.backward()
        elif scenario == "accumulate":
            loss.backward()
            nn.functional.cross_entropy(model(xb.flip(0)), yb.flip(0)).backward()
        else:
            loss.backward()
        if scenario == "clip":  # in place on .grad before grab.step()
            nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        grab.step()
        opt.step()
    grab.remove()
    return grab.sampler.state_dict()["aux"], used


@pytest.mark.parametrize(
    ("scenario", "taken"),
    [
        ("plain", True),
        ("shared", True),
        ("extra", True),
        ("clip", False),
        ("double", False),
        ("accumulate", False),
    ],
)
def test_epoch_sum_from_backward_equals_product(scenario, taken):
    aux, used = one_step(scenario, shortcut=True)
    ref, _ = one_step(scenario, shortcut=False)
    for a, r in zip(aux, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    assert any(float(r[2].abs().max()) > 0 for r in ref)  # the epoch sum is not trivial
    # two Linear layers of 2-d input per batch and step (the bias-free head included)
    assert len(used) == 2 * 3
    assert all(used) if taken else not all(used), used


def test_orders_with_epoch_sum_from_backward_equal_per_sample_route():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    n, batch = 24, 6
    model = Net(twice=True).double()
    x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    params = {k: v.detach() for k, v in model.named_parameters()}
    ref = GraBSampler(range(n), params, seed=4)
    grab = GraB(model, range(n), seed=4)
    used: list[bool] = []
    spy(grab, used)
    train_hooks_beside_route(model, x, y, ref, grab, batch)
    assert used and all(used)
