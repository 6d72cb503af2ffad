"""Kronecker-product preconditioner factors: choice, initialisation, application, fitting.

A tensor gradient ``G`` of shape ``(n_1, ..., n_k)`` is preconditioned by
``P = Q^H Q`` with ``Q = Q_1 (x) ... (x) Q_k``; each ``Q_i`` is dense (``n_i x n_i``)
or diagonal (a length-``n_i`` vector). ``P G`` is ``G`` multiplied along each
dimension by ``P_i = Q_i^H Q_i``, so with a cached ``P_i`` a 2-D gradient costs two
matrix products (``P_1 G P_2``) instead of four.

Storage (per dense factor):

* ``"EQ"``: ``Q_i`` is upper triangular with a positive diagonal, so it is the
  Cholesky factor of ``P_i``: the state holds ``P_i`` itself (``n x n``, as much as
  kron-torch's ``Q_i``) and ``Q_i = chol(P_i)`` is recovered on update steps only.
  Applying the preconditioner then reads ``P_i`` directly; the cache costs no memory.
* ``"QEP"``, ``"QEQ"``, ``"Q0.5EQ1.5"``: dense ``Q_i`` plus a cached ``P_i``.
* ``"QUAD"``: the state *is* ``P_i`` (fitted directly; nothing to cache).

Fitting: with ``h`` the Hessian-vector product (or the gradient, for whitening)
and ``v`` the probe vector, every geometry drives ``P h h^H P`` towards ``v v^H``
(``E[v v^H] = I`` when ``v`` is integrated out for whitening), i.e.
``P -> (E[g g^H])^{-1/2}`` for whitening and ``P -> |H|^{-1}`` for Newton. The
step on each factor is normalised by a moving-max bound ``L`` of the spectral
norm of the fitting gradient, kept in float32 (Li 2015, 2018, 2024).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _linalg
from ._linalg import (
    apply_along,
    gram_triu_into,
    herm_mm,
    norm_lower_bound_herm,
    procrustes_step,
    solve_upper_h_along,
    triu_addmm_,
    triu_left_mm,
    triu_right_mm,
    triu_right_mm_t,
    triu_t_left_mm,
    unfold_gram,
)

__all__ = [
    "GEOMETRIES",
    "balance",
    "choose_dense",
    "factor_cost",
    "init_factors",
    "merged_shape",
    "precondition",
    "precondition_batched",
    "precondition_triangular",
    "preconditioner_matrices",
    "refresh_p",
    "update_factors",
]

GEOMETRIES = ("EQ", "QEP", "QEQ", "Q0.5EQ1.5", "QUAD")
MEMORY_SAVE_MODES = (None, "smart_one_diag", "one_diag", "all_diag")


def merged_shape(shape: Sequence[int], merge_dims: bool) -> tuple[int, ...]:
    """Working shape of a parameter: 0-dim -> ``(1,)``; ndim > 2 merged into a balanced matrix."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return (1,)
    if len(shape) > 2 and merge_dims:
        first = (math.prod(shape[:-1]), shape[-1])
        last = (shape[0], math.prod(shape[1:]))
        return first if first[1] - first[0] <= last[1] - last[0] else last
    return shape


def choose_dense(
    shape: Sequence[int],
    *,
    max_size: float,
    min_ndim: int,
    max_skew: float,
    memory_save_mode: str | None,
) -> tuple[bool, ...]:
    """Which dimensions get a dense (triangular/full) factor; the others are diagonal.

    A dimension is diagonal when its size is 1, exceeds ``max_size``, the tensor has
    fewer than ``min_ndim`` dims, ``size**2 > max_skew * numel`` (skew), or the
    memory-save mode says so (``"one_diag"``: the largest dim; ``"smart_one_diag"``:
    the largest dim if strictly larger than the second; ``"all_diag"``: every dim).
    """
    if memory_save_mode not in MEMORY_SAVE_MODES:
        raise ValueError(
            f"memory_save_mode must be one of {MEMORY_SAVE_MODES}, got {memory_save_mode!r}"
        )
    shape = tuple(shape)
    ndim, numel = len(shape), math.prod(shape)
    forced = [False] * ndim
    if ndim > 0:
        largest = max(range(ndim), key=lambda i: (shape[i], -i))
        if memory_save_mode == "all_diag":
            forced = [True] * ndim
        elif memory_save_mode == "one_diag":
            forced[largest] = True
        elif memory_save_mode == "smart_one_diag" and ndim > 1:
            ordered = sorted(shape)
            if ordered[-1] > ordered[-2]:
                forced[largest] = True
    return tuple(
        not (
            size == 1
            or size > max_size
            or ndim < min_ndim
            or forced[i]
            or size * size > max_skew * numel
        )
        for i, size in enumerate(shape)
    )


def factor_cost(shape: Sequence[int], dense: Sequence[bool]) -> float:
    """Rough flop count of one preconditioner update (used to assign owners)."""
    numel = math.prod(shape)
    return float(sum(2 * numel * n + n**3 if d else 2 * numel for n, d in zip(shape, dense)))


def init_factors(
    shape: Sequence[int],
    dense: Sequence[bool],
    scale: float | Tensor,
    *,
    geometry: str,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[list[Tensor], list[Tensor | None]]:
    """Factors ``Q_i`` with ``Q = scale * I`` (``P = scale**2 * I``) and their caches.

    Returns:
        ``(qs, ps)``: the stored factors and, for geometries that keep one, the cached
        ``P_i`` (``None`` elsewhere).
    """
    k = len(shape)
    s = torch.as_tensor(scale, dtype=torch.float32) ** (1.0 / k)
    if geometry == "QUAD":
        s = s * s
    qs: list[Tensor] = []
    ps: list[Tensor | None] = []
    for n, d in zip(shape, dense):
        if not d:
            qs.append(torch.ones(n, dtype=dtype, device=device) * s.to(device))
            ps.append(None)
            continue
        eye = torch.eye(n, dtype=dtype, device=device) * s.to(device)
        qs.append(eye)
        if geometry == "EQ":
            qs[-1] = eye * s.to(device)  # the state holds P_i = (s I)^H (s I)
            ps.append(None)
        elif geometry == "QUAD":
            ps.append(None)
        else:
            ps.append(eye * s.to(device))
    return qs, ps


def _stores_p(q: Tensor, geometry: str) -> bool:
    return q.dim() == 2 and geometry in ("EQ", "QUAD")


def _chol_upper(p: Tensor, lower: bool = False) -> Tensor:
    """Upper-triangular ``Q`` with positive diagonal and ``Q^H Q = P`` (float64 retry).

    ``lower``: ``Q = L^H`` for the lower factor ``L`` (a view; the same up to rounding):
    on CPU the lower factorisation is ~25% faster than asking for the upper one.
    """
    if lower:
        low, info = torch.linalg.cholesky_ex(p)
        if int(info) == 0:
            return low.mH
    u, info = torch.linalg.cholesky_ex(p, upper=True)
    if int(info) == 0:
        return u
    p64 = p.to(torch.complex128 if p.is_complex() else torch.float64)
    p64 = 0.5 * (p64 + p64.mH)
    jitter = torch.finfo(p.real.dtype).eps * p64.diagonal().real.abs().amax()
    for _ in range(8):
        u64, info = torch.linalg.cholesky_ex(p64, upper=True)
        if int(info) == 0:
            return u64.to(p.dtype)
        p64 = p64 + jitter * torch.eye(p.shape[0], dtype=p64.dtype, device=p.device)
        jitter = jitter * 10
    raise RuntimeError("psgd: a preconditioner factor lost positive definiteness")


def preconditioner_matrices(
    qs: Sequence[Tensor], ps: Sequence[Tensor | None], geometry: str
) -> list[Tensor]:
    """The ``P_i`` to apply: matrices for dense factors, vectors for diagonal ones."""
    out = []
    for q, p in zip(qs, ps):
        if geometry == "QUAD" or _stores_p(q, geometry):
            out.append(q)
        elif q.dim() < 2:
            out.append((q * q.conj()).real.to(q.dtype) if q.is_complex() else q * q)
        else:
            assert p is not None, "missing cached P"
            out.append(p)
    return out


def precondition(g: Tensor, mats: Sequence[Tensor]) -> Tensor:
    """``P g``: ``g`` multiplied along each dimension by its ``P_i`` (one product per factor)."""
    if g.dim() == 2 and mats[0].dim() == 2 and mats[1].dim() == 2:
        return torch.mm(torch.mm(mats[0], g), mats[1].mT)
    out = g
    for i, m in enumerate(mats):
        out = apply_along(m, out, i)
    return out


def precondition_triangular(g: Tensor, qs: Sequence[Tensor]) -> Tensor:
    """``P g`` from the upper-triangular factors ``Q_i`` themselves (``P_i = Q_i^H Q_i``).

    Used on update steps of ``"EQ"``, where the fresh ``Q_i`` is at hand and ``P_i`` is
    not formed: ``g`` is multiplied along each dimension by ``Q_i`` and then by
    ``Q_i^H`` (triangular products, zero blocks skipped). 1-D ``q`` are diagonal
    factors (``P_i = |q|^2``).
    """
    if g.dim() == 2 and qs[0].dim() == 2 and qs[1].dim() == 2:
        q1, q2 = qs
        x = triu_t_left_mm(q1, triu_left_mm(q1, g))  # P_1 g
        return triu_right_mm(triu_right_mm_t(x, q2), q2.conj())  # (x Q_2^T) conj(Q_2) = x P_2^T
    out = g
    for i, q in enumerate(qs):
        if q.dim() < 2:
            out = apply_along((q * q.conj()).real.to(q.dtype) if q.is_complex() else q * q, out, i)
        else:
            out = apply_along(q.mH, apply_along(q, out, i), i)
    return out


def refresh_p(qs: Sequence[Tensor]) -> None:
    """In place: each stored upper-triangular ``Q_i`` (dense, ``"EQ"``) becomes ``P_i = Q_i^H Q_i``."""
    for q in qs:
        if q.dim() == 2:
            wide = torch.promote_types(q.dtype, torch.float32)
            _gram_into(q, q.to(wide, copy=True), triangular=True)


def precondition_batched(g: Tensor, mats: Sequence[Tensor]) -> Tensor:
    """:func:`precondition` of ``N`` same-shaped tensors at once.

    Args:
        g: ``(N, n)`` or ``(N, n_1, n_2)``: the stacked 1-D or 2-D (working-shape) tensors.
        mats: per dimension, the stacked ``P_i``: ``(N, n_i, n_i)`` for dense factors
            (batched products, ``torch.bmm``) or ``(N, n_i)`` for diagonal ones.

    Returns:
        The stacked ``P g`` (``g``'s shape).
    """
    if g.dim() == 2:
        m = mats[0]
        return torch.bmm(m, g.unsqueeze(2)).squeeze(2) if m.dim() == 3 else g * m
    if g.dim() != 3:
        raise ValueError(f"g must be (N, n) or (N, n1, n2), got shape {tuple(g.shape)}")
    a, b = mats
    out = torch.bmm(a, g) if a.dim() == 3 else g * a.unsqueeze(2)
    return torch.bmm(out, b.mT) if b.dim() == 3 else out * b.unsqueeze(1)


def balance(qs: list[Tensor]) -> None:
    """Rescale factors (in place) to equal max-abs, keeping their product unchanged."""
    if len(qs) < 2:
        return
    norms = torch.stack([q.abs().amax().float() for q in qs])
    if not bool(torch.all(norms > 0)):
        return
    gmean = norms.log().mean().exp()
    for q, n in zip(qs, norms):
        q.mul_((gmean / n).to(q.real.dtype))


def _bound(t: Tensor, scratch: bool = False) -> Tensor:
    """Spectral-norm lower bound (``scratch``: ``t`` is a temporary and may be overwritten)."""
    if t.dim() < 2:
        return t.real.amax().float()
    return norm_lower_bound_herm(t, scratch=scratch).float()


def _moving_max(ell: Tensor, lip: Tensor | None, beta: float) -> Tensor:
    if lip is None:
        return ell
    new = torch.maximum(beta * lip + (1 - beta) * ell, ell)
    lip.copy_(new)
    return new


def update_factors(
    qs: list[Tensor],
    ps: list[Tensor | None],
    lips: Sequence[Tensor | None],
    h: Tensor,
    v: Tensor | None,
    *,
    geometry: str,
    lr: float,
    beta_lip: float,
    do_balance: bool = False,
    pg: Tensor | None = None,
    q_in: bool = False,
    q_out: bool = False,
    fast: bool = False,
) -> None:
    """One fitting step of the factors (in place), with caches refreshed.

    Args:
        qs: stored factors (see the module docstring for the layout per geometry).
        ps: cached ``P_i`` (``None`` where the geometry keeps none).
        lips: float32 0-dim tensors holding the moving-max bound ``L`` (or ``None``:
            use the instantaneous bound).
        h: Hessian-vector product, or the gradient/momentum for whitening.
        v: the probe vector; ``None`` integrates it out (whitening; not for ``"EQ"``).
        geometry: one of :data:`GEOMETRIES`.
        lr: preconditioner step size (normalised, ``0 < lr``; about 0.1).
        beta_lip: forgetting factor of ``L``.
        do_balance: rescale the factors to equal norms first.
        pg: ``P h`` when the caller already has it (matmul geometries, no balancing).
        q_in: ``"EQ"`` only: the dense ``qs`` hold the triangular ``Q_i`` (not ``P_i``),
            so no Cholesky factorisation is needed.
        q_out: ``"EQ"`` only: store the new triangular ``Q_i`` (not ``P_i``) in ``qs``;
            :func:`refresh_p` turns them into ``P_i`` when a ``P_i`` is needed.
        fast: ``"EQ"`` only: Cholesky of the lower factor and the transposed probe solve
            (same mathematics, different rounding; faster on CPU).
    """
    if geometry == "EQ" and v is None:
        raise ValueError("geometry 'EQ' needs a probe vector v")
    wide = torch.promote_types(qs[0].dtype, torch.float32)
    work = [
        _chol_upper(q.to(wide), fast)
        if (geometry == "EQ" and q.dim() == 2 and not q_in)
        else q.to(wide)
        for q in qs
    ]
    if do_balance or geometry == "QEP":
        balance(work)
    h = h.to(wide)
    v = None if v is None else v.to(wide)
    numel = h.numel()
    lips = list(lips) if lips else [None] * len(qs)
    if geometry == "EQ":
        assert v is not None
        a, b = h, v
        for i, q in enumerate(work):
            if a.dim() == 2 and q.dim() == 2:  # A = Q_1 H Q_2^T: triangular products
                a = triu_left_mm(q, a) if i == 0 else triu_right_mm_t(a, q)
            else:
                a = apply_along(q, a, i)
            b = solve_upper_h_along(q, b, i, transposed=fast)
        for i, q in enumerate(work):
            diag = q.dim() < 2
            # dense: the Grams' upper blocks only; their sum is mirrored once (as the sum of
            # two mirrored Grams would be), and T = t1 - t2 is read above the diagonal only
            t1 = unfold_gram(a, i, diag, mirror=False)
            t2 = unfold_gram(b, i, diag, mirror=False)
            both = t1 + t2
            if not diag:
                _linalg._mirror_(both)
            step = lr / _moving_max(_bound(both, True), lips[i], beta_lip).clamp_min(1e-30)
            if diag:
                work[i] = q - step * (t1 - t2) * q
            else:
                # Q <- Q - s triu(T) Q: a product of two upper-triangular matrices
                # (t1 is a fresh Gram matrix: T = t1 - t2 and its triangle in place)
                u = t1.sub_(t2).triu_()
                if q.shape[0] < 2 * _linalg._BLOCK:
                    work[i] = torch.addmm(q, u, q, alpha=-float(step))
                else:
                    work[i] = triu_addmm_(q.clone(), u, q, -float(step))
    else:
        if pg is None or do_balance or geometry == "QEP":
            mats = (
                list(work)
                if geometry == "QUAD"
                else [(q * q.conj()) if q.dim() < 2 else q.mH @ q for q in work]
            )
            pg = precondition(h, mats)
        else:
            pg = pg.to(wide)
        for i, q in enumerate(work):
            diag = q.dim() < 2
            n_i = q.shape[0]
            if geometry == "QEP":
                t1 = unfold_gram(apply_along(q, pg, i), i, diag)
                if v is None:
                    t2 = (numel / n_i) * ((q * q.conj()) if diag else q @ q.mH)
                else:
                    t2 = unfold_gram(apply_along(q, v, i), i, diag)
                step = lr / _moving_max(_bound(t1 + t2), lips[i], beta_lip).clamp_min(1e-30)
                if diag:
                    work[i] = q * (1 - step * (t1 - t2))
                else:
                    work[i] = torch.addmm(q, t1 - t2, q, alpha=-float(step))
                continue
            t1 = unfold_gram(pg, i, diag)
            if v is None:
                c = numel / n_i
                ell = _bound(t1) + c
                f = t1 - c if diag else t1
                if not diag:
                    f.diagonal().sub_(c)  # t1 is a fresh matrix: F = t1 - c I in place
            else:
                t2 = unfold_gram(v, i, diag)
                ell = _bound(t1 + t2)
                f = t1 - t2
            step = lr / _moving_max(ell, lips[i], beta_lip).clamp_min(1e-30)
            if diag:
                gain = 1 - step * f if geometry != "QUAD" else (1 - step * f) ** 2
                work[i] = q * gain
            elif geometry == "QEQ":
                work[i] = torch.addmm(q, q, f, alpha=-float(step))
            elif geometry == "Q0.5EQ1.5":
                nq = torch.addmm(q, f, q, alpha=-float(step))
                procrustes_step(nq)
                work[i] = nq
            else:  # QUAD: P <- (I - s F) P (I - s F) = P - s (X + X^H) + s^2 X F, X = F P
                # A full step s on each side: P moves at the rate that the reference's
                # Q <- (I - s/2 F) Q (I - s/2 F) gives P = Q^2 (a half step per side on P
                # fitted at half that rate and failed the delayed-XOR benchmark).
                s = float(step)
                x = f @ q
                fpf = herm_mm(x, f)  # F P F is Hermitian: half of it is mirrored
                new = fpf.mul_(s * s).add_(q)
                new.sub_(x, alpha=s).sub_(x.mH, alpha=s)
                work[i] = new
    for i, (q, new) in enumerate(zip(qs, work)):
        if geometry == "EQ" and q.dim() == 2 and not q_out:
            _gram_into(q, new, triangular=True)
        else:
            if new is not q:
                q.copy_(new)
            cache = ps[i]
            if cache is not None:
                _gram_into(cache, new)


def _gram_into(out: Tensor, q: Tensor, triangular: bool = False) -> None:
    """``out <- Q^H Q`` (exactly Hermitian; zero blocks skipped for upper-triangular ``q``)."""
    if triangular and out.dtype == q.dtype and out.is_contiguous():
        gram_triu_into(out, q)
    elif triangular:
        tmp = torch.empty_like(q)
        out.copy_(gram_triu_into(tmp, q))
    else:
        out.copy_(herm_mm(q.mH, q))
