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

from eigenpro3.kernels import KernelFn, RadialKernel

__all__ = [
    "CenterSet",
    "chunked_kernel_matmul",
    "default_memory_bytes",
    "rows_for_budget",
    "times",
]

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


def times(block: Tensor, w_t: Tensor) -> Tensor:
    """``block @ w`` for a wide (r, p) block and ``w_t = w^T`` (c, p), as an (r, c) view.

    With few outputs ``c``, ``w^T @ block^T`` runs several times faster on CPU
    than ``block @ w`` (the long dimension stays contiguous in the product).
    """
    return torch.mm(w_t, block.T).T


def chunked_kernel_matmul(
    kernel_fn: KernelFn, x: Tensor, z: Tensor, w: Tensor, *, budget: int
) -> Tensor:
    """``K(x, z) @ w`` evaluated in row chunks of ``x`` fitting ``budget`` bytes."""
    rows = rows_for_budget(z.shape[0], x.element_size(), budget)
    out = torch.empty(x.shape[0], w.shape[1], dtype=w.dtype, device=w.device)
    w_t = w.T.contiguous()
    if isinstance(kernel_fn, RadialKernel):
        zp = kernel_fn.prepare(z)
        work = torch.empty(min(rows, x.shape[0]), z.shape[0], dtype=x.dtype, device=x.device)
        for start in range(0, x.shape[0], rows):
            xs = x[start : start + rows]
            block = kernel_fn.block(xs, zp, out=work[: len(xs)])
            out[start : start + rows] = times(block, w_t)
        return out
    for start in range(0, x.shape[0], rows):
        block = kernel_fn(x[start : start + rows], z)
        out[start : start + rows] = times(block, w_t)
    return out


class CenterSet:
    """Model centers sharded over devices, with chunked kernel products.

    For a :class:`~eigenpro3.kernels.RadialKernel` the centers are kept in the
    kernel's prepared (augmented, transposed) form and every block is written
    into one preallocated work buffer per shard (no (rows x p) allocation per
    batch); any other callable is simply called on each chunk.

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
        self._radial = isinstance(kernel_fn, RadialKernel)
        self._prepared = (
            [kernel_fn.prepare(s) for s in self.shards]
            if isinstance(kernel_fn, RadialKernel)
            else []
        )
        self._work: list[Tensor | None] = [None] * len(self.shards)
        self.cache: list[Tensor] | None = None
        if cache:
            full = centers
            self.cache = []
            rows = rows_for_budget(self.p, full.element_size(), budget)
            for k, dev in enumerate(self.devices):
                block = torch.empty(self.p, self.shards[k].shape[0], dtype=self.dtype, device=dev)
                for s in range(0, self.p, rows):
                    self.block(full[s : s + rows].to(dev), k, out=block[s : s + rows])
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

    def split_t(self, w: Tensor) -> list[Tensor]:
        """Like :meth:`split`, transposed: contiguous (c, p_k) pieces for :func:`times`."""
        return [piece.T.contiguous() for piece in self.split(w)]

    def _rows(self) -> int:
        return rows_for_budget(
            self.p, torch.tensor([], dtype=self.dtype).element_size(), self.budget
        )

    def block(self, x: Tensor, k: int, out: Tensor | None = None) -> Tensor:
        """``K(x, Z_k)`` for shard ``k`` (``x`` on its device), into the work buffer.

        The result of a call without ``out`` is overwritten by the next call.
        """
        if not self._radial:
            block = self.kernel_fn(x, self.shards[k])
            if out is not None:
                out.copy_(block)
                return out
            return block
        kernel = self.kernel_fn
        assert isinstance(kernel, RadialKernel)
        if out is None:
            work = self._work[k]
            if work is None or work.shape[0] < x.shape[0]:
                shape = (x.shape[0], self.shards[k].shape[0])
                work = torch.empty(shape, dtype=self.dtype, device=x.device)
                self._work[k] = work
            out = work[: x.shape[0]]
        return kernel.block(x, self._prepared[k], out=out)

    def matmul(self, x: Tensor, w: Tensor) -> Tensor:
        """``K(x, Z) @ w`` for (n, d) ``x`` and (p, c) ``w``; result on the main device."""
        ws = self.split_t(w)
        out = torch.zeros(x.shape[0], w.shape[1], dtype=w.dtype, device=self.main)
        rows = self._rows()
        for s in range(0, x.shape[0], rows):
            xs = x[s : s + rows]
            for k, (wk, dev) in enumerate(zip(ws, self.devices, strict=True)):
                out[s : s + rows] += times(self.block(xs.to(dev), k), wk).to(self.main)
        return out

    def cached_matmul(self, rows: slice, w: Tensor) -> Tensor:
        """``K(Z[rows], Z) @ w`` from the cache if present, else recomputed."""
        if self.cache is None:
            return self.matmul(self.centers[rows], w)
        ws = self.split_t(w)
        out = times(self.cache[0][rows], ws[0]).to(self.main)
        for block, wk in zip(self.cache[1:], ws[1:], strict=True):
            out += times(block[rows], wk).to(self.main)
        return out

    def residual_step(
        self,
        x: Tensor,
        w: Tensor,
        residual_fn: Callable[[Tensor, slice], Tensor],
        out_cols: int | None = None,
    ) -> Tensor:
        """Fused pass: ``r = residual_fn(K(x, Z) @ w, rows)``, return ``K(Z, x) @ r`` (p, c).

        ``residual_fn`` receives the predictions of a row chunk and the slice of
        rows it covers and returns the residuals of that chunk (``out_cols``
        columns, default those of ``w``). Each kernel block is evaluated once and
        used for both products.
        """
        ws = self.split_t(w)
        cols = w.shape[1] if out_cols is None else out_cols
        grads_t = [torch.zeros(cols, wk.shape[1], dtype=w.dtype, device=wk.device) for wk in ws]
        rows = self._rows()
        for s in range(0, x.shape[0], rows):
            sl = slice(s, min(s + rows, x.shape[0]))
            xs = x[sl]
            # one work buffer per shard: the blocks of all shards coexist
            blocks = [self.block(xs.to(dev), k) for k, dev in enumerate(self.devices)]
            pred = times(blocks[0], ws[0]).to(self.main)
            for block, wk in zip(blocks[1:], ws[1:], strict=True):
                pred += times(block, wk).to(self.main)
            r = residual_fn(pred, sl)
            for block, g, dev in zip(blocks, grads_t, self.devices, strict=True):
                g.addmm_(r.T.to(dev).contiguous(), block)
        return torch.cat([g.T.to(self.main) for g in grads_t])
