"""Low-rank-plus-diagonal (LRA) PSGD: ``Q = (I + U V^T) diag(d)``, ``U, V`` of shape ``n x r``.

``P = Q^T Q`` costs ``O(r n)`` memory and ``O(r n)`` per update; rank 0 is the
diagonal preconditioner. ``Q`` is fitted in the Lie group with ``dQ = E Q``
(Li, "Black box Lie group preconditioners for SGD", arXiv:2211.04422):
``a = Q h``, ``b = Q^{-T} v`` (Woodbury with an ``r x r`` solve),
``d <- d - mu d (P h * h - v * P^{-1} v)``, then ``U`` or ``V`` (alternating) with the
step normalised by ``|a| |V V^T a| + |b| |V V^T b|`` (resp. ``U``). One preconditioner
covers all parameters of a group (flattened).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import check_nonneg
from ._family_base import FamilyBase

__all__ = ["LRANewton", "LRAWhiten"]

_TINY = torch.finfo(torch.float32).tiny


class _LRA(FamilyBase):
    flat = True

    def _unit_init(self, group: dict[str, Any], state: dict[str, Any], g: Tensor) -> None:
        n, r = g.numel(), min(int(group["rank"]), g.numel())
        scale = group["preconditioner_init_scale"]
        if scale is None:
            m4 = g.detach().abs().double().pow(4).mean()
            auto = float(m4.pow(-1.0 / 8)) if float(m4) > 0 else 1.0
            scale = auto if math.isfinite(auto) else 1.0
        dt = group["preconditioner_dtype"] or torch.promote_types(g.dtype, torch.float32)
        gen = self._generator(g.device, -7, 0)
        u = torch.randn(n, r, dtype=dt, device=g.device, generator=gen)
        v = torch.randn(n, r, dtype=dt, device=g.device, generator=gen)
        s = 0.1 / math.sqrt(max(n, 1))
        state["U"], state["V"] = u * s, v * s
        state["d"] = torch.full((n,), float(scale), dtype=dt, device=g.device)
        state["L"] = torch.zeros((), dtype=torch.float32, device=g.device)

    def _unit_apply(self, group: dict[str, Any], state: dict[str, Any], x: Tensor) -> Tensor:
        u, v, d = state["U"], state["V"], state["d"]
        y = d * x.to(d.dtype)
        y = y + u @ (v.T @ y)
        y = y + v @ (u.T @ y)
        return (d * y).to(x.dtype)

    def _unit_update(
        self,
        group: dict[str, Any],
        state: dict[str, Any],
        h: Tensor,
        vec: Tensor | None,
        balance: bool,
    ) -> None:
        assert vec is not None
        U, V, d, lip = state["U"], state["V"], state["d"], state["L"]
        wide = torch.float32 if U.dtype in (torch.float16, torch.bfloat16) else U.dtype
        u, v_, dd = U.to(wide), V.to(wide), d.to(wide)
        h, vec = h.to(wide), vec.to(wide)
        r = u.shape[1]
        if balance and r > 0:
            nu, nv = torch.linalg.vector_norm(u), torch.linalg.vector_norm(v_)
            if bool(nu > 0) and bool(nv > 0):
                rho = torch.sqrt(nu / nv)
                u, v_ = u / rho, v_ * rho
        dh = dd * h
        qh = dh + u @ (v_.T @ dh)  # a = Q h
        ph = dd * (qh + v_ @ (u.T @ qh))  # P h
        eye = torch.eye(r, dtype=wide, device=h.device)
        ip = eye + v_.T @ u  # I + V^T U  (r x r)
        b = vec / dd
        if r > 0:
            b = b - v_ @ torch.linalg.solve(ip.T, u.T @ b)  # Q^{-T} v
            inv_pv = b - u @ torch.linalg.solve(ip, v_.T @ b)
        else:
            inv_pv = b
        inv_pv = inv_pv / dd  # P^{-1} v
        grad_d = ph * h - vec * inv_pv
        ell = torch.sqrt((ph * ph + vec * vec) * (h * h + inv_pv * inv_pv)).amax().float()
        beta = group["beta_lipschitz"]
        lip.copy_(torch.maximum(beta * lip + (1 - beta) * ell, ell))
        lr = group["lr_preconditioner"]
        dd = dd - (lr / lip.clamp_min(1e-30)).to(wide) * dd * grad_d
        a = qh
        if r > 0:
            if int(state["step"]) % 2 == 0:
                atv, btv = a @ v_, b @ v_
                norm = torch.linalg.vector_norm(a) * torch.linalg.vector_norm(
                    v_ @ atv
                ) + torch.linalg.vector_norm(b) * torch.linalg.vector_norm(v_ @ btv)
                mu = lr / (norm + _TINY)
                u = u - mu * (torch.outer(a, atv @ ip) - torch.outer(b, btv @ ip))
            else:
                atu, btu = a @ u, b @ u
                norm = torch.linalg.vector_norm(a) * torch.linalg.vector_norm(
                    u @ atu
                ) + torch.linalg.vector_norm(b) * torch.linalg.vector_norm(u @ btu)
                mu = lr / (norm + _TINY)
                v_ = v_ - mu * (torch.outer(a + v_ @ atu, atu) - torch.outer(b + v_ @ btu, btu))
        U.copy_(u.to(U.dtype))
        V.copy_(v_.to(V.dtype))
        d.copy_(dd.to(d.dtype))

    def preconditioner(self, param: Tensor) -> Tensor:
        """The dense ``P`` of the group that ``param`` heads (small problems only)."""
        state = self.state[param]
        n = state["d"].numel()
        eye = torch.eye(n, dtype=state["d"].dtype, device=state["d"].device)
        return torch.stack([self._unit_apply(self.param_groups[0], state, e) for e in eye], dim=1)


def _defaults(
    lr: float, lr_preconditioner: float, momentum: float, prob: Any, rank: int,
    scale: float | None, beta: float, damping: float, wd: float, max_rms: float,
    max_amp: float, dtype: torch.dtype | None, hvp_method: str, whiten_momentum: bool,
) -> dict[str, Any]:  # fmt: skip
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    check_nonneg("rank", rank)
    return dict(
        lr=lr,
        lr_preconditioner=lr_preconditioner,
        momentum=momentum,
        preconditioner_update_probability=prob,
        rank=rank,
        preconditioner_init_scale=scale,
        geometry="EQ",
        beta_lipschitz=beta,
        damping=damping,
        weight_decay=wd,
        grad_clip_max_rms=max_rms,
        grad_clip_max_amp=max_amp,
        preconditioner_dtype=dtype,
        hvp_method=hvp_method,
        whiten_momentum=whiten_momentum,
    )


class LRAWhiten(_LRA):
    """Gradient/momentum whitening with the LRA preconditioner (``P -> (E[g g^T])^{-1/2}``).

    Args:
        params: parameters or groups (one preconditioner per group).
        lr, lr_preconditioner, momentum, preconditioner_update_probability: as
            :class:`psgd.KronWhiten`.
        rank: rank ``r`` of ``U`` and ``V`` (0: diagonal preconditioner).
        preconditioner_init_scale: initial ``d``; None: from the first gradient.
        beta_lipschitz, damping, weight_decay, grad_clip_max_rms, grad_clip_max_amp,
            preconditioner_dtype, whiten_momentum, distributed: as :class:`psgd.KronWhiten`.
    """

    newton = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.001,
        lr_preconditioner: float = 0.1,
        momentum: float = 0.0,
        preconditioner_update_probability: float | Callable[[int], Any] | None = 1.0,
        *,
        rank: int = 10,
        preconditioner_init_scale: float | None = None,
        beta_lipschitz: float = 0.9,
        damping: float = 1e-9,
        weight_decay: float = 0.0,
        grad_clip_max_rms: float = math.inf,
        grad_clip_max_amp: float = math.inf,
        preconditioner_dtype: torch.dtype | None = None,
        whiten_momentum: bool = False,
        distributed: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            _defaults(
                lr,
                lr_preconditioner,
                momentum,
                preconditioner_update_probability,
                rank,
                preconditioner_init_scale,
                beta_lipschitz,
                damping,
                weight_decay,
                grad_clip_max_rms,
                grad_clip_max_amp,
                preconditioner_dtype,
                "autograd",
                whiten_momentum,
            ),
            distributed,
        )


class LRANewton(_LRA):
    """Newton-type PSGD with the LRA preconditioner (``P -> |H|^{-1}``).

    ``step(closure)`` needs a closure returning the loss (no ``backward``); ``H v``
    by double backward or finite differences (``hvp_method="fd"``, or automatically
    when second derivatives are unavailable). Arguments as :class:`LRAWhiten`; under
    ``torch.distributed`` as :class:`KronNewton`.
    """

    newton = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.001,
        lr_preconditioner: float = 0.1,
        momentum: float = 0.0,
        preconditioner_update_probability: float | Callable[[int], Any] | None = 1.0,
        *,
        rank: int = 10,
        preconditioner_init_scale: float | None = None,
        beta_lipschitz: float = 0.9,
        damping: float = 1e-9,
        weight_decay: float = 0.0,
        grad_clip_max_rms: float = math.inf,
        grad_clip_max_amp: float = math.inf,
        preconditioner_dtype: torch.dtype | None = None,
        hvp_method: str = "autograd",
        distributed: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            _defaults(
                lr,
                lr_preconditioner,
                momentum,
                preconditioner_update_probability,
                rank,
                preconditioner_init_scale,
                beta_lipschitz,
                damping,
                weight_decay,
                grad_clip_max_rms,
                grad_clip_max_amp,
                preconditioner_dtype,
                hvp_method,
                False,
            ),
            distributed,
        )
