"""Recursive pair balance: pair balance applied recursively inside every batch.

Within a batch the rows are paired in order and the pair differences are
balanced against the running sum of tree node 0; the ``+``-members of the
pairs form the left half, the others the right half (an unpaired last row
joins the left half), and both halves are balanced again at nodes ``2v+1`` and
``2v+2`` until single rows remain. This gives each row of the batch a *slot*
``0..B-1``. The next order takes slot 0 of every batch (in batch order), then
slot 1 (in reverse batch order), slot 2 (batch order), and so on. Node sums
are the only stored vectors (``2^ceil(log2 B) - 1`` of them).

Reference:
    the ``recursive-pair`` sorter of the original grab-sampler release, here
    without its power-of-two batch size and ``B | n`` restrictions.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from grabsampler.balance.base import Balancer, Gram, Update, gram_tensor, split_delta
from grabsampler.balance.pair import pair_up

__all__ = ["RecursivePairBalance"]


class RecursivePairBalance(Balancer):
    """Batch-local recursive halving by pair balance with persistent node sums."""

    name = "recursive_pair"

    def __init__(self, n: int, decider: Any) -> None:
        super().__init__(n, decider)
        self.batches: list[list[int]] = []
        self.k = 0

    def aux_rows(self, batch_size: int) -> int:
        need = 2 ** max(0, math.ceil(math.log2(max(batch_size, 1)))) - 1
        self.k = max(self.k, need)
        return self.k

    def start_epoch(self, order: list[int]) -> None:
        self.batches = []

    def step(self, gram_in: Gram, indices: list[int]) -> Update:
        gram = gram_tensor(gram_in)
        b = len(indices)
        k = gram.shape[0] - b
        delta = torch.zeros(k, b + k, dtype=torch.float64)

        def rec(rows: list[int], node: int) -> list[int]:
            if len(rows) <= 1:
                return rows
            pairs, left = pair_up(rows)
            coef = torch.zeros(len(pairs), b + k, dtype=torch.float64)
            for p, (u, v) in enumerate(pairs):
                coef[p, u] = 1.0
                coef[p, v] = -1.0
            s = torch.zeros(b + k, dtype=torch.float64)
            s[b + node] = 1.0
            eps, coef = self.decider.walk(coef, gram, s)
            delta[node] += torch.tensor(eps, dtype=torch.float64) @ coef
            lo = [u if e > 0 else v for (u, v), e in zip(pairs, eps)]
            hi = [v if e > 0 else u for (u, v), e in zip(pairs, eps)]
            if left is not None:
                lo.append(left)
            return rec(lo, 2 * node + 1) + rec(hi, 2 * node + 2)

        slots = rec(list(range(b)), 0)
        self.batches.append([indices[r] for r in slots])
        return split_delta(delta, b)

    def end_epoch(self, unvisited: list[int]) -> tuple[list[int], Tensor]:
        order: list[int] = []
        width = max((len(x) for x in self.batches), default=0)
        for slot in range(width):
            seq = self.batches if slot % 2 == 0 else list(reversed(self.batches))
            order.extend(batch[slot] for batch in seq if len(batch) > slot)
        order.extend(unvisited)
        self.batches = []
        return order, torch.zeros(self.k, self.k, dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return {"batches": [torch.tensor(x, dtype=torch.int64) for x in self.batches], "k": self.k}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = [[int(v) for v in x.tolist()] for x in state["batches"]]
        self.k = int(state["k"])
