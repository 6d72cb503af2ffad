"""Layer-wise curvature blocks: ``Kron`` (K-FAC), ``Diag``, ``Full`` and ``Unit``.

Each block owns the parameters of one module and knows how to

* ``estimate`` a new curvature from the records of a step (``(1/B) sum_i g_i g_i^T``
  with the per-example gradients ``g_i`` of the chosen curvature type),
* ``hessian`` it exactly from a gradient built with ``create_graph=True``,
* ``inverse`` the damped curvature and ``precondition`` gradients with it,
* ``sample`` Gaussian noise with covariance ``scale * (curvature + damping)^-1``
  (used by :class:`torchsso.optim.VIOptimizer`).

Damping of ``Kron`` is factored: ``(A + pi sqrt(l) I) (x) (G + sqrt(l)/pi I)`` with
``pi = sqrt((tr A / dim A) / (tr G / dim G))`` (``pi_type="trace_norm"``, Martens &
Grosse 2015) or ``pi = 1``; with ``inverse_method="eigh"`` the exact Tikhonov damping
``(A (x) G + l I)^-1`` is applied through both eigendecompositions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from optcore.linalg import damped_inverse, safe_eigh

from .capture import Record
from .layers import kron_input, kron_output, matrix_grad, per_example_grads, split_matrix

__all__ = [
    "Diag",
    "Full",
    "Kron",
    "LayerCurvature",
    "Unit",
    "damped_factor",
    "fast_damped_inverse",
]


class LayerCurvature:
    """Curvature block of one module.

    Args:
        name: the module's qualified name (for messages).
        module: the module.
        names: names of its parameters covered by this block.
        params: the parameters themselves.
        bdim: batch dimension of the module's inputs.
    """

    shape = "Diag"

    def __init__(
        self, name: str, module: nn.Module, names: list[str], params: list[nn.Parameter], bdim: int
    ) -> None:
        self.name = name
        self.module = module
        self.names = names
        self.params = params
        self.bdim = bdim
        self.numel = sum(p.numel() for p in params)

    # -- estimation -------------------------------------------------------------
    def _per_example(self, records: list[Record]):
        for rec in records:
            for g, w in rec.grads:
                yield per_example_grads(self.module, self.names, rec, g, self.bdim), w

    def estimate(self, records: list[Record]) -> dict[str, Tensor] | None:
        """New curvature estimate from a step's records (``None`` if nothing was recorded)."""
        raise NotImplementedError

    def hessian(self, grads: list[Tensor]) -> dict[str, Tensor]:
        """Exact block Hessian from gradients that carry a graph (``create_graph=True``)."""
        flat = torch.cat([g.reshape(-1) for g in grads])
        eye = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
        rows = torch.autograd.grad(flat, self.params, eye, is_grads_batched=True, retain_graph=True)
        H = torch.cat([r.reshape(flat.numel(), -1) for r in rows], dim=1).detach()
        H = 0.5 * (H + H.T)
        return self._from_full(H)

    def _from_full(self, F: Tensor) -> dict[str, Tensor]:
        raise ValueError(f"curvature shape {self.shape!r} cannot be built from a full matrix")

    # -- inversion / preconditioning ---------------------------------------------
    def inverse(self, f: dict[str, Tensor], damping: float, opts: dict) -> dict[str, Tensor]:
        raise NotImplementedError

    def precondition(self, inv: dict[str, Tensor], grads: list[Tensor]) -> list[Tensor]:
        raise NotImplementedError

    def precondition_dot(
        self, inv: dict[str, Tensor], grads: list[Tensor]
    ) -> tuple[list[Tensor], Tensor]:
        """:meth:`precondition` and the dot product ``sum(u . g)`` of its result with ``grads``."""
        out = self.precondition(inv, grads)
        return out, sum((u * g).sum() for u, g in zip(out, grads))  # type: ignore[return-value]

    def lowrank_max_rows(self, solve: bool) -> int:
        """The most rows (examples x positions) for which :meth:`precondition_dot_lowrank`
        is cheaper than :meth:`precondition_dot` (``solve``: with Cholesky factors, else
        with explicit inverses); ``-1``: not available for this block."""
        return -1

    def precondition_dot_lowrank(
        self,
        inv: dict[str, Tensor],
        grads: list[Tensor],
        x: Tensor,
        delta: Tensor,
        probe: Tensor,
    ) -> tuple[list[Tensor], Tensor] | None:
        """:meth:`precondition_dot` from the step's recorded rows (input ``x``, loss gradient
        ``delta`` of the output) where the block supports it; ``None``: not available."""
        return None

    def sample(
        self, inv: dict[str, Tensor], scale: float, gen: torch.Generator | None
    ) -> list[Tensor]:
        """Noise with covariance ``scale * (damped curvature)^-1`` per parameter."""
        raise NotImplementedError

    def quad(self, f: dict[str, Tensor], vs: list[Tensor]) -> Tensor:
        """``v^T C v`` for the (undamped) curvature ``C`` given by the factors ``f``."""
        raise NotImplementedError

    def init_factors(self, precision: float) -> dict[str, Tensor]:
        """Curvature equal to ``precision * I`` (a starting point for variational inference)."""
        p0 = self.params[0]
        return {"diag": torch.full((self.numel,), precision, dtype=p0.dtype, device=p0.device)}

    def cost(self) -> float:
        """Relative cost of :meth:`inverse` (for assigning work to ranks)."""
        return float(self.numel)

    def _split(self, flat: Tensor) -> list[Tensor]:
        out, i = [], 0
        for p in self.params:
            out.append(flat[i : i + p.numel()].view_as(p))
            i += p.numel()
        return out


def _randn(shape, like: Tensor, gen: torch.Generator | None) -> Tensor:
    """Standard normal draws of ``like``'s dtype on ``like``'s device.

    A generator on another device (the optimizers' generators live on the host) draws
    on its own device and the draws are moved, so a seed gives the same noise on the
    CPU and on an accelerator (``torch.randn`` refuses a generator of another device).
    """
    if gen is None or gen.device == like.device:
        return torch.randn(shape, generator=gen, dtype=like.dtype, device=like.device)
    return torch.randn(shape, generator=gen, dtype=like.dtype, device=gen.device).to(like.device)


class Diag(LayerCurvature):
    """Diagonal curvature: the mean of squared per-example gradients."""

    shape = "Diag"

    def estimate(self, records: list[Record]) -> dict[str, Tensor] | None:
        m = self.module
        acc: Tensor | None = None
        n = 0
        for rec in records:
            if not rec.grads:
                continue
            n += 1
            x = rec.inputs[0] if rec.inputs else None
            for g, w in rec.grads:
                if isinstance(m, nn.Linear) and isinstance(x, Tensor) and x.dim() == 2:
                    d = [((g * g).T @ (x * x)).reshape(-1)]
                    if len(self.names) > 1:
                        d.append((g * g).sum(0))
                    est = torch.cat(d) / g.shape[0]
                else:
                    J = per_example_grads(m, self.names, rec, g, self.bdim)
                    est = (J * J).mean(0)
                acc = est * w if acc is None else acc + est * w
        return None if acc is None else {"diag": acc / n}

    def _from_full(self, F: Tensor) -> dict[str, Tensor]:
        return {"diag": torch.diagonal(F).clone()}

    def inverse(self, f: dict[str, Tensor], damping: float, opts: dict) -> dict[str, Tensor]:
        return {"diag_inv": 1.0 / (f["diag"] + damping)}

    def precondition(self, inv: dict[str, Tensor], grads: list[Tensor]) -> list[Tensor]:
        flat = torch.cat([g.reshape(-1) for g in grads])
        return self._split(flat * inv["diag_inv"])

    def quad(self, f: dict[str, Tensor], vs: list[Tensor]) -> Tensor:
        flat = torch.cat([v.reshape(-1) for v in vs])
        return (f["diag"] * flat * flat).sum()

    def sample(
        self, inv: dict[str, Tensor], scale: float, gen: torch.Generator | None
    ) -> list[Tensor]:
        d = inv["diag_inv"]
        return self._split(_randn(d.shape, d, gen) * torch.sqrt(scale * d))


class Full(LayerCurvature):
    """Full block: ``(1/B) sum_i J_i J_i^T`` over per-example gradients (small layers)."""

    shape = "Full"

    def estimate(self, records: list[Record]) -> dict[str, Tensor] | None:
        acc: Tensor | None = None
        n = 0
        for rec in records:
            if not rec.grads:
                continue
            n += 1
            for g, w in rec.grads:
                J = per_example_grads(self.module, self.names, rec, g, self.bdim)
                est = J.T @ J / J.shape[0]
                acc = est * w if acc is None else acc + est * w
        return None if acc is None else {"F": acc / n}

    def _from_full(self, F: Tensor) -> dict[str, Tensor]:
        return {"F": F}

    def init_factors(self, precision: float) -> dict[str, Tensor]:
        p0 = self.params[0]
        return {"F": precision * torch.eye(self.numel, dtype=p0.dtype, device=p0.device)}

    def inverse(self, f: dict[str, Tensor], damping: float, opts: dict) -> dict[str, Tensor]:
        Finv = fast_damped_inverse(f["F"], damping)
        out = {"F_inv": Finv}
        if opts.get("chol"):
            out["F_chol"] = torch.linalg.cholesky(0.5 * (Finv + Finv.T))
        return out

    def precondition(self, inv: dict[str, Tensor], grads: list[Tensor]) -> list[Tensor]:
        flat = torch.cat([g.reshape(-1) for g in grads])
        return self._split(inv["F_inv"] @ flat)

    def quad(self, f: dict[str, Tensor], vs: list[Tensor]) -> Tensor:
        flat = torch.cat([v.reshape(-1) for v in vs])
        return flat @ (f["F"] @ flat)

    def sample(
        self, inv: dict[str, Tensor], scale: float, gen: torch.Generator | None
    ) -> list[Tensor]:
        L = inv["F_chol"]  # Cholesky factor of the inverse: L L^T = F^-1
        return self._split(math.sqrt(scale) * (L @ _randn(L.shape[0], L, gen)))

    def cost(self) -> float:
        return float(self.numel) ** 3


class Unit(LayerCurvature):
    """Unit-wise blocks for BatchNorm / LayerNorm: one 2x2 block per (weight_c, bias_c)."""

    shape = "Unit"

    def estimate(self, records: list[Record]) -> dict[str, Tensor] | None:
        acc: Tensor | None = None
        n = 0
        k = self.params[0].numel()
        for rec in records:
            if not rec.grads:
                continue
            n += 1
            for g, w in rec.grads:
                J = per_example_grads(self.module, self.names, rec, g, self.bdim)
                u = torch.stack([J[:, :k], J[:, k:]], dim=2)  # (B, C, 2)
                est = torch.einsum("bci,bcj->cij", u, u) / J.shape[0]
                acc = est * w if acc is None else acc + est * w
        return None if acc is None else {"U": acc / n}

    def init_factors(self, precision: float) -> dict[str, Tensor]:
        p0 = self.params[0]
        eye = torch.eye(2, dtype=p0.dtype, device=p0.device)
        return {"U": precision * eye.expand(p0.numel(), 2, 2).clone()}

    def inverse(self, f: dict[str, Tensor], damping: float, opts: dict) -> dict[str, Tensor]:
        U = f["U"] + damping * torch.eye(2, dtype=f["U"].dtype, device=f["U"].device)
        return {"U_inv": torch.linalg.inv(U)}

    def precondition(self, inv: dict[str, Tensor], grads: list[Tensor]) -> list[Tensor]:
        v = torch.stack([grads[0].reshape(-1), grads[1].reshape(-1)], dim=1)
        out = torch.einsum("cij,cj->ci", inv["U_inv"], v)
        return [out[:, 0].view_as(grads[0]), out[:, 1].view_as(grads[1])]

    def quad(self, f: dict[str, Tensor], vs: list[Tensor]) -> Tensor:
        v = torch.stack([vs[0].reshape(-1), vs[1].reshape(-1)], dim=1)
        return torch.einsum("ci,cij,cj->", v, f["U"], v)

    def sample(
        self, inv: dict[str, Tensor], scale: float, gen: torch.Generator | None
    ) -> list[Tensor]:
        Ui = inv["U_inv"]
        L = torch.linalg.cholesky(0.5 * (Ui + Ui.transpose(1, 2)))
        e = _randn(Ui.shape[:2], Ui, gen)
        out = math.sqrt(scale) * torch.einsum("cij,cj->ci", L, e)
        return [out[:, 0].view_as(self.params[0]), out[:, 1].view_as(self.params[1])]


def fast_damped_inverse(A: Tensor, damping: float) -> Tensor:
    """``(A + damping I)^-1`` by one Cholesky; falls back to :func:`optcore.linalg.damped_inverse`
    (symmetrize, float64 retry, eigh) when the factorization fails or is not finite."""
    M = A.clone()
    M.diagonal().add_(damping)
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        inv = torch.cholesky_inverse(L)
        if math.isfinite(float(inv.sum())):
            return inv
    return damped_inverse(A, damping)


def damped_factor(A: Tensor, damping: float) -> tuple[Tensor, bool]:
    """Lower Cholesky factor ``L`` of ``A + damping I`` and ``True``; when the factorization
    fails or is not finite, the explicit inverse ``(A + damping I)^-1`` from
    :func:`optcore.linalg.damped_inverse` (float64 retry, eigh) and ``False``."""
    n = A.shape[0]
    if _pad(n):
        # factor diag(A + damping I, 1) instead: LAPACK's blocked Cholesky is about 25%
        # slower on sizes that are multiples of 64 (cache-set conflicts of the columns)
        M = torch.nn.functional.pad(A, (0, 1, 0, 1))
        M[n, n] = 1.0
    else:
        M = A.clone()
    M.diagonal()[:n].add_(damping)
    L, info = torch.linalg.cholesky_ex(M)
    # LAPACK reports NaN pivots as failures, and the curvature update has already checked
    # the factors for non-finite entries; a non-finite preconditioned gradient is still
    # caught (and the damping raised) by the optimizer
    if int(info) == 0:
        # the block keeps LAPACK's column-major layout (L.mT contiguous, as unpadded
        # factors come): a same-layout copy, about 5x cheaper than a transposing one, and
        # the triangular solves take it without a further copy
        return (L[:n, :n].mT.contiguous().mT if _pad(n) else L), True
    return damped_inverse(A, damping), False


def _pad(n: int) -> bool:
    return n >= 128 and n % 64 == 0


def _solve_right(X: Tensor, F: Tensor, chol: bool) -> Tensor:
    """``X M^-1`` for the damped factor ``M`` given as its Cholesky factor ``F`` (two
    right-sided triangular solves, ``X L^-T L^-1``) or as its explicit inverse."""
    if not chol:
        return X @ F
    if X.shape[0] <= 16:
        # few rows (a small output layer): left-sided solves on X^T, about twice as fast
        # in LAPACK for such thin right-hand sides; right-sided ones win from ~32 rows on
        Y = torch.linalg.solve_triangular(F, X.T, upper=False)
        return torch.linalg.solve_triangular(F.T, Y, upper=True).T
    X = torch.linalg.solve_triangular(F.T, X, upper=True, left=False)
    return torch.linalg.solve_triangular(F, X, upper=False, left=False)


def _half_solve(X: Tensor, L: Tensor, trans: bool) -> Tensor:
    """``X L^-T`` (``trans``) or ``X L^-1`` for a lower triangular ``L``: right-sided
    triangular solves, or left-sided ones on ``X^T`` for thin ``X`` (as :func:`_solve_right`)."""
    if X.shape[0] <= 16:
        if trans:
            return torch.linalg.solve_triangular(L, X.T, upper=False).T
        return torch.linalg.solve_triangular(L.T, X.T, upper=True).T
    if trans:
        return torch.linalg.solve_triangular(L.T, X, upper=True, left=False)
    return torch.linalg.solve_triangular(L, X, upper=False, left=False)


def _chol_solve_right(X: Tensor, L: Tensor) -> Tensor:
    """``X (L L^T)^-1``."""
    return _half_solve(_half_solve(X, L, True), L, False)


# relative tolerance of the check that a layer's gradient is the product of the recorded
# rows (float32 rounding of the two products is ~1e-6 relative)
LOWRANK_RTOL = 1e-4


def _pi(A_tr: Tensor, A_dim: int, G_tr: Tensor, G_dim: int, pi_type: str) -> float:
    if pi_type != "trace_norm":
        return 1.0
    a, g = float(A_tr) / A_dim, float(G_tr) / G_dim
    if not (a > 0 and g > 0 and math.isfinite(a) and math.isfinite(g)):
        return 1.0
    return math.sqrt(a / g)


DAMPING_SPLITS = ("sqrt", "tikhonov")


def _split_damping(
    a_tr: Tensor, a_dim: int, g_tr: Tensor, g_dim: int, damping: float, opts: dict
) -> tuple[float, float]:
    """Damping ``(pi d, d / pi)`` added to ``A`` and ``G`` under factored damping.

    ``damping_split="sqrt"`` (Martens & Grosse 2015): ``d = sqrt(damping)``, so that the
    damped product is ``A (x) G + damping I`` plus the cross terms
    ``d (pi I (x) G + A (x) I / pi)``, which over-damp when ``damping`` is small next to
    the curvature. ``"tikhonov"``: ``d = sqrt(s^2 + damping) - s`` with
    ``s = (pi g + a / pi) / 2`` (``a = tr A / dim A``, ``g = tr G / dim G``), the ``d``
    for which the damped product at the trace means, ``(a + pi d)(g + d / pi)``, is
    exactly ``a g + damping`` as under Tikhonov damping ``A (x) G + damping I``; it is
    ``sqrt(damping)`` again when ``damping >> a g``.
    """
    pi = _pi(a_tr, a_dim, g_tr, g_dim, opts.get("pi_type", "trace_norm"))
    if opts.get("damping_split", "sqrt") == "tikhonov":
        a, g = float(a_tr) / a_dim, float(g_tr) / g_dim
        s = 0.5 * (pi * g + a / pi)
        if s > 0 and math.isfinite(s):
            d = damping / (s + math.sqrt(s * s + damping)) if damping > 0 else 0.0
            return pi * d, d / pi
    r = math.sqrt(damping)
    return pi * r, r / pi


def _pi_damping(A: Tensor, G: Tensor, damping: float, opts: dict) -> tuple[float, float]:
    """Damping added to ``A`` and to ``G`` under factored (pi) damping of ``A (x) G``
    (see :func:`_split_damping`)."""
    return _split_damping(torch.trace(A), A.shape[0], torch.trace(G), G.shape[0], damping, opts)


def _kron_inverses(A: Tensor, G: Tensor, da: float, dg: float, chol: bool) -> dict[str, Tensor]:
    """``{"A_inv", "G_inv"}`` of the damped factors, and their Cholesky factors
    ``{"A_chol", "G_chol"}`` (of the symmetrized factors) when ``chol``."""
    out = {"A_inv": fast_damped_inverse(A, da), "G_inv": fast_damped_inverse(G, dg)}
    if chol:
        eyeA = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        eyeG = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        out["A_chol"] = torch.linalg.cholesky(0.5 * (A + A.T) + da * eyeA)
        out["G_chol"] = torch.linalg.cholesky(0.5 * (G + G.T) + dg * eyeG)
    return out


class Kron(LayerCurvature):
    """K-FAC block ``A (x) G`` for ``Linear``, ``Conv1d/2d`` and ``Embedding``.

    For ``Embedding`` the input factor is diagonal (token frequencies).
    """

    shape = "Kron"

    @property
    def embedding(self) -> bool:
        return isinstance(self.module, nn.Embedding)

    def estimate(self, records: list[Record]) -> dict[str, Tensor] | None:
        m = self.module
        A: Tensor | None = None
        G: Tensor | None = None
        n = 0
        for rec in records:
            if not rec.grads:
                continue
            n += 1
            x = rec.inputs[0]
            if self.embedding:
                assert isinstance(m, nn.Embedding)
                counts = torch.bincount(x.reshape(-1), minlength=m.num_embeddings)
                Ai = counts.to(self.params[0].dtype) / x.numel()
            else:
                a, _ = kron_input(m, x)
                Ai = torch.mm(a.T, a).div_(a.shape[0])
            Gi: Tensor | None = None
            for g, w in rec.grads:
                rows = g.reshape(-1, g.shape[-1]) if self.embedding else kron_output(m, g)
                est = torch.mm(rows.T, rows).mul_(w / g.shape[0])
                Gi = est if Gi is None else Gi + est
            assert Gi is not None
            A = Ai if A is None else A + Ai
            G = Gi if G is None else G + Gi
        if A is None or G is None:
            return None
        if n == 1:  # one record (the usual case): the sums are the means
            return {"A": A, "G": G}
        return {"A": A / n, "G": G / n}

    def init_factors(self, precision: float) -> dict[str, Tensor]:
        w = self.params[0]
        r = math.sqrt(precision)
        dt, dev = w.dtype, w.device
        if self.embedding:
            return {
                "A": torch.full((w.shape[0],), r, dtype=dt, device=dev),
                "G": r * torch.eye(w.shape[1], dtype=dt, device=dev),
            }
        k = w[0].numel() + (1 if len(self.params) > 1 else 0)
        return {
            "A": r * torch.eye(k, dtype=dt, device=dev),
            "G": r * torch.eye(w.shape[0], dtype=dt, device=dev),
        }

    def inverse(self, f: dict[str, Tensor], damping: float, opts: dict) -> dict[str, Tensor]:
        A, G = f["A"], f["G"]
        if self.embedding:
            da, dg = _split_damping(A.sum(), A.numel(), torch.trace(G), G.shape[0], damping, opts)
            out = {"A_inv": 1.0 / (A + da), "G_inv": fast_damped_inverse(G, dg)}
            if opts.get("chol"):
                out["G_chol"] = torch.linalg.cholesky(
                    G + dg * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
                )
            return out
        if opts.get("inverse_method", "cholesky") == "eigh" and not opts.get("chol"):
            la, qa = safe_eigh(A)
            lg, qg = safe_eigh(G)
            scale = 1.0 / (lg.clamp_min(0).unsqueeze(1) * la.clamp_min(0).unsqueeze(0) + damping)
            return {"QA": qa, "QG": qg, "S": scale}
        da, dg = _pi_damping(A, G, damping, opts)
        if opts.get("solve") and not opts.get("chol"):
            # used once: keep the Cholesky factors and apply them by triangular solves
            # (O(n^2 m)) instead of forming the inverses (a further O(n^3) each)
            fa, ca = damped_factor(A, da)
            fg, cg = damped_factor(G, dg)
            flags = torch.tensor([float(ca), float(cg)], dtype=A.dtype, device=A.device)
            return {"A_fac": fa, "G_fac": fg, "fac_is_chol": flags}
        return _kron_inverses(A, G, da, dg, bool(opts.get("chol")))

    def precondition(self, inv: dict[str, Tensor], grads: list[Tensor]) -> list[Tensor]:
        return self.precondition_dot(inv, grads)[0]

    def precondition_dot(
        self, inv: dict[str, Tensor], grads: list[Tensor]
    ) -> tuple[list[Tensor], Tensor]:
        if self.embedding:
            out = (grads[0] * inv["A_inv"].unsqueeze(1)) @ inv["G_inv"]
            return [out], torch.vdot(out.reshape(-1), grads[0].reshape(-1))
        V = matrix_grad(self.module, grads)
        if "S" in inv:
            qa, qg = inv["QA"], inv["QG"]
            U = qg @ ((qg.T @ V @ qa) * inv["S"]) @ qa.T
        elif "A_fac" in inv:
            # G^-1 V A^-1 = ((V A^-1)^T G^-1)^T, A and G symmetric: right-sided solves only,
            # which LAPACK runs about twice as fast as left-sided ones here
            ca, cg = inv["fac_is_chol"].tolist()
            X = _solve_right(V, inv["A_fac"], bool(ca))
            U = _solve_right(X.T, inv["G_fac"].T if not cg else inv["G_fac"], bool(cg)).T
        else:
            U = inv["G_inv"] @ V @ inv["A_inv"]
        return split_matrix(self.module, U, grads), (U * V).sum()

    def lowrank_max_rows(self, solve: bool) -> int:
        m = self.module
        if not isinstance(m, nn.Linear) or self.embedding:
            return -1
        k, out = m.in_features + (m.bias is not None), m.out_features
        if solve:
            # triangular-solve work (rows x n^2 per solve, two per factor) of both forms,
            # the product (G^-1 D^T) (X_a A^-1) at half weight (GEMM runs about twice as
            # fast), with a margin for the check and the extra records
            return int(0.8 * out * k * (k + out) / (k * k + out * out + out * k / 2))
        return int(0.85 * out * k * (k + out) / (k * k + out * out + out * k))  # GEMM work

    def precondition_dot_lowrank(
        self,
        inv: dict[str, Tensor],
        grads: list[Tensor],
        x: Tensor,
        delta: Tensor,
        probe: Tensor,
    ) -> tuple[list[Tensor], Tensor] | None:
        """:meth:`precondition_dot` for a ``Linear`` layer whose gradient is the product
        ``V = D^T X_a`` of the rows recorded in this step (``D``: the gradients of the loss
        w.r.t. the layer outputs, ``X_a``: the inputs with a ones column for the bias), when
        that is cheaper: with ``r`` rows (the batch) fewer than the layer's sizes,
        ``G^-1 V A^-1 = (G^-1 D^T) (X_a A^-1)`` needs triangular solves with ``r`` right-hand
        sides per factor (instead of ``k`` and ``out``), or products with ``r`` rows with
        the explicit inverses, and one product of the two.

        Returns ``None`` (the caller takes the general path) unless the inverses are
        Cholesky factors or explicit inverses, the rows are there and fewer than
        :meth:`lowrank_max_rows`, and the gradient really is that product:
        ``V z = D^T (X_a z)`` is checked for the random vector ``probe`` (length ``k``;
        Freivalds' test, to :data:`LOWRANK_RTOL`), so a gradient changed after the backward
        pass (clipping, weight tying, accumulation) is never preconditioned through stale
        rows."""
        m = self.module
        solve = "A_fac" in inv
        if not (solve or "A_inv" in inv) or x.dim() == 0:
            return None
        r = x.numel() // max(x.shape[-1], 1)
        if not 0 < r <= self.lowrank_max_rows(solve):
            return None
        V = matrix_grad(m, grads)
        out = V.shape[0]
        if x.dtype != V.dtype or delta.dtype != V.dtype or delta.numel() != r * out:
            return None
        if solve and inv["fac_is_chol"].tolist() != [1.0, 1.0]:
            return None
        a, _ = kron_input(m, x)
        d = kron_output(m, delta)
        z = probe.to(dtype=V.dtype, device=V.device)
        lhs = V @ z
        err = torch.linalg.vector_norm(lhs - d.T @ (a @ z))
        if not bool(err <= LOWRANK_RTOL * torch.linalg.vector_norm(lhs)):  # NaN: False
            return None
        if solve:
            P = _chol_solve_right(d, inv["G_fac"]).T  # G^-1 D^T, (out, r)
            Q = _chol_solve_right(a, inv["A_fac"])  # X_a A^-1, (r, k)
        else:
            P, Q = inv["G_inv"] @ d.T, a @ inv["A_inv"]
        U = P @ Q
        return split_matrix(m, U, grads), (U * V).sum()

    def quad(self, f: dict[str, Tensor], vs: list[Tensor]) -> Tensor:
        # vec(V)^T (A (x) G) vec(V) = tr(V^T G V A)
        if self.embedding:
            V = vs[0]
            return ((V * f["A"].unsqueeze(1)) * (V @ f["G"])).sum()
        V = matrix_grad(self.module, vs)
        return ((f["G"] @ V) * (V @ f["A"])).sum()

    def sample(
        self, inv: dict[str, Tensor], scale: float, gen: torch.Generator | None
    ) -> list[Tensor]:
        s = math.sqrt(scale)
        LG = inv["G_chol"]
        if self.embedding:
            E = _randn(self.params[0].shape, LG, gen) * inv["A_inv"].sqrt().unsqueeze(1)
            return [s * torch.linalg.solve_triangular(LG, E, upper=False, left=False)]
        LA = inv["A_chol"]
        E = _randn((LG.shape[0], LA.shape[0]), LG, gen)
        X = torch.linalg.solve_triangular(LG.T, E, upper=True)
        X = torch.linalg.solve_triangular(LA, X, upper=False, left=False)
        return split_matrix(self.module, s * X, [p for p in self.params])

    def cost(self) -> float:
        if self.embedding:
            return float(self.params[0].shape[1]) ** 3
        w = self.params[0]
        k = w[0].numel() + (1 if len(self.params) > 1 else 0)
        return float(k) ** 3 + float(w.shape[0]) ** 3
