"""Mean balance (vanilla GraB, Lu et al., 2022, Alg. 4).

Each example's gradient is centered by the *stale mean* (the average gradient
of the previous epoch, zero in the first) and balanced greedily against a
running sum; positives fill the next order from the front, negatives from
the back. Stored vectors: the running sum ``s``, the stale mean ``m`` and the
sum ``t`` of this epoch's gradients (the next stale mean).

Reference:
    Y. Lu, W. Guo, C. De Sa. GraB: Finding Provably Better Data Permutations
    than Random Reshuffling. NeurIPS 2022.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from grabsampler.balance.base import Balancer, TwoEnded

__all__ = ["MeanBalance"]

S, M, T = 0, 1, 2


class MeanBalance(Balancer):
    """Greedy balancing of stale-mean-centered gradients."""

    name = "mean"
    sequential = True

    def __init__(self, n: int, decider: Any) -> None:
        super().__init__(n, decider)
        self.place = TwoEnded(n)
        self.count = 0

    def aux_rows(self, batch_size: int) -> int:
        return 3

    def gram_rows(self) -> list[int]:
        return [S, M]

    def start_epoch(self, order: list[int]) -> None:
        self.place = TwoEnded(len(order))
        self.count = 0

    def step(self, gram: Tensor, indices: list[int]) -> Tensor:
        b = len(indices)
        k = gram.shape[0] - b
        coef = torch.zeros(b, b + k, dtype=torch.float64)
        coef[:, :b] = torch.eye(b, dtype=torch.float64)
        coef[:, b + M] = -1.0
        s = torch.zeros(b + k, dtype=torch.float64)
        s[b + S] = 1.0
        eps, coef = self.decider.walk(coef, gram, s, sequential=self.sequential)
        for i, e in zip(indices, eps):
            self.place.put(i, e)
        delta = torch.zeros(k, b + k, dtype=torch.float64)
        delta[S] = torch.tensor(eps, dtype=torch.float64) @ coef
        delta[T, :b] = 1.0
        self.count += b
        return delta

    def end_epoch(self, unvisited: list[int]) -> tuple[list[int], Tensor]:
        order = self.place.finish(unvisited)
        mat = torch.zeros(3, 3, dtype=torch.float64)
        if self.count > 0:
            mat[M, T] = 1.0 / self.count
        else:
            mat[M, M] = 1.0
        self.count = 0
        return order, mat

    def state_dict(self) -> dict[str, Any]:
        return {"place": self.place.state(), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.place.load(state["place"])
        self.count = int(state["count"])
