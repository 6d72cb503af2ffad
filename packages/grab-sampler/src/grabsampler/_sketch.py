"""Seeded Kronecker sketch of per-example layer gradients (hooks mode, opt-in).

A linear layer's per-example gradient is ``G_i = sum_t g_{i,t} a_{i,t}^T``
(``O x I``). The sketch keeps, per layer, two Gaussian matrices ``S_out``
(``k x O``) and ``S_in`` (``k x I``) with entries of variance ``1/k``, drawn
once from a seeded generator, and replaces ``G_i`` by the ``k x k`` matrix

    ``sk(G_i) = S_out G_i S_in^T = sum_t (S_out g_{i,t}) (S_in a_{i,t})^T``

formed from the sketched factors, never from ``G_i``. Since ``S_out`` and
``S_in`` are independent and ``E[S^T S] = I``, inner products are unbiased:
``E <sk(G_i), sk(G_j)> = sum_{t,u} <a_{i,t}, a_{j,u}> <g_{i,t}, g_{j,u}> =
<G_i, G_j>``. A side of at most ``k`` entries is not sketched (identity, exact).
Balancing then runs on ``k^2``-entry vectors per layer, so its cost no longer
grows with the layer's size; the orders are approximate (they balance the
sketched gradients), and they are a function of the seed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["KronSketch"]


class KronSketch:
    """Per-layer seeded Gaussian sketch matrices.

    Args:
        dim: sketch size ``k`` of each side (a side with at most ``k`` entries
            is kept exactly).
        seed: seed of the matrices (the same seed gives the same sketch).

    Raises:
        ValueError: ``dim`` is not a positive integer.
    """

    def __init__(self, dim: int, seed: int = 0) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"sketch_dim must be a positive integer, got {dim!r}")
        self.dim = dim
        self.seed = int(seed)
        self._mats: dict[tuple[int, int, int, torch.dtype, torch.device], Tensor] = {}

    def size(self, n: int) -> int:
        """Entries of a side of ``n`` entries after sketching."""
        return min(int(n), self.dim)

    def matrix(self, layer: int, side: int, n: int, like: Tensor) -> Tensor | None:
        """``S`` (``k x n``) of side ``side`` (0: out, 1: in) of ``layer``, or None if ``n <= k``.

        Drawn in float64 from a generator seeded with ``(seed, layer, side)``
        and cached in the dtype and on the device of ``like``.
        """
        if n <= self.dim:
            return None
        key = (layer, side, n, like.dtype, like.device)
        s = self._mats.get(key)
        if s is None:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + 2 * layer + side) % 2**63)
            s64 = torch.randn(self.dim, n, generator=gen, dtype=torch.float64)
            s = (s64 / math.sqrt(self.dim)).to(dtype=like.dtype, device=like.device)
            self._mats[key] = s
        return s

    def factors(self, layer: int, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """Sketched factors ``(S_in a, S_out g)`` of ``a`` (B, T, I) and ``g`` (B, T, O)."""
        s_in = self.matrix(layer, 1, int(a.shape[-1]), a)
        s_out = self.matrix(layer, 0, int(g.shape[-1]), g)
        if s_in is not None:
            a = a @ s_in.T
        if s_out is not None:
            g = g @ s_out.T
        return a, g

    def rows(self, layer: int, a: Tensor, g: Tensor, groups: int = 1) -> Tensor:
        """The ``(B, groups * k_out * k_in)`` sketched per-example gradients of a layer.

        ``a`` (B, T, I) and ``g`` (B, T, O) are the layer's inputs and (per-example
        scaled) output gradients; for ``groups > 1`` group ``j`` connects input
        columns ``j*I/G..`` to output columns ``j*O/G..`` and every group is
        sketched with the same pair of matrices.
        """
        b = int(a.shape[0])
        ci, co = int(a.shape[2]) // groups, int(g.shape[2]) // groups
        parts = []
        for j in range(groups):
            aj = a[:, :, j * ci : (j + 1) * ci] if groups > 1 else a
            gj = g[:, :, j * co : (j + 1) * co] if groups > 1 else g
            sa, sg = self.factors(layer, aj, gj)
            if sa.shape[1] == 1:  # one position: an outer product per example
                parts.append((sg[:, 0, :, None] * sa[:, 0, None, :]).reshape(b, -1))
            else:
                parts.append(torch.einsum("bto,bti->boi", sg, sa).reshape(b, -1))
        return parts[0] if groups == 1 else torch.cat(parts, dim=1)

    def embedding_rows(self, layer: int, idx: Tensor, g: Tensor, num: int) -> Tensor:
        """Sketched per-example gradients ``(B, k_num * k_dim)`` of an embedding table.

        The table's gradient is ``sum_t e_{idx_t} g_t^T`` (``num x dim``): its
        "out" factor is the one-hot index, so ``S_out e_idx`` is a column of ``S_out``.
        """
        b = int(g.shape[0])
        s_num = self.matrix(layer, 0, num, g)
        if s_num is None:
            fo = torch.nn.functional.one_hot(idx, num).to(g.dtype)
        else:
            fo = s_num.T[idx]  # (B, T, k)
        s_dim = self.matrix(layer, 1, int(g.shape[-1]), g)
        fi = g @ s_dim.T if s_dim is not None else g
        return torch.einsum("bto,bti->boi", fo, fi).reshape(b, -1)
