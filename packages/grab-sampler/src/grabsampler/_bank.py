"""Stored vectors in parameter space (running sums, stale means), one buffer per tensor.

A balancer keeps ``k`` vectors of the parameter space (``d`` entries): running
sums, the stale mean, a cached example. They are stored split by parameter
tensor, ``buffers[p]`` of shape ``(k, numel_p)``, so the extra memory is
``O(k d)`` and never ``O(B d)``.

For a batch of rows ``X`` (``B`` examples) :meth:`AuxBank.batch_gram` returns
the inner-product matrix of ``[x_1..x_B, a_1..a_k]`` in float64 on the host
(one device-to-host copy per batch). Entries between two stored vectors are
only computed for the rows a balancer asks for (``sel``); the others are 0.
After the balancer has decided its signs it returns, in the same row
coordinates, the change of every stored vector; :meth:`AuxBank.apply`
performs it with one ``(k', B) @ (B, numel_p)`` product per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from grabsampler._rows import Rows

__all__ = ["AuxBank"]


class AuxBank:
    """``k`` stored vectors of the parameter space, split by parameter tensor.

    Args:
        sizes: number of entries of each parameter tensor.
        k: number of stored vectors.
        dtype: floating dtype of the buffers.
        device: device of the buffers.
    """

    def __init__(
        self, sizes: Sequence[int], k: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.sizes = [int(s) for s in sizes]
        self.dtype = dtype
        self.device = device
        self.buffers: list[Tensor] = [torch.zeros(k, s, dtype=dtype, device=device) for s in sizes]
        self.k = k

    def grow(self, k: int) -> None:
        """Appends zero vectors so that ``k`` are stored (never shrinks)."""
        if k <= self.k:
            return
        self.buffers = [
            torch.cat([b, torch.zeros(k - self.k, b.shape[1], dtype=b.dtype, device=b.device)])
            for b in self.buffers
        ]
        self.k = k

    def check_rows(self, rows: Sequence[Rows]) -> int:
        """Checks that ``rows`` match the parameter split; returns the batch size."""
        if len(rows) != len(self.sizes):
            raise ValueError(
                f"per_sample_grads: got {len(rows)} tensors for {len(self.sizes)} trainable "
                "parameters (pass one tensor per parameter, or a single (B, d) tensor)"
            )
        for i, (r, s) in enumerate(zip(rows, self.sizes)):
            if r.numel != s:
                raise ValueError(
                    f"per_sample_grads: tensor {i} has {r.numel} entries per example, the "
                    f"trainable parameter has {s}"
                )
        b = rows[0].batch_size
        if any(r.batch_size != b for r in rows):
            raise ValueError("per_sample_grads: tensors disagree on the batch size")
        return b

    @torch.no_grad()
    def batch_gram(self, rows: Sequence[Rows], sel: Sequence[int]) -> Tensor:
        """Inner products of ``[rows; stored vectors]`` as a float64 CPU matrix.

        Args:
            rows: one :class:`~grabsampler._rows.Rows` per parameter tensor.
            sel: stored vectors whose mutual inner products are needed.

        Returns:
            ``(B + k, B + k)`` float64 tensor on the CPU.
        """
        b = rows[0].batch_size
        k = self.k
        top: Tensor | None = None
        low: Tensor | None = None
        sel_idx = list(sel)
        for r, a in zip(rows, self.buffers):
            g = r.gram()
            part = torch.cat([g, r.cross(a).to(g.dtype)], dim=1) if k else g
            part = part.to(torch.float64)
            top = part if top is None else top + part
            if sel_idx:
                s = a[sel_idx]
                ss = (s @ s.T).to(torch.float64)
                low = ss if low is None else low + ss
        assert top is not None
        full = torch.zeros(b + k, b + k, dtype=torch.float64)
        top_c = top.cpu()
        full[:b] = top_c
        full[b:, :b] = top_c[:, b:].T
        if low is not None:
            pos = torch.tensor([b + i for i in sel_idx])
            full[pos.unsqueeze(1), pos.unsqueeze(0)] = low.cpu()
        return full

    @torch.no_grad()
    def apply(self, rows: Sequence[Rows], delta: Tensor) -> None:
        """Adds ``delta @ [rows; stored vectors]`` to the stored vectors.

        Args:
            rows: the batch the deltas refer to.
            delta: ``(k, B + k)`` float64 tensor (row coordinates of :meth:`batch_gram`).
        """
        b = rows[0].batch_size
        changed = [i for i in range(self.k) if bool(delta[i].any())]
        if not changed:
            return
        dx = delta[changed, :b].to(device=self.device, dtype=self.dtype)
        da = delta[changed, b:]
        use_a = bool(da.any())
        da_dev = da.to(device=self.device, dtype=self.dtype) if use_a else None
        for r, a in zip(rows, self.buffers):
            upd = r.combine(dx).to(a.dtype)
            if da_dev is not None:
                upd = upd + da_dev @ a
            for j, i in enumerate(changed):
                a[i].add_(upd[j])

    @torch.no_grad()
    def transform(self, mat: Tensor) -> None:
        """Replaces the stored vectors by ``mat @ stored`` (``mat`` is ``(k, k)``)."""
        m = mat.to(device=self.device, dtype=self.dtype)
        for i, a in enumerate(self.buffers):
            self.buffers[i] = m @ a

    def state(self) -> list[Tensor]:
        """Copies of the buffers."""
        return [b.detach().clone() for b in self.buffers]

    def load(self, buffers: Sequence[Tensor]) -> None:
        """Restores buffers saved by :meth:`state`."""
        if len(buffers) != len(self.sizes):
            raise ValueError("state_dict: aux buffers do not match the trainable parameters")
        new = []
        for b, s in zip(buffers, self.sizes):
            if b.dim() != 2 or int(b.shape[1]) != s:
                raise ValueError("state_dict: aux buffer shape does not match the parameters")
            new.append(b.detach().to(device=self.device, dtype=self.dtype).clone())
        self.buffers = new
        self.k = int(new[0].shape[0]) if new else 0
