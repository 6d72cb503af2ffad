"""Pair balance (Lu et al., 2022; Cooper et al., 2023).

Consecutive examples of the epoch are paired and the *difference* of their
gradients is balanced against a running sum: no stale mean is needed. For
``eps = +1`` the first of the pair goes to the front of the next order and the
second to the back; for ``-1`` the other way round. A batch of odd size leaves
its last example waiting (stored vector ``cache``) for the first of the next
batch; an example still waiting at the end of the epoch (odd ``n``) keeps the
middle place of the next order.

Reference:
    A. F. Cooper, W. Guo, K. Pham, T. Yuan, C. Ruan, Y. Lu, C. De Sa.
    Coordinating Distributed Example Orders for Provably Accelerated Training.
    NeurIPS 2023.
"""

from __future__ import annotations

import math
from operator import mul
from typing import Any

import torch
from torch import Tensor

from grabsampler.balance.base import Balancer, Gram, TwoEnded, Update

__all__ = ["PairBalance", "pair_up"]

S, CACHE = 0, 1


def pair_up(seq: list[int]) -> tuple[list[tuple[int, int]], int | None]:
    """Splits ``seq`` into consecutive pairs and the leftover element (or None)."""
    pairs = [(seq[i], seq[i + 1]) for i in range(0, len(seq) - 1, 2)]
    return pairs, (seq[-1] if len(seq) % 2 else None)


class PairBalance(Balancer):
    """Greedy balancing of differences of consecutive gradients."""

    name = "pair"
    host_gram = True
    #: ``step`` reads <cache, s> and <cache, cache> of the stored vectors, never <s, s>
    stored_reads = ((CACHE, S), (CACHE, CACHE))

    def __init__(self, n: int, decider: Any) -> None:
        super().__init__(n, decider)
        self.place = TwoEnded(n)
        self.cache_index = -1

    def aux_rows(self, batch_size: int) -> int:
        return 2

    def start_epoch(self, order: list[int]) -> None:
        self.place = TwoEnded(len(order))
        self.cache_index = -1

    def step(self, gram: Gram, indices: list[int]) -> Update:
        b = len(indices)
        g = gram if isinstance(gram, list) else gram.tolist()
        has_cache = self.cache_index >= 0
        if not (has_cache or self.decider.probabilistic or self.decider.normalize):
            return self._greedy_step(g, indices)
        rows = ([b + CACHE] if has_cache else []) + list(range(b))
        ids = ([self.cache_index] if has_cache else []) + list(indices)
        pairs, left = pair_up(list(range(len(rows))))
        ru = [rows[u] for u, _ in pairs]
        rv = [rows[v] for _, v in pairs]
        sr = b + S
        npairs = len(pairs)
        normalize = self.decider.normalize
        sc = [1.0] * npairs
        if normalize:
            sq = [g[u][u] - 2 * g[u][v] + g[v][v] for u, v in zip(ru, rv)]
            sc = [1.0 / math.sqrt(q) if q > 0 else 0.0 for q in sq]
        us = self.decider.uniforms(npairs)
        # y: the balanced sum of this batch so far, as coefficients of the rows;
        # <y, x_u - x_v> = sum_r y_r (<x_r, x_u> - <x_r, x_v>)
        y = [0.0] * len(g)
        eps: list[int] = []
        for k, (u, v) in enumerate(zip(ru, rv)):
            gu, gv = g[u], g[v]
            dot = gu[sr] - gv[sr]
            if k:
                dot += sum(map(mul, y, gu)) - sum(map(mul, y, gv))
            if normalize:
                dot *= sc[k]
            e = self.decider.sign(dot, us[k] if us else None)
            eps.append(e)
            w = e * sc[k]
            y[u] += w
            y[v] -= w
        for (u, v), e in zip(pairs, eps):
            self.place.put(ids[u], e)
            self.place.put(ids[v], -e)
        wx = [y[:b], [0.0] * b]
        terms: list[tuple[int, int, float]] = []
        if has_cache and y[b + CACHE] != 0.0:
            terms.append((0, CACHE, y[b + CACHE]))
        if has_cache:
            terms.append((1, CACHE, -1.0))
        if left is not None:
            wx[1][rows[left]] = 1.0
            self.cache_index = ids[left]
        else:
            self.cache_index = -1
        return [S, CACHE], wx, terms

    def _greedy_step(self, g: list[list[float]], indices: list[int]) -> Update:
        """The loop of :meth:`step` for greedy, unnormalized signs and no waiting example.

        The same arithmetic in the same order; the weights list grows with the
        decided pairs (the products with the undecided rows were zeros). With no
        waiting example the stored ``cache`` vector is zero (a waiting example
        is subtracted from it when it is paired), so an even batch changes only ``s``.
        """
        b = len(indices)
        sr = b + S
        y: list[float] = []
        ids: list[int] = []
        signs: list[int] = []
        for u in range(0, b - 1, 2):
            gu, gv = g[u], g[u + 1]
            dot = gu[sr] - gv[sr]
            if u:
                dot += sum(map(mul, y, gu)) - sum(map(mul, y, gv))
            ids += indices[u : u + 2]
            if dot < 0:
                signs += (1, -1)
                y += (1.0, -1.0)
            else:
                signs += (-1, 1)
                y += (-1.0, 1.0)
        self.place.put_many(ids, signs)
        if not b % 2:
            # the waiting-example vector is zero here and stays zero: update ``s`` only
            # (one row: the update pass over wide gradients writes half as much)
            return [S], [y], []
        y.append(0.0)
        cache = [0.0] * b
        cache[b - 1] = 1.0
        self.cache_index = indices[b - 1]
        return [S, CACHE], [y, cache], []

    def diff_ready(self, batch_size: int) -> bool:
        """Whether :meth:`diff_step` can balance the next batch (greedy, unnormalized
        signs, no waiting example, an even batch)."""
        return (
            batch_size > 0
            and not batch_size % 2
            and self.cache_index < 0
            and not (self.decider.probabilistic or self.decider.normalize)
        )

    def diff_step(self, dm: list[list[float]], indices: list[int]) -> Update:
        """:meth:`step` from the pair differences' own inner products.

        ``dm[p]`` holds ``<d_p, d_q>`` for the differences ``d_p = x_{2p} - x_{2p+1}``
        of the batch and, in column ``P``, ``<d_p, s>``; then
        ``<s + sum_{q<p} eps_q d_q, d_p> = <s, d_p> + sum_{q<p} eps_q <d_q, d_p>``.
        Only for batches where :meth:`diff_ready` holds.
        """
        npairs = len(dm)
        eps: list[float] = []
        for row in dm:
            dot = row[npairs] + sum(map(mul, eps, row))
            eps.append(1.0 if dot < 0 else -1.0)
        signs: list[int] = []
        y: list[float] = []
        for e in eps:
            signs += (1, -1) if e > 0 else (-1, 1)
            y += (e, -e)
        self.place.put_many(indices, signs)
        return [S], [y], []

    def end_epoch(self, unvisited: list[int]) -> tuple[list[int], Tensor]:
        middle = ([self.cache_index] if self.cache_index >= 0 else []) + unvisited
        order = self.place.finish(middle)
        self.cache_index = -1
        return order, torch.zeros(2, 2, dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return {"place": self.place.state(), "cache_index": self.cache_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.place.load(state["place"])
        self.cache_index = int(state["cache_index"])
