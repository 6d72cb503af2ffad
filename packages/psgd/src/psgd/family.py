"""Kronecker-product and dense PSGD preconditioners, whitening and Newton.

* :class:`KronWhiten`: ``P = (E[g g^H])^{-1/2}`` fitted per parameter with a
  Kronecker-factored ``Q`` (gradient or momentum whitening).
* :class:`KronNewton`: ``P = |H|^{-1}`` fitted from Hessian-vector products.
* :class:`DenseNewton`: one dense ``Q`` over all parameters of a group (a Kron
  preconditioner with a single dense factor).

Q update geometries (``geometry=``): ``"EQ"`` (``dQ = E Q``, triangular ``Q``,
triangular solves), ``"QEP"`` (``dQ = Q E P``), ``"QEQ"`` (``dQ = Q E Q``),
``"Q0.5EQ1.5"`` (``dQ = Q^0.5 E Q^1.5`` with a Procrustes step keeping ``Q``
symmetric positive definite; matmul only) and ``"QUAD"`` (fits ``P`` directly
with a quadratic form that keeps it positive definite).

Reference: X.-L. Li, psgd_torch; "Stochastic Hessian fittings with Lie groups",
arXiv:2402.11858.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from . import factors as F
from ._family_base import FamilyBase

__all__ = ["DenseNewton", "KronNewton", "KronWhiten"]


def _family_defaults(**kw: Any) -> dict[str, Any]:
    return kw


class _KronFamily(FamilyBase):
    """Shared Kron-factor logic (per parameter, or one dense factor over a flat group)."""

    def _shape_dense(
        self, group: dict[str, Any], n: tuple[int, ...]
    ) -> tuple[tuple[int, ...], tuple[bool, ...]]:
        if self.flat:
            return (math.prod(n),), (True,)
        shape = F.merged_shape(n, group["merge_dims"])
        dense = F.choose_dense(
            shape,
            max_size=group["preconditioner_max_size"],
            min_ndim=0,
            max_skew=group["preconditioner_max_skew"],
            memory_save_mode=None,
        )
        return shape, dense

    def _unit_init(self, group: dict[str, Any], state: dict[str, Any], g: Tensor) -> None:
        shape, dense = self._shape_dense(group, tuple(g.shape))
        scale = group["preconditioner_init_scale"]
        if scale is None:
            m4 = g.detach().abs().double().pow(4).mean()
            # whitening: P ~ 1/|g|; Newton: |h| ~ |H v| with |v| ~ 1, P ~ 1/|H|; Q ~ P^(1/2)
            auto = m4.pow(-1.0 / 8)
            scale = float(auto) if math.isfinite(float(auto)) and float(m4) > 0 else 1.0
        pdt = group["preconditioner_dtype"] or torch.promote_types(g.dtype, torch.float32)
        qs, ps = F.init_factors(
            shape, dense, scale, geometry=group["geometry"], dtype=pdt, device=g.device
        )
        for i, q in enumerate(qs):
            state[f"Q{i}"] = q
            if ps[i] is not None:
                state[f"P{i}"] = ps[i]
            state[f"L{i}"] = torch.zeros((), dtype=torch.float32, device=g.device)

    def _factors(
        self, state: dict[str, Any]
    ) -> tuple[list[Tensor], list[Tensor | None], list[Tensor | None]]:
        k = sum(1 for key in state if key.startswith("Q"))
        return (
            [state[f"Q{i}"] for i in range(k)],
            [state.get(f"P{i}") for i in range(k)],
            [state.get(f"L{i}") for i in range(k)],
        )

    def _unit_needs_v(self, group: dict[str, Any]) -> bool:
        return group["geometry"] == "EQ"

    def _unit_update(
        self,
        group: dict[str, Any],
        state: dict[str, Any],
        h: Tensor,
        v: Tensor | None,
        balance: bool,
    ) -> None:
        qs, ps, ls = self._factors(state)
        shape = tuple(q.shape[0] for q in qs)
        F.update_factors(
            qs,
            ps,
            ls,
            h.reshape(shape),
            None if v is None else v.reshape(shape),
            geometry=group["geometry"],
            lr=group["lr_preconditioner"],
            beta_lip=group["beta_lipschitz"],
            do_balance=balance,
        )

    def _unit_apply(self, group: dict[str, Any], state: dict[str, Any], x: Tensor) -> Tensor:
        qs, ps, _ = self._factors(state)
        shape = tuple(q.shape[0] for q in qs)
        mats = F.preconditioner_matrices(qs, ps, group["geometry"])
        out = F.precondition(x.reshape(shape).to(qs[0].dtype), mats)
        return out.reshape(x.shape).to(x.dtype)

    def _after_load(self) -> None:
        for group in self.param_groups:
            if group["geometry"] in ("EQ", "QUAD"):
                continue
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                qs, ps, _ = self._factors(state)
                for q, cache in zip(qs, ps):
                    if cache is not None:
                        cache.copy_(q.mH @ q)

    # the P matrix of a unit (tests and diagnostics)
    def preconditioner(self, param: Tensor) -> Tensor:
        """The dense preconditioner ``P`` of the unit that ``param`` heads (small problems only)."""
        state = self.state[param]
        qs, ps, _ = self._factors(state)
        mats = F.preconditioner_matrices(qs, ps, self.param_groups[0]["geometry"])
        full = torch.ones((1, 1), dtype=mats[0].dtype, device=mats[0].device)
        for m in mats:
            full = torch.kron(full, m if m.dim() == 2 else torch.diag(m))
        return full


def _common(
    lr: float,
    lr_preconditioner: float,
    momentum: float,
    preconditioner_update_probability: Any,
    preconditioner_init_scale: float | None,
    geometry: str,
    beta_lipschitz: float,
    damping: float,
    weight_decay: float,
    grad_clip_max_rms: float,
    grad_clip_max_amp: float,
    preconditioner_dtype: torch.dtype | None,
    hvp_method: str,
) -> dict[str, Any]:
    return dict(
        lr=lr,
        lr_preconditioner=lr_preconditioner,
        momentum=momentum,
        preconditioner_update_probability=preconditioner_update_probability,
        preconditioner_init_scale=preconditioner_init_scale,
        geometry=geometry,
        beta_lipschitz=beta_lipschitz,
        damping=damping,
        weight_decay=weight_decay,
        grad_clip_max_rms=grad_clip_max_rms,
        grad_clip_max_amp=grad_clip_max_amp,
        preconditioner_dtype=preconditioner_dtype,
        hvp_method=hvp_method,
    )


class KronWhiten(_KronFamily):
    """Kronecker-factored gradient/momentum whitening PSGD.

    Args:
        params: parameters or groups.
        lr: learning rate (the update is normalised, as Adam's).
        lr_preconditioner: preconditioner step size (about 0.1).
        momentum: EMA factor of the gradient (0 disables).
        preconditioner_update_probability: float in [0, 1], callable of the step, or None
            (kron-torch's annealed schedule).
        preconditioner_max_size: dims larger than this get a diagonal factor.
        preconditioner_max_skew: a dim with ``size**2 > max_skew * numel`` is diagonal
            (0: all diagonal, inf: all dense).
        preconditioner_init_scale: initial ``Q = scale * I``; None: from the first gradient.
        geometry: ``"EQ"``, ``"QEP"``, ``"QEQ"``, ``"Q0.5EQ1.5"`` or ``"QUAD"``.
        whiten_momentum: fit ``P`` to the momentum instead of the gradient.
        beta_lipschitz: forgetting factor of the moving-max step normaliser.
        damping: noise added to the whitened vector (like Adam's epsilon).
        weight_decay: decoupled weight decay (``p *= 1 - lr * wd``).
        grad_clip_max_rms: clip the preconditioned update's RMS (inf: off).
        grad_clip_max_amp: clip its elements (inf: off).
        preconditioner_dtype: dtype of ``Q`` (bfloat16 keeps float32 norms and solves).
        merge_dims: merge dims of tensors with ndim > 2 into a matrix.
        distributed: under ``torch.distributed`` fit each parameter's preconditioner on
            one rank (assigned by cost) and broadcast it (default: when a process group
            with more than one rank is initialised). Gradients must be the same on every
            rank (all-reduced, as DDP does).
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
        preconditioner_max_size: float = math.inf,
        preconditioner_max_skew: float = 1.0,
        preconditioner_init_scale: float | None = None,
        geometry: str = "Q0.5EQ1.5",
        whiten_momentum: bool = False,
        beta_lipschitz: float = 0.9,
        damping: float = 1e-9,
        weight_decay: float = 0.0,
        grad_clip_max_rms: float = math.inf,
        grad_clip_max_amp: float = math.inf,
        preconditioner_dtype: torch.dtype | None = None,
        merge_dims: bool = True,
        distributed: bool | None = None,
    ) -> None:
        defaults = _common(
            lr, lr_preconditioner, momentum, preconditioner_update_probability,
            preconditioner_init_scale, geometry, beta_lipschitz, damping, weight_decay,
            grad_clip_max_rms, grad_clip_max_amp, preconditioner_dtype, "autograd",
        )  # fmt: skip
        defaults.update(
            whiten_momentum=whiten_momentum,
            preconditioner_max_size=preconditioner_max_size,
            preconditioner_max_skew=preconditioner_max_skew,
            merge_dims=merge_dims,
        )
        super().__init__(params, defaults, distributed)


class KronNewton(_KronFamily):
    """Kronecker-factored Newton-type PSGD: ``P -> |H|^{-1}`` from Hessian-vector products.

    ``step(closure)`` needs a closure that returns the loss without calling
    ``backward``; gradients and ``H v`` (double backward, or central finite
    differences with ``hvp_method="fd"`` or when second derivatives are
    unavailable) are computed inside. Other arguments as :class:`KronWhiten`.

    Under ``torch.distributed`` (``distributed``: default when a process group with
    more than one rank exists) each rank's closure computes the loss of its own share
    of the batch; the gradients and ``H v`` (which DDP does not reduce, as they come
    from ``torch.autograd.grad``) are averaged over the ranks here, and the fits are
    split over the ranks as in :class:`KronWhiten`. ``distributed=False``: every rank
    steps on its own.
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
        preconditioner_max_size: float = math.inf,
        preconditioner_max_skew: float = 1.0,
        preconditioner_init_scale: float | None = None,
        geometry: str = "Q0.5EQ1.5",
        beta_lipschitz: float = 0.9,
        damping: float = 1e-9,
        weight_decay: float = 0.0,
        grad_clip_max_rms: float = math.inf,
        grad_clip_max_amp: float = math.inf,
        preconditioner_dtype: torch.dtype | None = None,
        merge_dims: bool = True,
        hvp_method: str = "autograd",
        distributed: bool | None = None,
    ) -> None:
        defaults = _common(
            lr, lr_preconditioner, momentum, preconditioner_update_probability,
            preconditioner_init_scale, geometry, beta_lipschitz, damping, weight_decay,
            grad_clip_max_rms, grad_clip_max_amp, preconditioner_dtype, hvp_method,
        )  # fmt: skip
        defaults.update(
            whiten_momentum=False,
            preconditioner_max_size=preconditioner_max_size,
            preconditioner_max_skew=preconditioner_max_skew,
            merge_dims=merge_dims,
        )
        super().__init__(params, defaults, distributed)


class DenseNewton(_KronFamily):
    """Newton-type PSGD with one dense ``Q`` over each group's flattened parameters.

    Cost ``O(n^2)`` memory and ``O(n^3)`` per update (``n`` = parameters in the
    group): for small problems (Rosenbrock, small regressions). A BFGS alternative
    that needs no line search. Arguments as :class:`KronNewton`.
    """

    newton = True
    flat = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.001,
        lr_preconditioner: float = 0.1,
        momentum: float = 0.0,
        preconditioner_update_probability: float | Callable[[int], Any] | None = 1.0,
        *,
        preconditioner_init_scale: float | None = None,
        geometry: str = "Q0.5EQ1.5",
        beta_lipschitz: float = 0.9,
        damping: float = 1e-9,
        weight_decay: float = 0.0,
        grad_clip_max_rms: float = math.inf,
        grad_clip_max_amp: float = math.inf,
        preconditioner_dtype: torch.dtype | None = None,
        hvp_method: str = "autograd",
        distributed: bool | None = None,
    ) -> None:
        defaults = _common(
            lr, lr_preconditioner, momentum, preconditioner_update_probability,
            preconditioner_init_scale, geometry, beta_lipschitz, damping, weight_decay,
            grad_clip_max_rms, grad_clip_max_amp, preconditioner_dtype, hvp_method,
        )  # fmt: skip
        defaults.update(whiten_momentum=False)
        super().__init__(params, defaults, distributed)
