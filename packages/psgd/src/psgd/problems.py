"""Small built-in problems used by the examples and benchmarks (no downloads).

* :func:`delayed_xor_batch`: the delayed-XOR sequence task (LSTM paper) for a tanh RNN.
* :func:`rosenbrock`: the Rosenbrock function.
* :func:`rank_decomposition_loss`: a tensor rank (CP) decomposition objective.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TanhRNN", "delayed_xor_batch", "rank_decomposition_loss", "rosenbrock"]


def delayed_xor_batch(
    batch: int, length: int, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Sequences of random bits with two marked steps; the target is the XOR of the marked bits.

    Returns:
        ``(x, y)``: ``x`` of shape ``(batch, length, 2)`` (bit in ``{-1, 1}``, marker in
        ``{0, 1}``; one mark in each half) and ``y`` of shape ``(batch,)`` in ``{0, 1}``.
    """
    bits = torch.randint(0, 2, (batch, length), generator=generator)
    half = length // 2
    i = torch.randint(0, half, (batch,), generator=generator)
    j = torch.randint(half, length, (batch,), generator=generator)
    marks = torch.zeros(batch, length)
    rows = torch.arange(batch)
    marks[rows, i] = 1.0
    marks[rows, j] = 1.0
    y = (bits[rows, i] ^ bits[rows, j]).float()
    x = torch.stack([2.0 * bits.float() - 1.0, marks], dim=-1)
    return x, y


class TanhRNN(torch.nn.Module):
    """A simple tanh RNN with a linear read-out of the last hidden state."""

    def __init__(self, hidden: int = 30, inputs: int = 2) -> None:
        super().__init__()
        self.w_in = torch.nn.Parameter(torch.randn(inputs + 1, hidden) * 0.5)
        self.w_rec = torch.nn.Parameter(torch.linalg.qr(torch.randn(hidden, hidden))[0])
        self.w_out = torch.nn.Parameter(torch.zeros(hidden + 1))

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(batch,)`` for ``x`` of shape ``(batch, length, inputs)``."""
        h = torch.zeros(x.shape[0], self.w_rec.shape[0])
        ones = torch.ones(x.shape[0], 1)
        for t in range(x.shape[1]):
            h = torch.tanh(torch.cat([x[:, t], ones], dim=1) @ self.w_in + h @ self.w_rec)
        return torch.cat([h, ones], dim=1) @ self.w_out


def rosenbrock(xy: Tensor) -> Tensor:
    """``(1 - x)^2 + 100 (y - x^2)^2``, minimum 0 at ``(1, 1)``."""
    return (1 - xy[0]) ** 2 + 100.0 * (xy[1] - xy[0] ** 2) ** 2


def rank_decomposition_loss(target: Tensor, factors: list[Tensor]) -> Tensor:
    """Mean squared error of the CP reconstruction ``sum_r a_r (x) b_r (x) c_r`` of a 3-way tensor."""
    a, b, c = factors
    approx = torch.einsum("ir,jr,kr->ijk", a, b, c)
    return ((approx - target) ** 2).mean()
