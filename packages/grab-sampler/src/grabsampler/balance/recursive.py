"""Recursive balance: herding by repeated halving along a binary tree.

Every example (centered by the stale mean, as in mean balance) walks down a
complete binary tree of ``depth`` levels. Each node keeps its own running sum
and balances the examples that reach it; ``+1`` sends the example to the left
child, ``-1`` to the right. At the last level the sign decides whether the
example joins the node's positives (in arrival order) or its negatives
(reverse arrival order). The next order lists the last-level nodes from left
to right, each as positives then negatives. Stored vectors: ``2^depth - 1``
node sums, the stale mean and this epoch's gradient sum.

Reference:
    N. Harvey, S. Samadi. Near-Optimal Herding. COLT 2014 (halving idea);
    the ``recursive`` sorter of the original grab-sampler release.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from grabsampler.balance.base import Balancer, Decider, Gram, Update, gram_tensor, split_delta

__all__ = ["RecursiveBalance"]


class RecursiveBalance(Balancer):
    """Tree of running sums; an example's sign path decides its place.

    Args:
        n: number of examples.
        decider: the sign rule.
        depth: number of balancing levels (``>= 1``).
    """

    name = "recursive"
    passive = 1

    def __init__(self, n: int, decider: Decider, depth: int = 4) -> None:
        super().__init__(n, decider)
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        self.nodes = 2**depth - 1
        self.first_leaf = 2 ** (depth - 1) - 1
        self.m = self.nodes
        self.t = self.nodes + 1
        self._reset_leaves()
        self.count = 0

    def _reset_leaves(self) -> None:
        width = 2 ** (self.depth - 1)
        self.pos: list[list[int]] = [[] for _ in range(width)]
        self.neg: list[list[int]] = [[] for _ in range(width)]

    def aux_rows(self, batch_size: int) -> int:
        return self.nodes + 2

    def start_epoch(self, order: list[int]) -> None:
        self._reset_leaves()
        self.count = 0

    def step(self, gram_in: Gram, indices: list[int]) -> Update:
        gram = gram_tensor(gram_in)
        b = len(indices)
        k = self.nodes + 2
        if gram.shape[0] < b + k:  # the passive row is not part of the Gram matrix
            pad = b + k - gram.shape[0]
            gram = torch.nn.functional.pad(gram, (0, pad, 0, pad))
        coef = torch.zeros(b, b + k, dtype=torch.float64)
        coef[:, :b] = torch.eye(b, dtype=torch.float64)
        coef[:, b + self.m] = -1.0
        cg = coef @ gram
        vv = cg @ coef.T  # centered Gram (B, B)
        diag = torch.diagonal(vv)
        sc = self.decider.scales(diag) if self.decider.normalize else torch.ones_like(diag)
        a = (cg[:, b : b + self.nodes] * sc[:, None]).tolist()  # <s_v, c_i> / ||c_i||
        v = (vv * sc[:, None] * sc[None, :]).tolist()
        us = self.decider.uniforms(b * self.depth)
        visits: dict[int, list[tuple[int, int]]] = {}
        for i in range(b):
            node = 0
            e = 1
            for level in range(self.depth):
                dot = a[i][node]
                for j, ej in visits.get(node, []):
                    dot += ej * v[j][i]
                e = self.decider.sign(dot, us[i * self.depth + level] if us else None)
                visits.setdefault(node, []).append((i, e))
                if level < self.depth - 1:
                    node = 2 * node + 1 if e > 0 else 2 * node + 2
            leaf = node - self.first_leaf
            if e > 0:
                self.pos[leaf].append(indices[i])
            else:
                self.neg[leaf].append(indices[i])
        delta = torch.zeros(k, b + k, dtype=torch.float64)
        scl = sc.tolist()
        for node, lst in visits.items():
            for j, ej in lst:
                delta[node] += (ej * scl[j]) * coef[j]
        delta[self.t, :b] = 1.0
        self.count += b
        return split_delta(delta, b)

    def end_epoch(self, unvisited: list[int]) -> tuple[list[int], Tensor]:
        order: list[int] = []
        for p, q in zip(self.pos, self.neg):
            order.extend(p)
            order.extend(reversed(q))
        order.extend(unvisited)
        k = self.nodes + 2
        mat = torch.zeros(k, k, dtype=torch.float64)
        if self.count > 0:
            mat[self.m, self.t] = 1.0 / self.count
        else:
            mat[self.m, self.m] = 1.0
        self._reset_leaves()
        self.count = 0
        return order, mat

    def state_dict(self) -> dict[str, Any]:
        return {
            "pos": [torch.tensor(p, dtype=torch.int64) for p in self.pos],
            "neg": [torch.tensor(q, dtype=torch.int64) for q in self.neg],
            "count": self.count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pos = [[int(x) for x in p.tolist()] for p in state["pos"]]
        self.neg = [[int(x) for x in q.tolist()] for q in state["neg"]]
        self.count = int(state["count"])
