"""Stored vectors in parameter space (running sums, stale means), kept in blocks.

A balancer keeps ``k`` vectors of the parameter space (``d`` entries): running
sums, the stale mean, a cached example. They are stored in column blocks of
shape ``(k, n_block)``: one block per large parameter tensor and one shared
block for all small tensors (at most ``SMALL_COLS`` entries each), so the extra
memory is ``O(k d)`` and never ``O(B d)`` (the shared block holds at most
``4 * SMALL_COLS`` entries, so its per-batch copy is bounded).

For a batch of rows ``X`` (``B`` examples) :meth:`AuxBank.gram_lists` returns
the inner-product matrix of ``[x_1..x_B, a_1..a_k]`` as host floats (one
device-to-host read per batch). The shared small block lives at the bottom of
a workspace whose top rows receive the batch's small-tensor rows (a copy of at
most ``B * 4 * SMALL_COLS`` entries), so one product over the contiguous
``[batch; stored]`` rows gives its whole part of the matrix. Each large tensor
gets one ``(B, B)`` product and one ``(k, B)`` product; the ``(k, k)`` inner
products of the stored vectors are then tracked on the host (every update is
a combination of the batch rows and the old vectors, whose inner products are
all in the last matrix) and recomputed once per epoch, so weight-sized
buffers are not re-read for them. After the balancer has decided its signs it
returns the weights of the change of the stored vectors; :meth:`AuxBank.apply`
performs it with one ``(k', B) @ (B, n_block)`` product per block (chunked
for wide blocks).

When the whole bank is the one shared block (small models), the sampler's
fast path uses :meth:`AuxBank.flat_plan` / :meth:`AuxBank.flat_gram` /
:meth:`AuxBank.flat_apply`: the views of the workspace that each gradient is
copied into (one ``_foreach_copy_``), the product's output and the weight
buffer of the update are cached per batch size, so a step is one copy, one
product, one host read and one ``addmm_``. Up to ``ONE_PRODUCT_COLS`` columns
the product is the whole square matrix; wider blocks get the ``(B + k_a, B)``
product (BLAS runs ``B = 16`` output columns far faster than ``B + k_a``)
and the stored vectors' own inner products are tracked on the host, only
those the balancer reads (its ``stored_reads``).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from itertools import chain
from operator import mul

import torch
from torch import Tensor

from grabsampler._rows import DenseRows, Rows, split_mm, stored_cross

__all__ = ["ONE_PRODUCT_COLS", "PAIR_ENTRIES", "SMALL_COLS", "AuxBank"]

#: parameter tensors with at most this many entries share one storage block
SMALL_COLS = 16384
#: up to this width the small block's matrix is one square product
ONE_PRODUCT_COLS = 2048
#: entries of the workspace in which pair differences are formed (per column chunk)
PAIR_ENTRIES = 1 << 19


class AuxBank:
    """``k`` stored vectors of the parameter space, in column blocks.

    Args:
        sizes: number of entries of each parameter tensor.
        k: number of stored vectors.
        dtype: floating dtype of the buffers.
        device: device of the buffers.
        passive: number of trailing stored vectors that are only updated, never
            needed in inner products (left out of the returned matrix).
        reads: the pairs ``(p, q)`` of stored vectors whose inner products the
            balancer reads (None: all); the fast path tracks only these.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        k: int,
        dtype: torch.dtype,
        device: torch.device,
        passive: int = 0,
        reads: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        self.passive = passive
        #: stored-vector inner products the balancer reads (None: all)
        self.reads = reads
        self.sizes = [int(s) for s in sizes]
        self.dtype = dtype
        self.device = device
        self.k = k
        small: list[int] = []
        large: list[int] = []
        total = 0
        for i, n in enumerate(self.sizes):
            if n <= SMALL_COLS and total + n <= 4 * SMALL_COLS:
                small.append(i)
                total += n
            else:
                large.append(i)
        #: blocks as lists of parameter indices (the shared small block first)
        self.groups: list[list[int]] = ([small] if small else []) + [[i] for i in large]
        self.has_small = bool(small)
        self.cap = 0  # batch rows the small block's workspace has room for
        self._flat: DenseRows | None = None
        #: with large blocks the stored vectors' inner products are tracked on the host
        #: (reading weight-sized vectors once more per batch costs more than the update)
        self.track = len(self.groups) > 1 or not small
        self._ss: list[list[float]] | None = None
        self._last: list[list[float]] | None = None
        self._alloc([torch.zeros(k, sum(self.sizes[i] for i in g)) for g in self.groups])

    def _alloc(self, blocks: list[Tensor]) -> None:
        self._ss = None
        self._fss: list[list[float]] | None = None  # fast path: tracked stored products
        self._fg: list[list[float]] | None = None  # fast path: the last matrix
        self._plans: dict[int, _FlatPlan] = {}
        blocks = [b.to(device=self.device, dtype=self.dtype) for b in blocks]
        if self.has_small:
            # the shared small block lives at the bottom of a workspace whose top
            # ``cap`` rows receive each batch, so that one product over the
            # contiguous ``[batch; stored]`` rows gives the whole inner-product matrix
            first = blocks[0]
            self.work = torch.empty(
                self.cap + first.shape[0], first.shape[1], dtype=self.dtype, device=self.device
            )
            self.work[self.cap :].copy_(first)
            blocks[0] = self.work[self.cap :]
        self.blocks = [b if b.is_contiguous() else b.contiguous() for b in blocks]
        self.buffers: list[Tensor] = [torch.empty(0)] * len(self.sizes)
        for g, blk in zip(self.groups, self.blocks):
            off = 0
            for i in g:
                self.buffers[i] = blk[:, off : off + self.sizes[i]]
                off += self.sizes[i]

    def _grow_cap(self, b: int) -> None:
        """Makes room for batches of ``b`` rows in the small block's workspace."""
        self.cap = b
        self._alloc([blk.clone() for blk in self.blocks])

    def grow(self, k: int) -> None:
        """Appends zero vectors so that ``k`` are stored (never shrinks)."""
        if k <= self.k:
            return
        self._alloc(
            [
                torch.cat([b, torch.zeros(k - self.k, b.shape[1], dtype=b.dtype)])
                for b in self.blocks
            ]
        )
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

    def _block_rows(self, rows: Sequence[Rows], g: list[int]) -> Rows | None:
        """One dense row set for a block of several tensors, or None if not all dense."""
        if len(g) == 1:
            return rows[g[0]]
        xs = [rows[i] for i in g]
        if not all(isinstance(r, DenseRows) for r in xs):
            return None
        return DenseRows(torch.cat([r.x for r in xs], dim=1))  # type: ignore[attr-defined]

    def _small_part(
        self, rows: Sequence[Rows], g: list[int], b: int, ka: int, host: bool
    ) -> Tensor | list[list[float]] | None:
        """The small block's part of the matrix from one product over the workspace.

        Copies the batch's rows of the small tensors into the top of the
        workspace (``B`` rows right above the stored vectors), then multiplies the
        contiguous ``[batch; stored]`` rows by their transpose. Returns the matrix
        (as nested lists if ``host``, which may save device operations), or None
        when the rows are not dense tensors of the bank's dtype and device.
        """
        xs = [rows[i] for i in g]
        if not all(
            isinstance(r, DenseRows) and r.x.dtype == self.dtype and r.x.device == self.device
            for r in xs
        ):
            return None
        xw = self._fill([r.x for r in xs], b)  # type: ignore[attr-defined]
        return self._flat_matrix(xw, b, ka, host)

    def _fill(self, xs: list[Tensor], b: int) -> Tensor:
        """Copies the batch's ``(B, n_i)`` small-tensor rows into the workspace; returns them."""
        if b > self.cap:
            self._grow_cap(b)
        xw = self.work[self.cap - b : self.cap]
        if len(xs) == 1:
            xw.copy_(xs[0])
        else:
            torch.cat(xs, dim=1, out=xw)
        self._flat = DenseRows(xw)
        return xw

    def _flat_matrix(self, xw: Tensor, b: int, ka: int, host: bool) -> Tensor | list[list[float]]:
        """The small block's ``[batch; stored] x batch`` products (all of them if ``host``)."""
        z = self.work[self.cap - b : self.cap + ka]
        if host and (xw.shape[1] <= ONE_PRODUCT_COLS or ka == 0):
            return (z @ z.T).tolist()
        # a (B + k_a, B) product (BLAS kernels favour B = 16 columns); the stored
        # vectors' own inner products come separately
        f = torch.mm(z, xw.T)
        if not host:
            return f
        act = self.blocks[0][:ka]
        fl, sl = f.tolist(), (act @ act.T).tolist()
        cross = fl[b:]
        out = [row + [c[i] for c in cross] for i, row in enumerate(fl[:b])]
        out += [row + srow for row, srow in zip(cross, sl)]
        return out

    def flat_plan(self, b: int, shapes: Sequence[Sequence[int]]) -> _FlatPlan:
        """The cached views and buffers of the one-block fast path for batches of ``b``.

        ``shapes`` are the parameter tensors' shapes (per example).
        """
        plan = self._plans.get(b)
        if plan is None:
            if b > self.cap:
                self._grow_cap(b)
            plan = _FlatPlan(self, b, shapes)
            self._plans[b] = plan
        return plan

    def flat_gram(self, xs: list[Tensor], b: int) -> list[list[float]]:
        """:meth:`gram_lists` for a bank that is one small block, from ``(B, *shape)`` tensors.

        Call :meth:`flat_plan` first. The tensors must have exactly the shapes
        ``plan.shapes``, the bank's dtype and device, and not require gradients
        (the caller checks); :meth:`flat_apply` then updates the stored vectors.
        Narrow blocks get the whole ``[batch; stored]`` Gram matrix from one
        product; wide ones one ``(B + k_a, B)`` product, with the inner products
        of the stored vectors tracked on the host (only the entries the balancer
        reads, see :attr:`~grabsampler.balance.base.Balancer.stored_reads`).
        """
        plan = self._plans[b]
        _copy_all(plan.dsts, xs)
        self._flat = plan.rows
        if plan.square:
            self._fg = None
            return torch.mm(plan.z, plan.zt, out=plan.f).tolist()
        fl = torch.mm(plan.z, plan.xwt, out=plan.f).tolist()
        self._fg = fl
        if not plan.ka:
            return fl
        ss = self._fss
        if ss is None:
            act = plan.act
            ss = self._fss = (act @ act.T).tolist()
        cross = fl[b:]
        for row, col in zip(fl, zip(*cross)):
            row.extend(col)
        for row, srow in zip(cross, ss):
            row.extend(srow)
        return fl

    def flat_apply(
        self,
        changed: Sequence[int],
        wx: Tensor | list[list[float]],
        terms: Sequence[tuple[int, int, float]] = (),
    ) -> None:
        """:meth:`apply` after :meth:`flat_gram` (same batch)."""
        assert self._flat is not None
        b = self._flat.batch_size
        plan = self._plans[b]
        fg, self._fg = self._fg, None
        if self._fss is not None:
            self._fss = _track(self._fss, fg, b, changed, wx, terms, self.reads) if fg else None
        if not changed:
            return
        lo, hi = changed[0], changed[-1] + 1
        if terms or hi - lo != len(changed) or isinstance(wx, Tensor):
            self.apply([], [self._flat], changed, wx, terms, track=False)
            return
        upd = plan.updates.get((lo, hi))
        if upd is None:
            upd = plan.updates[(lo, hi)] = _Update(self.blocks[0][lo:hi], b, self.dtype)
        upd.target.addmm_(upd.weights(wx), plan.xw)

    def _stored_gram(self, ka: int) -> list[list[float]]:
        """Inner products of the ``ka`` active stored vectors (tracked on the host)."""
        if self._ss is None or not self.track:
            parts = [(blk[:ka] @ blk[:ka].T).to(torch.float64) for blk in self.blocks]
            total = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
            self._ss = total.tolist()
        return self._ss

    def gram_lists(self, rows: Sequence[Rows]) -> tuple[list[list[float]], list[Rows | None]]:
        """Inner products of ``[rows; stored vectors]`` as nested lists of host floats.

        Call it under ``torch.no_grad()`` (as :meth:`apply`).

        Args:
            rows: one :class:`~grabsampler._rows.Rows` per parameter tensor.

        Returns:
            The ``(B + k_a) x (B + k_a)`` matrix (``k_a = k - passive``) read back
            with one device-to-host copy, and the per-block rows to hand back to
            :meth:`apply`.
        """
        k = self.k
        ka = k - self.passive
        b = rows[0].batch_size
        parts: list[Tensor] = []  # (B + k_a, B) each: [<x_i, x_j>; <a_p, x_j>]
        brows: list[Rows | None] = []
        for gi, g in enumerate(self.groups):
            if gi == 0 and self.has_small:
                part = self._small_part(rows, g, b, ka, host=len(self.groups) == 1)
                if isinstance(part, list):
                    assert self._flat is not None
                    return part, [self._flat]
                if part is not None:
                    parts.append(part)
                    brows.append(self._flat)
                    continue
            blk = self.blocks[gi]
            br = self._block_rows(rows, g)
            brows.append(br)
            pairs = [(br, blk)] if br is not None else [(rows[i], self.buffers[i]) for i in g]
            for r, a in pairs:
                act = a[:ka]
                if isinstance(r, DenseRows):
                    x = r.x
                    act = act if act.dtype == x.dtype and act.device == x.device else act.to(x)
                    # two products are faster than one on [x; act] (B = 16 rows hit
                    # the BLAS kernels' sweet spot, B + 2 rows do not)
                    gm = split_mm(x, x)
                    h = stored_cross(act, x) if ka else gm[:0]
                else:
                    gm = r.gram()
                    h = r.cross(act).to(gm.dtype).T
                parts.append(torch.cat([gm, h]) if ka else gm)
        if len(parts) == 1:
            fl = parts[0].tolist()
        else:
            fl = torch.stack([p.to(torch.float64) for p in parts]).sum(0).tolist()
        if not ka:
            return fl, brows
        ss = self._stored_gram(ka)
        cross = fl[b:]
        out = [row + [c[i] for c in cross] for i, row in enumerate(fl[:b])]
        out += [row + list(srow) for row, srow in zip(cross, ss)]
        self._last = out
        return out, brows

    def pair_diff_lists(
        self, rows: Sequence[Rows], b: int
    ) -> tuple[list[list[float]], list[Rows | None]] | None:
        """Inner products of the batch's pair differences, for balancing them directly.

        With ``P = B / 2`` differences ``d_p = x_{2p} - x_{2p+1}``, row ``p`` of the
        result holds ``<d_p, d_q>`` (columns ``q < P``) and ``<d_p, a_0>`` (column
        ``P``, stored vector 0). Wide blocks form the differences in column chunks
        of a bounded workspace (``P x`` :data:`PAIR_ENTRIES` ``/ P`` entries), so
        each gradient entry is read once and the product is ``P x P`` instead of
        ``B x B`` (a quarter of the flops). Rows that are not dense tensors (hooks
        mode) give their ``B x B`` Gram matrix and their products with the running
        sum alone, mapped onto the differences (one stored-vector product instead
        of two). Returns None (nothing done) for an odd batch; else the matrix as
        host floats and the per-block rows to hand to :meth:`apply`.
        """
        if b % 2:
            return None
        parts: list[Tensor] = []
        brows: list[Rows | None] = []
        diff: Tensor | None = None  # (P, B): +1 at 2p, -1 at 2p+1
        for g, blk in zip(self.groups, self.blocks):
            # the small tensors' rows side by side (at most B x 4 SMALL_COLS entries)
            br = self._block_rows(rows, g)
            brows.append(br)
            pairs = [(br, blk)] if br is not None else [(rows[i], self.buffers[i]) for i in g]
            for r, a in pairs:
                if isinstance(r, DenseRows):
                    x = r.x
                    parts.append(_pair_products(x, a[0].to(device=x.device, dtype=x.dtype)))
                    continue
                # rows known only through their products (hooks mode): the B x B Gram
                # matrix and the products with the running sum alone (the waiting
                # vector is zero here), mapped onto the differences by D = E X
                gm = r.gram().to(torch.float64)
                h = r.cross(a[:1]).to(torch.float64)  # (B, 1)
                if diff is None:
                    diff = torch.zeros(b // 2, b, dtype=torch.float64, device=gm.device)
                    idx = torch.arange(b // 2, device=gm.device)
                    diff[idx, 2 * idx] = 1.0
                    diff[idx, 2 * idx + 1] = -1.0
                parts.append(torch.cat([diff @ gm @ diff.T, diff @ h], dim=1))
        if len(parts) == 1:
            return parts[0].tolist(), brows
        return torch.stack([q.to(torch.float64).cpu() for q in parts]).sum(0).tolist(), brows

    def track_pair_step(self, dm: list[list[float]], eps: Sequence[float]) -> None:
        """Tracks the stored products after ``a_0 += sum_p eps_p d_p`` (see :meth:`pair_diff_lists`).

        The other stored vectors must be zero (pair balance with no waiting
        example): their inner products stay zero and ``<a_0, a_0>`` follows
        from ``dm``.
        """
        self._last = None
        self._fss = None
        ss = self._ss
        if ss is None:
            return
        p = len(dm)
        grow = sum(e * row[p] for e, row in zip(eps, dm))
        quad = sum(e * sum(map(mul, eps, row)) for e, row in zip(eps, dm))
        new = [[0.0] * len(ss) for _ in ss]
        new[0][0] = ss[0][0] + 2.0 * grow + quad
        self._ss = new if math.isfinite(new[0][0]) else None

    def _track_update(
        self, changed: Sequence[int], wx: list[list[float]], terms: Sequence[tuple[int, int, float]]
    ) -> None:
        """Updates the tracked inner products of the active stored vectors after :meth:`apply`.

        Every new active vector is a combination of the batch rows and the old
        active vectors, so its inner products follow from the last matrix ``F``:
        ``SS' = C F C^T`` (float64 on the host).
        """
        ka = self.k - self.passive
        last = self._last
        if self._ss is None or last is None or len(last) != len(last[0]):
            self._ss = None
            return
        b = len(last) - ka
        coef = [[0.0] * (b + ka) for _ in range(ka)]
        for p in range(ka):
            coef[p][b + p] = 1.0
        for j, row in enumerate(changed):
            if row < ka:
                coef[row][:b] = [float(v) for v in wx[j]]
        for j, i, c in terms:
            row = changed[j]
            if row < ka:
                if i >= ka:  # a passive vector enters an active one: recompute later
                    self._ss = None
                    return
                coef[row][b + i] += c
        ct = torch.tensor(coef, dtype=torch.float64)
        ft = torch.tensor(last, dtype=torch.float64)
        self._ss = (ct @ ft @ ct.T).tolist()
        self._last = None

    def batch_gram(self, rows: Sequence[Rows]) -> tuple[Tensor, list[Rows | None]]:
        """:meth:`gram_lists` as a float64 CPU tensor."""
        g, brows = self.gram_lists(rows)
        return torch.tensor(g, dtype=torch.float64), brows

    def apply(
        self,
        rows: Sequence[Rows],
        brows: Sequence[Rows | None],
        changed: Sequence[int],
        wx: Tensor | list[list[float]],
        terms: Sequence[tuple[int, int, float]] = (),
        *,
        track: bool = True,
    ) -> None:
        """Adds ``wx @ rows`` (plus multiples of stored vectors) to the vectors ``changed``.

        Args:
            rows: the batch the weights refer to (one per parameter tensor).
            brows: the per-block rows returned by :meth:`batch_gram`.
            changed: indices of the stored vectors that change.
            wx: ``(len(changed), B)`` weights of the batch rows (tensor or nested lists).
            terms: ``(j, i, c)``: add ``c`` times stored vector ``i`` to ``changed[j]``.
            track: update the tracked inner products (False: the caller does).
        """
        if not changed:
            return
        if track:
            self._fss = None  # the fast path's tracked products are stale now
        if isinstance(wx, Tensor):
            wx_dev = wx.to(device=self.device, dtype=self.dtype)
        else:
            wx_dev = torch.tensor(wx, dtype=self.dtype, device=self.device)
        lo, hi = changed[0], changed[-1] + 1
        contiguous = list(changed) == list(range(lo, hi))
        # trailing rows of all-one weights add the plain sum of the batch rows, which
        # some rows know already (hooks mode: a layer's own weight gradient)
        ones = 0
        if isinstance(wx, list):
            while ones < len(wx) and all(v == 1.0 for v in wx[len(wx) - 1 - ones]):
                ones += 1
        keep = len(changed) - ones
        for g, blk, br in zip(self.groups, self.blocks, brows):
            # terms read the stored vectors as they were before this update
            old = {i: blk[i].clone() for _, i, _ in terms if i in changed}
            pairs = [(br, blk)] if br is not None else [(rows[i], self.buffers[i]) for i in g]
            for r, a in pairs:
                into = getattr(r, "combine_into", None)
                known = ones and getattr(r, "row_sum", None) is not None
                if contiguous and into is not None and a.is_contiguous() and known:
                    if keep:
                        into(a[lo : lo + keep], wx_dev[:keep])
                    for i in range(lo + keep, hi):
                        r.add_sum_into(a[i])  # type: ignore[attr-defined]
                elif contiguous and into is not None and a.is_contiguous():
                    into(a[lo:hi], wx_dev)
                else:
                    upd = r.combine(wx_dev).to(a.dtype)
                    for j, i in enumerate(changed):
                        a[i].add_(upd[j])
            for j, i, c in terms:
                blk[changed[j]].add_(old.get(i, blk[i]), alpha=c)
        if self.track and track:
            self._track_update(changed, wx.tolist() if isinstance(wx, Tensor) else wx, terms)

    @torch.no_grad()
    def transform(self, mat: Tensor) -> None:
        """Replaces the stored vectors by ``mat @ stored`` (``mat`` is ``(k, k)``)."""
        m = mat.to(device=self.device, dtype=self.dtype)
        self._alloc([m @ b for b in self.blocks])

    def state(self) -> list[Tensor]:
        """Copies of the stored vectors, one ``(k, numel)`` tensor per parameter."""
        return [b.detach().clone() for b in self.buffers]

    def load(self, buffers: Sequence[Tensor]) -> None:
        """Restores buffers saved by :meth:`state`."""
        if len(buffers) != len(self.sizes):
            raise ValueError("state_dict: aux buffers do not match the trainable parameters")
        for b, s in zip(buffers, self.sizes):
            if b.dim() != 2 or int(b.shape[1]) != s:
                raise ValueError("state_dict: aux buffer shape does not match the parameters")
        k = int(buffers[0].shape[0]) if buffers else 0
        blocks = [torch.cat([buffers[i].detach().cpu() for i in g], dim=1) for g in self.groups]
        self.k = k
        self._alloc(blocks)


def _pair_products(x: Tensor, s: Tensor) -> Tensor:
    """``[D D^T | D s]`` for the pair differences ``D = x[0::2] - x[1::2]`` of ``(B, n)`` rows.

    The differences are formed in column chunks of a bounded workspace and
    multiplied while they are in cache.
    """
    p, n = int(x.shape[0]) // 2, int(x.shape[1])
    step = max(1024, PAIR_ENTRIES // max(p, 1))
    gd = torch.zeros(p, p, dtype=x.dtype, device=x.device)
    h = torch.zeros(p, 1, dtype=x.dtype, device=x.device)
    ws = torch.empty(p, min(step, n), dtype=x.dtype, device=x.device)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        d = ws[:, : hi - lo]
        torch.sub(x[0::2, lo:hi], x[1::2, lo:hi], out=d)
        gd.addmm_(d, d.T)
        h.addmm_(d, s[lo:hi, None])
    return torch.cat([gd, h], dim=1)


def _copy_all(dsts: list[Tensor], srcs: list[Tensor]) -> None:
    """``dst.copy_(src)`` for each pair, in one call where torch offers it."""
    if _foreach_copy is not None:
        _foreach_copy(dsts, srcs)
    else:
        for d, s in zip(dsts, srcs):
            d.copy_(s)


_foreach_copy = getattr(torch, "_foreach_copy_", None)


class _Update:
    """A cached target view and host-filled weight buffer of a fast-path update."""

    def __init__(self, target: Tensor, b: int, dtype: torch.dtype) -> None:
        self.target = target
        self.dtype = dtype
        rows = int(target.shape[0])
        code = {torch.float32: "f", torch.float64: "d"}.get(dtype)
        # a host buffer shared with a CPU tensor: filling it costs far less than
        # building a tensor from nested lists
        self.buf: array[float] | None = None
        self.host: Tensor | None = None
        if code is not None and target.device.type == "cpu" and rows * b:
            self.buf = array(code, bytes(rows * b * array(code).itemsize))
            self.host = torch.frombuffer(self.buf, dtype=dtype).view(rows, b)

    def weights(self, wx: list[list[float]]) -> Tensor:
        """The ``(rows, B)`` weights ``wx`` as a tensor on the target's device."""
        if self.buf is not None and self.host is not None:
            self.buf[:] = array(self.buf.typecode, chain.from_iterable(wx))
            return self.host
        return torch.tensor(wx, dtype=self.dtype, device=self.target.device)


class _FlatPlan:
    """Views of the workspace for one batch size of the one-block fast path."""

    def __init__(self, bank: AuxBank, b: int, shapes: Sequence[Sequence[int]]) -> None:
        ka = bank.k - bank.passive
        cap = bank.cap
        self.ka = ka
        self.xw = bank.work[cap - b : cap]
        self.xwt = self.xw.T
        self.z = bank.work[cap - b : cap + ka]
        self.zt = self.z.T
        self.act = bank.work[cap : cap + ka]
        self.rows = DenseRows(self.xw)
        #: the expected ``(B, *shape)`` of each gradient and its place in the workspace
        self.shapes = [torch.Size((b, *s)) for s in shapes]
        self.dsts: list[Tensor] = []
        off = 0
        for shape, size in zip(self.shapes, bank.sizes):
            self.dsts.append(self.xw[:, off : off + size].view(shape))
            off += size
        self.square = self.xw.shape[1] <= ONE_PRODUCT_COLS or ka == 0
        cols = b + ka if self.square else b
        self.f = torch.empty(b + ka, cols, dtype=bank.dtype, device=bank.device)
        self.updates: dict[tuple[int, int], _Update] = {}


def _track(
    ss: list[list[float]],
    g: list[list[float]],
    b: int,
    changed: Sequence[int],
    wx: Tensor | list[list[float]],
    terms: Sequence[tuple[int, int, float]],
    reads: Sequence[tuple[int, int]] | None,
) -> list[list[float]] | None:
    """The stored vectors' inner products after an update (None: recompute them).

    A new active vector is ``a_p + sum_i W_pi x_i + sum_i c_i a_i``: its
    coefficients ``c_p`` over the rows of the last matrix ``g`` give
    ``<a_p', a_q'> = c_p^T g c_q``, summed over the nonzero coefficients of the
    sparser side. Only the pairs in ``reads`` are computed (the others become
    NaN); a non-finite result, weights given as a tensor or a term with a
    passive vector ask for a recomputation.
    """
    ka = len(ss)
    if isinstance(wx, Tensor):
        return None
    coef: dict[int, list[float]] = {}
    zero = [0.0] * ka
    for j, p in enumerate(changed):
        if p < ka:
            c = [*wx[j], *zero]
            c[b + p] = 1.0
            coef[p] = c
    for j, i, v in terms:
        p = changed[j]
        if p < ka:
            if i >= ka:
                return None
            coef[p][b + i] += v
    if not coef:
        return ss
    pairs = reads if reads is not None else [(p, q) for p in range(ka) for q in range(p + 1)]
    out = [[math.nan] * ka for _ in range(ka)]
    for p, q in pairs:
        cp, cq = coef.get(p), coef.get(q)
        if cp is None:
            # <a_p, a_q'> = (g c_q)_p
            v = ss[p][q] if cq is None else sum(map(mul, cq, g[b + p]))
        elif cq is None:
            v = sum(map(mul, cp, g[b + q]))
        else:
            if cq.count(0.0) < cp.count(0.0):
                cp, cq = cq, cp
            v = 0.0
            for s, a in enumerate(cq):
                if a:
                    v += a * sum(map(mul, cp, g[s]))
        if not math.isfinite(v):
            return None
        out[p][q] = out[q][p] = v
    return out
