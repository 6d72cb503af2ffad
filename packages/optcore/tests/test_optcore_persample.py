import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optcore.persample import functional_per_sample_grads, per_sample_grads
from optcore.tree import named_parameters


class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


class SmallRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(3, 5, batch_first=True)
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def loop_grads(model, loss_fn, x, y):
    params = named_parameters(model)
    rows = []
    for i in range(x.shape[0]):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])
        rows.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
    return {k: torch.stack([r[k] for r in rows]) for k in params}


class CellRNN(nn.Module):
    """A tanh RNN unrolled from nn.RNNCell (batchable by vmap)."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.RNNCell(3, 5)
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], 5)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.head(h)


CASES = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)), (7, 6)),
    "convnet": (SmallConvNet, (5, 1, 8, 8)),
    "rnn": (SmallRNN, (5, 6, 3)),  # fused kernel: exercises the per-example fallback
    "rnncell": (CellRNN, (5, 6, 3)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_per_sample_grads_match_python_loop(case, chunk_size):
    torch.manual_seed(0)
    make, shape = CASES[case]
    model = make()
    x = torch.randn(*shape)
    y = torch.randint(0, 4, (shape[0],))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = per_sample_grads(model, F.cross_entropy, x, y, chunk_size=chunk_size)
    want = loop_grads(model, F.cross_entropy, x, y)
    assert list(got) == list(want)
    for k in want:
        assert got[k].shape == (shape[0], *dict(model.named_parameters())[k].shape)
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)


def test_per_sample_grads_mean_equals_batch_grad():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(9, 4), torch.randn(9, 3)
    got = per_sample_grads(model, F.mse_loss, x, y)
    batch = torch.autograd.grad(F.mse_loss(model(x), y), list(model.parameters()))
    for g, b in zip(got.values(), batch):
        torch.testing.assert_close(g.mean(0), b, atol=1e-6, rtol=1e-5)


def test_functional_per_sample_grads():
    torch.manual_seed(2)
    params = {"w": torch.randn(3), "b": torch.randn(())}
    x, y = torch.randn(6, 3), torch.randn(6)

    def fn(p, xi, yi):
        return (xi @ p["w"] + p["b"] - yi) ** 2

    got = functional_per_sample_grads(fn, params, x, y, chunk_size=4)
    resid = x @ params["w"] + params["b"] - y
    torch.testing.assert_close(got["w"], 2 * resid[:, None] * x)
    torch.testing.assert_close(got["b"], 2 * resid)


def test_per_sample_grads_bad_input():
    model = nn.Linear(2, 1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        per_sample_grads(lambda x: x, F.mse_loss, torch.zeros(2, 2), torch.zeros(2, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch size"):
        per_sample_grads(model, F.mse_loss, torch.zeros(3, 2), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="chunk_size"):
        per_sample_grads(model, F.mse_loss, torch.zeros(3, 2), torch.zeros(3, 1), chunk_size=0)
    frozen = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        per_sample_grads(frozen, F.mse_loss, torch.zeros(3, 2), torch.zeros(3, 1))
