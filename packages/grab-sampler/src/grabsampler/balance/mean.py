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
from operator import mul
from typing import Any

import torch
from torch import Tensor

from grabsampler.balance.base import Balancer, Gram, TwoEnded, Update

__all__ = ["MeanBalance"]

M, U, T = 0, 1, 2  # stale mean, signed sum u (in inner products); next-mean sum (update only)


class MeanBalance(Balancer):
    """Greedy balancing of stale-mean-centered gradients."""

    name = "mean"
    sequential = True
    host_gram = True

    def __init__(self, n: int, decider: Any) -> None:
        super().__init__(n, decider)
        self.place = TwoEnded(n)
        self.count = 0
        self.sigma = 0.0

    passive = 1
    #: ``step`` reads <m, m> and <u, m> of the stored vectors, never <u, u>
    stored_reads = ((M, M), (U, M))

    def aux_rows(self, batch_size: int) -> int:
        return 3

    def start_epoch(self, order: list[int]) -> None:
        self.place = TwoEnded(len(order))
        self.count = 0
        self.sigma = 0.0

    def step(self, gram: Gram, indices: list[int]) -> Update:
        b = len(indices)
        g = gram if isinstance(gram, list) else gram.tolist()
        mrow, urow = g[b + M], g[b + U]
        mm, um = mrow[b + M], urow[b + M]
        rm = mrow[:b]  # <x_i, m>
        # <s, c_i> with s = u - sigma m and c_i = x_i - m
        sig = self.sigma
        normalize = self.decider.normalize
        if not (normalize or self.decider.probabilistic) and self.sequential:
            return self._greedy_step(g, indices, urow, rm, mm, um)
        a0 = [r - sig * q - um + sig * mm for r, q in zip(urow[:b], rm)]
        sc = [1.0] * b
        if normalize:
            sq = [g[i][i] - 2 * rm[i] + mm for i in range(b)]
            sc = [1.0 / math.sqrt(q) if q > 0 else 0.0 for q in sq]
        greedy = not self.decider.probabilistic
        sequential = self.sequential
        us = self.decider.uniforms(b)
        # w: weights of this batch's (centered) examples in the running sum so far;
        # <sum_i w_i c_i, c_j> = sum_i w_i <x_i, x_j> - sum_i w_i <x_i, m>
        #                        - (sum_i w_i) (<x_j, m> - <m, m>)
        w = [0.0] * b
        eps = [0] * b
        wsum = wm = 0.0
        for j in range(b):
            dot = a0[j]
            if sequential and j:
                dot += sum(map(mul, w, g[j])) - wm - wsum * (rm[j] - mm)
            if normalize:
                dot *= sc[j]
            e = (1 if dot < 0 else -1) if greedy else self.decider.sign(dot, us[j])
            eps[j] = e
            wj = e * sc[j]
            w[j] = wj
            wsum += wj
            wm += wj * rm[j]
        self.place.put_many(indices, eps)
        self.count += b
        self.sigma += wsum  # s += sum_i w_i (x_i - m): u += sum_i w_i x_i, sigma += sum_i w_i
        return [U, T], [w, [1.0] * b], []

    def _greedy_step(
        self,
        g: list[list[float]],
        indices: list[int],
        urow: list[float],
        rm: list[float],
        mm: float,
        um: float,
    ) -> Update:
        """The loop of :meth:`step` for greedy, unnormalized, sequential signs.

        The same arithmetic in the same order; the weights list grows with the
        decided examples (the products with the undecided ones were zeros).
        """
        b = len(indices)
        sig = self.sigma
        smm = sig * mm
        w: list[float] = []
        front: list[int] = []
        back: list[int] = []
        wsum = wm = 0.0
        for j, i in enumerate(indices):
            rj = rm[j]
            dot = urow[j] - sig * rj - um + smm  # <s, c_j> before this batch
            if j:
                dot += sum(map(mul, w, g[j])) - wm - wsum * (rj - mm)
            if dot < 0:
                front.append(i)
                w.append(1.0)
                wsum += 1.0
                wm += rj
            else:
                back.append(i)
                w.append(-1.0)
                wsum -= 1.0
                wm -= rj
        self.place.put_split(front, back)
        self.count += b
        self.sigma += wsum
        return [U, T], [w, [1.0] * b], []

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
