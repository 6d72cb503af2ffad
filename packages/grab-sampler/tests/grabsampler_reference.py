"""Straightforward one-example-at-a-time reference implementations (for tests only)."""

from __future__ import annotations

import torch
from torch import Tensor


class Sign:
    """Greedy or self-balancing-walk sign, drawing one uniform per decision."""

    def __init__(self, probabilistic: bool = False, c: float = 30.0, gen=None, normalize=None):
        self.prob = probabilistic
        self.c = c
        self.gen = gen
        self.normalize = probabilistic if normalize is None else normalize

    def vec(self, v: Tensor) -> Tensor:
        if self.normalize:
            nrm = v.norm()
            return v / nrm if nrm > 0 else torch.zeros_like(v)
        return v

    def __call__(self, s: Tensor, v: Tensor) -> int:
        dot = float(s @ v)
        if not self.prob:
            return 1 if dot < 0 else -1
        u = float(torch.rand(1, generator=self.gen, dtype=torch.float64))
        p = min(1.0, max(0.0, 0.5 - dot / (2 * self.c)))
        return 1 if u < p else -1


def ref_mean_epoch(order, grad, m, sign, batch=None, parallel=False):
    """One epoch of mean (or batch) balance; returns (next order, next stale mean)."""
    n = len(order)
    s = torch.zeros_like(m)
    left, right = [], []
    total = torch.zeros_like(m)
    batch = batch or n
    for start in range(0, n, batch):
        chunk = order[start : start + batch]
        s0 = s.clone()
        for idx in chunk:
            g = grad(idx)
            total += g
            c = sign.vec(g - m)
            e = sign(s0 if parallel else s, c)
            s = s + e * c
            (left if e > 0 else right).append(idx)
    return left + right[::-1], total / n


def ref_pair_epoch(order, grad, sign):
    s = None
    left, right = [], []
    for k in range(0, len(order) - 1, 2):
        a, b = order[k], order[k + 1]
        dv = sign.vec(grad(a) - grad(b))
        if s is None:
            s = torch.zeros_like(dv)
        e = sign(s, dv)
        s = s + e * dv
        if e > 0:
            left.append(a)
            right.append(b)
        else:
            left.append(b)
            right.append(a)
    middle = [order[-1]] if len(order) % 2 else []
    return left + middle + right[::-1]


def ref_recursive_epoch(order, grad, m, sign, depth):
    nodes = [torch.zeros_like(m) for _ in range(2**depth - 1)]
    width = 2 ** (depth - 1)
    pos = [[] for _ in range(width)]
    neg = [[] for _ in range(width)]
    total = torch.zeros_like(m)
    for idx in order:
        g = grad(idx)
        total += g
        c = sign.vec(g - m)
        node = 0
        for level in range(depth):
            e = sign(nodes[node], c)
            nodes[node] = nodes[node] + e * c
            if level < depth - 1:
                node = 2 * node + 1 if e > 0 else 2 * node + 2
        leaf = node - (width - 1)
        (pos[leaf] if e > 0 else neg[leaf]).append(idx)
    out = []
    for p, q in zip(pos, neg):
        out += p + q[::-1]
    return out, total / len(order)


def ref_recursive_pair_epoch(order, grad, sign, batch):
    sums: dict[int, Tensor] = {}
    batches = []

    def rec(items, node):
        if len(items) <= 1:
            return items
        lo, hi = [], []
        for k in range(0, len(items) - 1, 2):
            a, b = items[k], items[k + 1]
            dv = sign.vec(grad(a) - grad(b))
            s = sums.setdefault(node, torch.zeros_like(dv))
            e = sign(s, dv)
            sums[node] = s + e * dv
            lo.append(a if e > 0 else b)
            hi.append(b if e > 0 else a)
        if len(items) % 2:
            lo.append(items[-1])
        return rec(lo, 2 * node + 1) + rec(hi, 2 * node + 2)

    for start in range(0, len(order), batch):
        batches.append(rec(list(order[start : start + batch]), 0))
    out = []
    width = max(len(b) for b in batches)
    for slot in range(width):
        seq = batches if slot % 2 == 0 else batches[::-1]
        out += [b[slot] for b in seq if len(b) > slot]
    return out
