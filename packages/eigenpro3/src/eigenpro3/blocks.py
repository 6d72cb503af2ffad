"""Kernel blocks computed in row chunks sized to a memory budget.

:class:`CenterSet` holds the model centers ``Z`` split into shards, one per
device, and evaluates products with the kernel matrix against them without
ever forming more than one (rows x p) block at a time:

* ``matmul(X, W)``         = ``K(X, Z) @ W``
* ``residual_step(X, ...)`` = the fused batch pass of EigenPro: predictions
  ``K(X, Z) @ W``, residuals, and the gradient ``K(Z, X) @ r`` from the same
  block (the block is evaluated once).

When the budget allows, the p x p matrix ``K(Z, Z)`` is cached column-sharded
(``K(Z, Z_k)`` on the device of shard ``k``) for the inner projection solves.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from eigenpro3.kernels import KernelFn

__all__ = ["CenterSet", "chunked_kernel_matmul", "default_memory_bytes", "rows_for_budget"]

_MAX_ROWS = 8192


def default_memory_bytes() -> int:
    """A quarter of the machine's physical memory, capped at 8 GiB."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 16 * 2**30
    return int(min(total // 4, 8 * 2**30))


def rows_for_budget(n_cols: int, itemsize: int, budget: int, *, what: str = "kernel block") -> int:
    """Rows of an (rows x n_cols) block (plus one temporary of that size) fitting ``budget``.

    Raises:
        ValueError: naming ``memory_gb`` when not even one row fits.
    """
    per_row = 2 * max(n_cols, 1) * itemsize
    rows = int(budget // per_row)
    if rows < 1:
        raise ValueError(
            f"memory_gb is too small: one row of the {what} needs {per_row} bytes "
            f"but only {max(budget, 0)} bytes are left in the budget"
        )
    return min(rows, _MAX_ROWS)


def chunked_kernel_matmul(
    kernel_fn: KernelFn, x: Tensor, z: Tensor, w: Tensor, *, budget: int
) -> Tensor:
    """``K(x, z) @ w`` evaluated in row chunks of ``x`` fitting ``budget`` bytes."""
    rows = rows_for_budget(z.shape[0], x.element_size(), budget)
    out = torch.empty(x.shape[0], w.shape[1], dtype=w.dtype, device=w.device)
    for start in range(0, x.shape[0], rows):
        block = kernel_fn(x[start : start + rows], z)
        torch.mm(block, w, out=out[start : start + rows])
    return out


class CenterSet:
    """Model centers sharded over devices, with chunked kernel products.

    Args:
        centers: (p, d) tensor of centers.
        kernel_fn: kernel callable ``K(X, Z)``.
        devices: devices holding the shards (centers split evenly in order);
            the first one is the main device where weights and outputs live.
        budget: bytes available for one set of kernel blocks (all shards).
        cache: whether to cache ``K(Z, Z)`` (column-sharded) for the inner solves.
    """

    def __init__(
        self,
        centers: Tensor,
        kernel_fn: KernelFn,
        devices: Sequence[torch.device],
        *,
        budget: int,
        cache: bool,
    ) -> None:
        self.kernel_fn = kernel_fn
        self.devices = list(devices)
        self.main = self.devices[0]
        self.p, self.d = centers.shape
        self.dtype = centers.dtype
        self.budget = budget
        sizes = [len(c) for c in torch.arange(self.p).tensor_split(len(self.devices))]
        self.bounds: list[tuple[int, int]] = []
        start = 0
        for size in sizes:
            self.bounds.append((start, start + size))
            start += size
        self.shards = [
            centers[a:b].to(dev) for (a, b), dev in zip(self.bounds, self.devices, strict=True)
        ]
        self.cache: list[Tensor] | None = None
        if cache:
            full = centers
            self.cache = []
            for shard, dev in zip(self.shards, self.devices, strict=True):
                rows = rows_for_budget(shard.shape[0], full.element_size(), budget)
                block = torch.empty(self.p, shard.shape[0], dtype=self.dtype, device=dev)
                for s in range(0, self.p, rows):
                    block[s : s + rows] = kernel_fn(full[s : s + rows].to(dev), shard)
                self.cache.append(block)

    @property
    def centers(self) -> Tensor:
        """All centers gathered on the main device."""
        if len(self.shards) == 1 and self.shards[0].device == self.main:
            return self.shards[0]
        return torch.cat([s.to(self.main) for s in self.shards])

    def split(self, w: Tensor) -> list[Tensor]:
        """Rows of a (p, c) tensor split like the centers, each on its shard's device."""
        return [w[a:b].to(dev) for (a, b), dev in zip(self.bounds, self.devices, strict=True)]

    def _rows(self) -> int:
        return rows_for_budget(
            self.p, torch.tensor([], dtype=self.dtype).element_size(), self.budget
        )

    def matmul(self, x: Tensor, w: Tensor) -> Tensor:
        """``K(x, Z) @ w`` for (n, d) ``x`` and (p, c) ``w``; result on the main device."""
        ws = self.split(w)
        out = torch.zeros(x.shape[0], w.shape[1], dtype=w.dtype, device=self.main)
        rows = self._rows()
        for s in range(0, x.shape[0], rows):
            xs = x[s : s + rows]
            for shard, wk, dev in zip(self.shards, ws, self.devices, strict=True):
                out[s : s + rows] += (self.kernel_fn(xs.to(dev), shard) @ wk).to(self.main)
        return out

    def cached_matmul(self, rows: slice, w: Tensor) -> Tensor:
        """``K(Z[rows], Z) @ w`` from the cache if present, else recomputed."""
        if self.cache is None:
            return self.matmul(self.centers[rows], w)
        ws = self.split(w)
        out = self.cache[0][rows] @ ws[0]
        out = out.to(self.main)
        for block, wk in zip(self.cache[1:], ws[1:], strict=True):
            out += (block[rows] @ wk).to(self.main)
        return out

    def residual_step(
        self,
        x: Tensor,
        w: Tensor,
        residual_fn: Callable[[Tensor, slice], Tensor],
    ) -> Tensor:
        """Fused pass: ``r = residual_fn(K(x, Z) @ w, rows)``, return ``K(Z, x) @ r`` (p, c).

        ``residual_fn`` receives the predictions of a row chunk and the slice of
        rows it covers and returns the residuals of that chunk.
        """
        ws = self.split(w)
        grads = [torch.zeros(wk.shape, dtype=w.dtype, device=wk.device) for wk in ws]
        rows = self._rows()
        for s in range(0, x.shape[0], rows):
            sl = slice(s, min(s + rows, x.shape[0]))
            xs = x[sl]
            blocks = [
                self.kernel_fn(xs.to(dev), shard)
                for shard, dev in zip(self.shards, self.devices, strict=True)
            ]
            pred = blocks[0] @ ws[0]
            pred = pred.to(self.main)
            for block, wk in zip(blocks[1:], ws[1:], strict=True):
                pred += (block @ wk).to(self.main)
            r = residual_fn(pred, sl)
            for block, g, dev in zip(blocks, grads, self.devices, strict=True):
                g.addmm_(block.T, r.to(dev))
        return torch.cat([g.to(self.main) for g in grads])
