"""Small linear-algebra helpers for PSGD: spectral-norm bounds, a Procrustes step.

All helpers work in float32 (or wider) whatever the storage dtype of their input,
so that bfloat16 preconditioners keep float32 norms and solves.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "apply_along",
    "gram_triu_into",
    "herm_mm",
    "norm_lower_bound_herm",
    "procrustes_step",
    "solve_upper_h_along",
    "triu_addmm_",
    "triu_left_mm",
    "triu_right_mm",
    "triu_right_mm_t",
    "triu_t_left_mm",
    "unfold_gram",
]


def _wide(x: Tensor) -> Tensor:
    """``x`` in at least float32 (complex stays complex)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def norm_lower_bound_herm(a: Tensor, *, scratch: bool = False) -> Tensor:
    """Cheap lower bound of the spectral norm of a Hermitian matrix (float32 or wider).

    One step of power iteration started from the row of largest norm; the result
    is at least ``max_j ||a[j]|| / sqrt(n)`` and at most ``||a||_2``. Evaluated on
    ``a / max|a|`` (no overflow or underflow).

    Args:
        a: Hermitian ``(n, n)`` matrix.
        scratch: ``a`` is a temporary the caller no longer needs: it is scaled in
            place (same arithmetic, one ``n x n`` allocation less).

    Returns:
        A real 0-dim tensor.
    """
    a = _wide(a)
    max_abs = _max_abs(a)
    if not bool(max_abs > 0):
        return max_abs
    b = a.div_(max_abs) if scratch and a.dtype == max_abs.dtype else a / max_abs
    j = torch.argmax(torch.linalg.vector_norm(b, dim=1))
    x = b @ b[j].conj()
    return max_abs * torch.linalg.vector_norm(b.mH @ x) / torch.linalg.vector_norm(x)


def _max_abs(a: Tensor) -> Tensor:
    """``max |a|`` (for a real ``a`` from one min/max pass, without an ``|a|`` temporary)."""
    if a.is_complex() or a.numel() == 0:
        return a.abs().amax()
    lo, hi = torch.aminmax(a)
    return torch.maximum(hi, -lo)


def apply_along(m: Tensor, x: Tensor, dim: int) -> Tensor:
    """Tensor-matrix product along one dimension: ``y[.., a, ..] = sum_b m[a, b] x[.., b, ..]``.

    A 1-D ``m`` is a diagonal matrix.
    """
    if m.dim() < 2:
        shape = [1] * x.dim()
        shape[dim] = m.shape[0]
        return x * m.view(shape)
    if x.dim() == 1:
        return m @ x
    if dim == 0:
        return (m @ x.reshape(x.shape[0], -1)).view(x.shape)
    if dim == x.dim() - 1:
        return x @ m.mT
    return torch.movedim(torch.tensordot(m, x, dims=([1], [dim])), 0, dim)


def unfold_gram(a: Tensor, dim: int, diag: bool, *, mirror: bool = True) -> Tensor:
    """``A_(dim) A_(dim)^H`` for the unfolding of ``a`` with ``dim`` as rows (only its diagonal if ``diag``).

    ``mirror=False``: see :func:`herm_mm` (the lower off-diagonal blocks are left unset).
    """
    if a.dim() == 2 and not diag:
        if dim == 0:
            return herm_mm(a, a.mH, mirror=mirror)
        return herm_mm(a.mT, a.conj(), mirror=mirror)
    rows = torch.movedim(a, dim, 0).reshape(a.shape[dim], -1)
    if diag:
        return (rows * rows.conj()).real.sum(dim=1).to(a.dtype)
    return herm_mm(rows, rows.mH, mirror=mirror)


def solve_upper_h_along(q: Tensor, x: Tensor, dim: int, *, transposed: bool = False) -> Tensor:
    """``x`` times ``Q^{-H}`` along ``dim`` for an upper-triangular ``q`` (float32 solve).

    ``transposed``: for a 2-D ``x`` and ``dim=0``, solve ``X^H Q^{-1}`` on the transposed
    view instead (the same result up to rounding; no column-major copy, ~2x faster on CPU).
    """
    if q.dim() < 2:
        shape = [1] * x.dim()
        shape[dim] = q.shape[0]
        return x / q.conj().view(shape)
    if x.dim() == 2 and dim == 1:  # X conj(Q^{-1}): a right-side solve, no transposed copy
        sol = torch.linalg.solve_triangular(_wide(q).conj(), _wide(x), upper=True, left=False)
        return sol.to(x.dtype)
    if transposed and x.dim() == 2 and dim == 0:
        # Q^{-H} X = (X^H Q^{-1})^H: a right-side solve on the transposed view (a left-side
        # solve would first copy X into column-major order; this is ~2x faster on CPU)
        sol = torch.linalg.solve_triangular(_wide(q), _wide(x).mH, upper=True, left=False)
        return sol.mH.to(x.dtype)
    rows = torch.movedim(x, dim, 0)
    sol = torch.linalg.solve_triangular(
        _wide(q).mH, _wide(rows.reshape(rows.shape[0], -1)), upper=False
    ).to(x.dtype)
    return torch.movedim(sol.view(rows.shape), 0, dim)


def procrustes_step(q: Tensor, max_step: float = 0.125) -> None:
    """Rotate ``q`` in place towards its symmetric positive-definite polar factor.

    ``Q <- exp(a R) Q`` to second order with the skew matrix ``R = Q^H - Q``
    (normalised) and ``a`` a damped Newton step on ``tr(exp(aR) Q)``. A left
    rotation leaves ``P = Q^H Q`` unchanged; it only removes the rotation
    ambiguity so that ``Q`` stays close to symmetric positive definite.
    """
    qw = _wide(q)
    r = qw.mH - qw
    scale = r.abs().amax()
    if not bool(scale > 0):
        return
    r = r / norm_lower_bound_herm(r @ r.mH).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
    rq = r @ qw
    tr_rq = torch.diagonal(rq).real.sum()
    if not bool(tr_rq > 0):
        return
    tr_rrq = torch.diagonal(r @ rq).real.sum()
    a = torch.where(tr_rrq < 0, (-tr_rq / tr_rrq).clamp(max=max_step), torch.tensor(max_step))
    q.copy_((qw + a * (rq + 0.5 * a * (r @ rq))).to(q.dtype))


# Block products that skip the zero and mirrored halves of triangular / Hermitian
# results. A product of side n is split in two halves down to ``_BLOCK`` rows; at one
# level the work is about 3/4 (Hermitian result) or 1/2 (two triangular factors) of a
# full product, at two levels about 5/8 and 3/8.
_BLOCK = 192


def _mirror_(out: Tensor) -> Tensor:
    """Copy the upper off-diagonal blocks of the block split to the lower ones (in place).

    Used after ``_herm_acc``/``_gram_triu_acc``, which write the diagonal base blocks in
    full and only the upper off-diagonal blocks at every level of the same split.
    """
    n = out.shape[0]
    if n < 2 * _BLOCK:
        return out
    h = n // 2
    out[h:, :h].copy_(out[:h, h:].mH)
    _mirror_(out[:h, :h])
    _mirror_(out[h:, h:])
    return out


def herm_mm(a: Tensor, b: Tensor, *, mirror: bool = True) -> Tensor:
    """``a @ b`` for a product known to be Hermitian (``(n, k) @ (k, n)``).

    Only the diagonal blocks and the upper off-diagonal blocks are multiplied; the
    lower off-diagonal blocks are copied from the upper ones, or, with ``mirror=False``,
    left unset (uninitialised memory) for a caller that reads the upper triangle only
    or calls :func:`_mirror_` itself (below ``2 * _BLOCK`` the full product is returned).
    """
    n = a.shape[0]
    if n < 2 * _BLOCK:
        return a @ b
    out = torch.empty(n, n, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    _herm_acc(out, a, b, fresh=True)
    return _mirror_(out) if mirror else out


def _beta(fresh: bool) -> float:
    """``beta`` of a block product: 0 writes a block not touched yet (its old contents,
    garbage from ``torch.empty``, are not read), 1 accumulates.

    Writing the first product of a block with ``beta=0`` gives the same numbers as
    adding it to zeros (``0 + x == x``; only the sign of a zero may differ) without a
    zero-fill pass over the output.
    """
    return 0.0 if fresh else 1.0


def _herm_acc(out: Tensor, a: Tensor, b: Tensor, fresh: bool = False) -> None:
    """``out += a @ b`` (``fresh``: ``out = a @ b``) on the diagonal and upper off-diagonal blocks."""
    n = out.shape[0]
    if n < 2 * _BLOCK:
        out.addmm_(a, b, beta=_beta(fresh))
        return
    h = n // 2
    _herm_acc(out[:h, :h], a[:h], b[:, :h], fresh)
    out[:h, h:].addmm_(a[:h], b[:, h:], beta=_beta(fresh))
    _herm_acc(out[h:, h:], a[h:], b[:, h:], fresh)


def triu_addmm_(out: Tensor, u: Tensor, q: Tensor, alpha: float) -> Tensor:
    """``out += alpha * u @ q`` in place, for upper-triangular ``u`` and ``q`` (``out`` too).

    The zero lower blocks of ``u`` and ``q`` are skipped; ``out``'s lower triangle is
    left as it is.
    """
    n = out.shape[0]
    if n < 2 * _BLOCK:
        return out.addmm_(u, q, alpha=alpha)
    h = n // 2
    out[:h, h:].addmm_(u[:h], q[:, h:], alpha=alpha)
    triu_addmm_(out[:h, :h], u[:h, :h], q[:h, :h], alpha)
    triu_addmm_(out[h:, h:], u[h:, h:], q[h:, h:], alpha)
    return out


def gram_triu_into(out: Tensor, q: Tensor) -> Tensor:
    """``out <- Q^H Q`` for an upper-triangular ``q`` (lower off-diagonal blocks mirrored).

    With ``Q = [[Q11, Q12], [0, Q22]]``: ``P11 = Q11^H Q11``, ``P12 = Q11^H Q12`` and
    ``P22 = Q12^H Q12 + Q22^H Q22``; the triangular Grams recurse.
    """
    n = out.shape[0]
    if n < 2 * _BLOCK:
        if out.is_contiguous():
            return torch.mm(q.mH, q, out=out)
        return out.copy_(q.mH @ q)
    _gram_triu_acc(out, q, fresh=True)
    return _mirror_(out)


def _gram_triu_acc(out: Tensor, q: Tensor, fresh: bool = False) -> None:
    n = out.shape[0]
    if n < 2 * _BLOCK:
        out.addmm_(q.mH, q, beta=_beta(fresh))
        return
    h = n // 2
    _gram_triu_acc(out[:h, :h], q[:h, :h], fresh)
    out[:h, h:].addmm_(q[:h, :h].mH, q[:h, h:], beta=_beta(fresh))
    _gram_triu_acc(out[h:, h:], q[h:, h:], fresh)
    _herm_acc(out[h:, h:], q[:h, h:].mH, q[:h, h:])


def triu_left_mm(q: Tensor, x: Tensor) -> Tensor:
    """``q @ x`` for an upper-triangular ``q`` (``(n, n) @ (n, m)``), zero blocks skipped."""
    n = q.shape[0]
    if n < 2 * _BLOCK:
        return q @ x
    out = torch.empty(n, x.shape[1], dtype=torch.promote_types(q.dtype, x.dtype), device=x.device)
    _tri_left_acc(out, q, x, upper=True, fresh=True)
    return out


def triu_right_mm_t(x: Tensor, q: Tensor) -> Tensor:
    """``x @ q^T`` for an upper-triangular ``q`` (``(m, n) @ (n, n)``), zero blocks skipped."""
    n = q.shape[0]
    if n < 2 * _BLOCK:
        return x @ q.mT
    out = torch.empty(x.shape[0], n, dtype=torch.promote_types(q.dtype, x.dtype), device=x.device)
    _tri_left_acc(out.mT, q, x.mT, upper=True, fresh=True)  # (x q^T)^T = q x^T
    return out


def _tri_left_acc(out: Tensor, t: Tensor, x: Tensor, *, upper: bool, fresh: bool = False) -> None:
    """``out += t @ x`` (``fresh``: ``out = t @ x``) for a triangular ``t``, zero blocks skipped."""
    n = t.shape[0]
    if n < 2 * _BLOCK:
        out.addmm_(t, x, beta=_beta(fresh))
        return
    h = n // 2
    _tri_left_acc(out[:h], t[:h, :h], x[:h], upper=upper, fresh=fresh)
    if upper:
        out[:h].addmm_(t[:h, h:], x[h:])
        _tri_left_acc(out[h:], t[h:, h:], x[h:], upper=upper, fresh=fresh)
    else:  # the rows below are written first by the off-diagonal block
        out[h:].addmm_(t[h:, :h], x[:h], beta=_beta(fresh))
        _tri_left_acc(out[h:], t[h:, h:], x[h:], upper=upper)


def triu_t_left_mm(q: Tensor, x: Tensor) -> Tensor:
    """``q^H @ x`` for an upper-triangular ``q`` (``(n, n)^H @ (n, m)``), zero blocks skipped."""
    n = q.shape[0]
    if n < 2 * _BLOCK:
        return q.mH @ x
    out = torch.empty(n, x.shape[1], dtype=torch.promote_types(q.dtype, x.dtype), device=x.device)
    _tri_left_acc(out, q.mH, x, upper=False, fresh=True)
    return out


def triu_right_mm(x: Tensor, u: Tensor) -> Tensor:
    """``x @ u`` for an upper-triangular ``u`` (``(m, n) @ (n, n)``), zero blocks skipped."""
    n = u.shape[0]
    if n < 2 * _BLOCK:
        return x @ u
    out = torch.empty(x.shape[0], n, dtype=torch.promote_types(u.dtype, x.dtype), device=x.device)
    _tri_left_acc(
        out.mT, u.mT, x.mT, upper=False, fresh=True
    )  # (x u)^T = u^T x^T, u^T lower-triangular
    return out
