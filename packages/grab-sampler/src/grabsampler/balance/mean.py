"""Mean balance (vanilla GraB, Lu et al., 2022, Alg. 4).

Each example's gradient is centered by the *stale mean* (the average gradient
of the previous epoch, zero in the first) and balanced greedily against a
running sum; positives fill the next order from the front, negatives from
the back. Stored vectors: the stale mean ``m``, the signed sum
``u = sum_j w_j x_j`` of this epoch's gradients (the running sum is
``s = u - sigma m`` with the scalar ``sigma = sum_j w_j`` kept on the host, so
updating it is a single product) and the plain sum ``t`` (the next stale mean).

Reference:
    Y. Lu, W. Guo, C. De Sa. GraB: Finding Provably Better Data Permutations
    than Random Reshuffling. NeurIPS 2022.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from grabsampler.balance.base import Balancer, TwoEnded, Update

__all__ = ["MeanBalance"]

M, U, T = 0, 1, 2  # stale mean, signed sum u (in inner products); next-mean sum (update only)


class MeanBalance(Balancer):
    """Greedy balancing of stale-mean-centered gradients."""

    name = "mean"
    sequential = True

    def __init__(self, n: int, decider: Any) -> None:
        super().__init__(n, decider)
        self.place = TwoEnded(n)
        self.count = 0
        self.sigma = 0.0

    passive = 1

    def aux_rows(self, batch_size: int) -> int:
        return 3

    def start_epoch(self, order: list[int]) -> None:
        self.place = TwoEnded(len(order))
        self.count = 0
        self.sigma = 0.0

    def step(self, gram: Tensor, indices: list[int]) -> Update:
        b = len(indices)
        g = gram.tolist()
        mrow = g[b + M]
        mm = mrow[b + M]
        rm = mrow[:b]  # <x_i, m>
        # <s, x_i - m> with s = u - sigma m, and the centered Gram, in plain floats
        sig = self.sigma
        um = g[b + U][b + M]
        al = [g[i][b + U] - sig * rm[i] - um + sig * mm for i in range(b)]
        sc = [1.0] * b
        if self.decider.normalize:
            sq = [g[i][i] - 2 * rm[i] + mm for i in range(b)]
            sc = [1.0 / math.sqrt(q) if q > 0 else 0.0 for q in sq]
            al = [a * c for a, c in zip(al, sc)]
        us = self.decider.uniforms(b)
        eps: list[int] = []
        greedy = not self.decider.probabilistic
        for i in range(b):
            e = (1 if al[i] < 0 else -1) if greedy else self.decider.sign(al[i], us[i])
            eps.append(e)
            if self.sequential and i + 1 < b:
                gi, base, ci = g[i], rm[i] - mm, e * sc[i]
                al[i + 1 :] = [
                    a + ci * c * (gij - base - rj)
                    for a, c, gij, rj in zip(al[i + 1 :], sc[i + 1 :], gi[i + 1 : b], rm[i + 1 :])
                ]
        for i, e in zip(indices, eps):
            self.place.put(i, e)
        w = [e * c for e, c in zip(eps, sc)]
        wx = torch.tensor([w, [1.0] * b], dtype=torch.float64)
        self.count += b
        self.sigma += sum(w)  # s += sum_i w_i (x_i - m): u += sum_i w_i x_i, sigma += sum_i w_i
        return [U, T], wx, []

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
        return {"place": self.place.state(), "count": self.count, "sigma": self.sigma}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.place.load(state["place"])
        self.count = int(state["count"])
        self.sigma = float(state["sigma"])
