"""``Kron``: a drop-in replacement for kron-torch's PSGD Kron optimizer.

Same arguments, defaults and update-probability schedule as kron-torch, with:

* the preconditioner ``P_i = Q_i^H Q_i`` of each dense factor held in the state
  itself (the default ``"QUAD"`` geometry fits ``P_i`` directly; ``"EQ"``, kron-torch's
  rule, stores ``P_i`` in place of its triangular ``Q_i``), so state is no larger than
  kron-torch's and steps that do not update the preconditioner cost two matrix
  products per 2-D parameter, not four;
* 0-dim and 1-dim parameters, complex parameters, dimension merging;
* a state of tensors only (``torch.load(weights_only=True)``), resumed
  bit-identically, probability schedule and counters included;
* no host random generator: probes come from a torch generator seeded from
  ``torch.manual_seed`` at construction;
* under ``torch.distributed`` each rank fits the factors it owns (assigned by
  cost) and broadcasts them, so all ranks keep identical preconditioners;
* DTensor (FSDP2) parameters: gradients are gathered to full tensors, the state is
  replicated, and each rank adds its own piece of the update.

Reference: X.-L. Li, "Preconditioned stochastic gradient descent", 2015; E. Walters,
O. Pooladzandi, X.-L. Li, kron-torch (2024).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from . import factors as F
from ._base import PSGDBase, check_nonneg, check_positive, check_unit, closure_loss
from ._dist import Ownership
from ._dtensor import full as _full
from ._dtensor import is_dtensor
from ._dtensor import like as _like
from .schedule import advance, check_probability, should_update

__all__ = ["Kron"]

_EPS32 = torch.finfo(torch.float32).eps


class Kron(PSGDBase):
    """PSGD with a Kronecker-factored whitening preconditioner (kron-torch compatible).

    Args:
        params: parameters or parameter groups (named parameters are accepted and
            used in warnings).
        lr: learning rate.
        b1: momentum (EMA of gradients, bias-corrected).
        weight_decay: decoupled weight decay, applied to parameters with ndim >= 2.
        preconditioner_update_probability: a float in [0, 1], a callable of the step,
            or None for kron-torch's schedule (1.0 annealed to 0.03).
        max_size_triangular: dims larger than this get a diagonal factor.
        min_ndim_triangular: tensors with fewer dims get diagonal factors only.
        max_skew_triangular: a dim with ``size**2 > max_skew * numel`` is diagonal.
        memory_save_mode: None, ``"smart_one_diag"``, ``"one_diag"`` or ``"all_diag"``.
        momentum_into_precond_update: fit the preconditioner to the momentum (True)
            or the raw gradient.
        precond_lr: preconditioner step size.
        precond_init_scale: initial ``Q = scale * I``; None picks
            ``mean(g**4) ** (-1/8)`` from the first gradient of each parameter.
        merge_dims: merge dims of tensors with ndim > 2 into a matrix.
        mu_dtype: dtype of the momentum buffer (default: the parameter's).
        precond_dtype: dtype of ``Q`` and the cache (default float32; bfloat16 keeps
            float32 norms and solves).
        geometry: how the factors are fitted. Default ``"QUAD"``: fits ``P_i`` directly
            (positive definite by construction, matmul only) and reuses the ``P m`` of
            the update, the cheapest update steps. ``"EQ"``: kron-torch's triangular
            ``dQ = E Q`` rule (its arithmetic); ``P_i`` is stored (same bytes as
            kron-torch's ``Q_i``) and ``Q_i`` is recovered by Cholesky on update steps.
            Also ``"QEP"``, ``"QEQ"``, ``"Q0.5EQ1.5"``. On the delayed-XOR benchmark
            ``"QUAD"`` and ``"EQ"`` both solve every seed at lr 1e-3 to 2e-3.
        precond_beta: forgetting factor of the moving-max norm bound (0: the
            instantaneous bound, as kron-torch).
        clip_update_rms: RMS of the preconditioned update is clipped to this (1.1).
        distributed: split preconditioner fitting over ranks (default: when a
            process group with more than one rank is initialised).
        compile: run the preconditioner application through ``torch.compile``
            (default False; nothing needs it, and the eager path is as fast on CPU).
        fast_fit: ``geometry="EQ"`` only: its update steps the faster way, same
            mathematics, different float rounding: an update followed by another update
            keeps the triangular ``Q_i`` (no ``P_i = Q_i^H Q_i`` refresh, no Cholesky
            next time; ``P_i`` is formed when a non-update step or ``state_dict()``
            needs it), Cholesky of the lower factor, the probe solve on the transposed
            view, ``mean|m|`` as a 1-norm. Default False (bit-compatible with earlier
            ``"EQ"`` runs).
        batch_same_shape: on steps without a preconditioner update, apply the
            preconditioners of parameters of one group with the same working shape,
            dtypes and factor layout as one batched product (``torch.bmm`` on the
            stacked ``P_i``). Their momentum buffers and stored ``P_i`` then live in
            one stacked buffer each (the state keeps one tensor per parameter: views).
            None (default): batch parameters on accelerators only; on CPU ``torch.bmm``
            measured slower than one ``torch.mm`` per matrix. Not with ``compile=True``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.0003,
        b1: float = 0.9,
        weight_decay: float = 0.0,
        preconditioner_update_probability: float | Callable[[int], Any] | None = None,
        max_size_triangular: float = 8192,
        min_ndim_triangular: int = 2,
        max_skew_triangular: float = math.inf,
        memory_save_mode: str | None = None,
        momentum_into_precond_update: bool = True,
        precond_lr: float = 0.1,
        precond_init_scale: float | None = None,
        merge_dims: bool = True,
        mu_dtype: torch.dtype | None = None,
        precond_dtype: torch.dtype | None = None,
        *,
        geometry: str = "QUAD",
        precond_beta: float = 0.0,
        clip_update_rms: float = 1.1,
        distributed: bool | None = None,
        compile: bool = False,
        batch_same_shape: bool | None = None,
        fast_fit: bool = False,
    ) -> None:
        check_positive("lr", lr, allow_zero=True)
        check_unit("b1", b1)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        check_probability(preconditioner_update_probability)
        check_nonneg("max_size_triangular", max_size_triangular)
        check_nonneg("min_ndim_triangular", min_ndim_triangular)
        check_nonneg("max_skew_triangular", max_skew_triangular)
        check_positive("precond_lr", precond_lr)
        check_positive("clip_update_rms", clip_update_rms)
        check_unit("precond_beta", precond_beta)
        if precond_init_scale is not None:
            check_positive("precond_init_scale", precond_init_scale)
        if geometry not in F.GEOMETRIES:
            raise ValueError(f"geometry must be one of {F.GEOMETRIES}, got {geometry!r}")
        F.choose_dense(
            (2, 2), max_size=1, min_ndim=1, max_skew=1, memory_save_mode=memory_save_mode
        )  # validates memory_save_mode
        defaults = dict(
            lr=lr,
            b1=b1,
            weight_decay=weight_decay,
            preconditioner_update_probability=preconditioner_update_probability,
            max_size_triangular=max_size_triangular,
            min_ndim_triangular=min_ndim_triangular,
            max_skew_triangular=max_skew_triangular,
            memory_save_mode=memory_save_mode,
            momentum_into_precond_update=momentum_into_precond_update,
            precond_lr=precond_lr,
            precond_init_scale=precond_init_scale,
            merge_dims=merge_dims,
            mu_dtype=mu_dtype,
            precond_dtype=precond_dtype,
            geometry=geometry,
            precond_beta=precond_beta,
            clip_update_rms=clip_update_rms,
        )
        super().__init__(params, defaults)
        for key in ("prob_step", "update_counter", "num_updates"):
            self._counters[key] = torch.tensor(0, dtype=torch.int64)
        self._ownership = Ownership(distributed)
        self._plan: list[_Entry] | None = None
        self._fresh: list[Tensor] = []
        self._plan_cpu = False  # every plan entry on CPU and unbatched: per-parameter passes
        # "EQ" parameters whose stored dense factors hold the triangular Q_i of the last
        # update instead of P_i: P_i is formed only when a non-update step needs it
        self._q_form: set[Tensor] = set()
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be a bool, got {type(compile).__name__}")
        if batch_same_shape is not None and not isinstance(batch_same_shape, bool):
            raise TypeError(
                f"batch_same_shape must be a bool or None, got {type(batch_same_shape).__name__}"
            )
        if not isinstance(fast_fit, bool):
            raise TypeError(f"fast_fit must be a bool, got {type(fast_fit).__name__}")
        if fast_fit and geometry != "EQ":
            raise ValueError(f"fast_fit=True applies to geometry='EQ' only, got {geometry!r}")
        self._lazy_p = fast_fit
        # batching: off (False, or compile=True), accelerators only (None), everywhere (True)
        self._batch = not compile and batch_same_shape is not False
        self._batch_cpu = not compile and batch_same_shape is True
        # optional: the preconditioner application through torch.compile (never required)
        self._precondition: Callable[[Tensor, list[Tensor]], Tensor] = (
            torch.compile(F.precondition, dynamic=True) if compile else F.precondition
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._plan = None  # new parameters: rebuild the non-update plan

    # ------------------------------------------------------------------ layout
    @staticmethod
    def _layout(group: dict[str, Any], p: Tensor) -> tuple[tuple[int, ...], tuple[bool, ...]]:
        return _layout_of(
            tuple(p.shape),
            bool(group["merge_dims"]),
            group["max_size_triangular"],
            group["min_ndim_triangular"],
            group["max_skew_triangular"],
            group["memory_save_mode"],
        )

    def _init_state(self, group: dict[str, Any], p: Tensor, g: Tensor) -> None:
        shape, dense = self._layout(group, p)
        state = self.state[p]
        pdt = group["precond_dtype"] or torch.promote_types(p.dtype, torch.float32)
        scale: float | Tensor = group["precond_init_scale"]
        if scale is None:
            m4 = g.detach().abs().float().pow(4).mean()
            auto = m4.pow(-1.0 / 8)
            scale = torch.where(torch.isfinite(auto) & (m4 > 0), auto, torch.ones_like(auto))
        qs, ps = F.init_factors(
            shape, dense, scale, geometry=group["geometry"], dtype=pdt, device=p.device
        )
        state["step"] = torch.tensor(0, dtype=torch.int32)
        state["momentum_buffer"] = torch.zeros(
            shape, dtype=group["mu_dtype"] or p.dtype, device=p.device
        )
        for i, q in enumerate(qs):
            state[f"Q{i}"] = q
            if ps[i] is not None:
                state[f"P{i}"] = ps[i]
            if group["precond_beta"] > 0:
                state[f"L{i}"] = torch.zeros((), dtype=torch.float32, device=p.device)

    @staticmethod
    def _factors(
        state: dict[str, Any], k: int
    ) -> tuple[list[Tensor], list[Tensor | None], list[Tensor | None]]:
        qs = [state[f"Q{i}"] for i in range(k)]
        ps = [state.get(f"P{i}") for i in range(k)]
        ls = [state.get(f"L{i}") for i in range(k)]
        return qs, ps, ls

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`torch.optim.Optimizer.state_dict`; every stored ``"EQ"`` factor is ``P_i``.

        Factors left as the triangular ``Q_i`` by update steps are turned into ``P_i``
        first (in place), so a resumed run continues exactly as this one does.
        """
        self._refresh_all()
        return super().state_dict()

    def _refresh_all(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p in self._q_form:
                    self._refresh(group, p)

    def _refresh(self, group: dict[str, Any], p: Tensor) -> None:
        """Stored triangular ``Q_i`` -> ``P_i = Q_i^H Q_i`` (in place) for one parameter."""
        shape, _ = self._layout(group, p)
        qs, _, _ = self._factors(self.state[p], len(shape))
        F.refresh_p(qs)
        self._q_form.discard(p)

    def _after_load(self) -> None:
        self._plan = None
        self._q_form.clear()  # a loaded state holds P_i
        for group in self.param_groups:
            if group["geometry"] in ("EQ", "QUAD"):
                continue  # the cache lives inside Q (EQ) or Q is P (QUAD)
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                shape, _ = self._layout(group, p)
                for i in range(len(shape)):
                    q, cache = state[f"Q{i}"], state.get(f"P{i}")
                    if cache is not None:
                        cache.copy_(q.mH @ q)

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = closure_loss(closure)
        c = self._counters
        prob = self.param_groups[0]["preconditioner_update_probability"]
        do_update, n_upd = advance(c, prob)
        if not do_update and self._plain_step():
            return loss
        # "EQ": keep the fitted triangular Q_i (no P_i = Q_i^H Q_i, no Cholesky next time)
        # when the next step is an update too (the counter decides it in advance)
        keep_q = (
            do_update
            and self._lazy_p
            and should_update(prob, int(c["prob_step"]), int(c["update_counter"]))[0]
        )
        self._plan = None  # the general path may create or replace state: rebuild the plan
        do_balance = do_update and n_upd % 100 == 99

        work: list[tuple[dict[str, Any], Tensor, Tensor, int]] = []
        candidates: list[tuple[dict[str, Any], int, Tensor, int]] = []
        index = -1
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                index += 1
                if p.grad is None:
                    continue
                self._check_grad(p, p.grad)
                candidates.append((group, i, p, index))
        grads = [_full(p.grad) for _, _, p, _ in candidates if p.grad is not None]
        finite = _all_finite(grads)
        for (group, i, p, index), full_g, ok in zip(candidates, grads, finite):
            if not ok:
                self._warn_nonfinite(self._param_name(group, i, p))
                continue
            shape, _ = self._layout(group, p)
            g = full_g.reshape(shape)
            if not self.state[p]:
                self._init_state(group, p, g)
            work.append((group, p, g, index))

        owners = self._ownership.owners(self.param_groups, self._layout) if do_update else None
        for group, p, g, index in work:
            state = self.state[p]
            state["step"].add_(1)
            b1 = group["b1"]
            mom = state["momentum_buffer"]
            mom.lerp_(g.to(mom.dtype), 1 - b1)
            if not do_update or (owners is not None and not self._ownership.mine(owners[index])):
                continue
            if self._fused(group):
                continue  # fitted after the update is applied, from the same P m
            qs, ps, ls = self._factors(state, g.dim())
            pdt = qs[0].dtype
            if group["momentum_into_precond_update"]:
                target = mom.to(pdt) / (1 - b1 ** int(state["step"]))  # a fresh tensor
                fresh = True
            else:
                target, fresh = g.to(pdt), False
            v = self._randn_like(target, n_upd, index)
            if self._lazy_p:  # mean |target| as a 1-norm: one pass, no |target| temporary
                mean_abs = torch.linalg.vector_norm(target, 1) / target.numel()
                noise = math.sqrt(_EPS32) * mean_abs.to(target.real.dtype) * v
            else:
                noise = math.sqrt(_EPS32) * target.abs().mean() * v
            target = target.add_(noise) if fresh else target + noise
            lazy = group["geometry"] == "EQ"
            F.update_factors(
                qs,
                ps,
                ls,
                target,
                v,
                geometry=group["geometry"],
                lr=group["precond_lr"],
                beta_lip=group["precond_beta"],
                do_balance=do_balance and p.dim() > 1,
                q_in=lazy and p in self._q_form,
                q_out=lazy and keep_q,
                fast=self._lazy_p,
            )
        if do_update and owners is not None:
            self._ownership.broadcast(
                owners,
                self.param_groups,
                self.state,
                self._factors,
                self._layout,
                select=lambda grp: not self._fused(grp),
            )
        if do_update:  # every rank: the fitted (or received) EQ factors are Q_i or P_i
            fitted = [p for group, p, _, _ in work if group["geometry"] == "EQ"]
            if keep_q:
                self._q_form.update(fitted)
            else:
                self._q_form.difference_update(fitted)

        for group, p, g, index in work:
            state = self.state[p]
            qs, ps, _ = self._factors(state, g.dim())
            mom = state["momentum_buffer"]
            if p in self._q_form and not do_update:
                self._refresh(group, p)  # a non-update step forms P_i (as the cached path)
            if p in self._q_form:  # update step: apply from the fresh triangular Q_i
                pre = F.precondition_triangular(mom.to(qs[0].dtype), qs)
            else:
                mats = F.preconditioner_matrices(qs, ps, group["geometry"])
                pre = self._precondition(mom.to(qs[0].dtype), mats)
            # debias (1/bc) and clip the RMS in one scalar: s = min(1/bc, clip / rms(P m))
            inv_bc = 1.0 / (1 - group["b1"] ** int(state["step"]))
            rms = float(torch.linalg.vector_norm(pre)) / math.sqrt(pre.numel()) * inv_bc
            scale = inv_bc * min(1.0, group["clip_update_rms"] / (rms + 1e-12))
            if group["weight_decay"] != 0 and p.dim() >= 2:
                p.add_(p, alpha=-group["lr"] * group["weight_decay"])
            p.add_(_like(p, pre.view(p.shape).to(p.dtype)), alpha=-group["lr"] * scale)
            mine = owners is None or self._ownership.mine(owners[index])
            if do_update and self._fused(group) and mine:
                # matmul-only geometry fitted to the momentum: reuse P m (P from before this fit)
                qs, ps, ls = self._factors(state, g.dim())
                F.update_factors(
                    qs,
                    ps,
                    ls,
                    mom.to(qs[0].dtype) * inv_bc,
                    None,
                    geometry=group["geometry"],
                    lr=group["precond_lr"],
                    beta_lip=group["precond_beta"],
                    do_balance=do_balance and p.dim() > 1,
                    pg=pre * inv_bc,
                )
        if do_update and owners is not None:
            self._ownership.broadcast(
                owners,
                self.param_groups,
                self.state,
                self._factors,
                self._layout,
                select=self._fused,
            )
        return loss

    # ------------------------------------------------------- non-update steps
    def _build_plan(self) -> list[_Entry] | None:
        """Per-parameter metadata for :meth:`_plain_step` (None: take the general path)."""
        plan, fresh = [], []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if is_dtensor(p):
                    return None
                state = self.state.get(p)
                if not state:
                    if p.grad is not None:
                        return None
                    fresh.append(p)  # no state yet: a gradient sends the step to the general path
                    continue
                if p in self._q_form:
                    self._refresh(group, p)
                shape, _ = self._layout(group, p)
                qs, ps, _ = self._factors(state, len(shape))
                mats = F.preconditioner_matrices(qs, ps, group["geometry"])
                mom = state["momentum_buffer"]
                plan.append(
                    _Entry(group, i, p, state, mom, state["step"], int(state["step"]), mats, shape)
                )
        self._fresh = fresh
        if self._batch:
            _batch_entries(plan, cpu=self._batch_cpu)
        self._plan_cpu = all(e.batch is None and e.p.device.type == "cpu" for e in plan)
        return plan

    def _plain_step(self) -> bool:
        """A step without a preconditioner update, on the same arithmetic as the general path.

        Per-parameter metadata (working shape, the ``P_i`` to apply, buffers) is cached
        in a plan that is rebuilt after every general step and on ``load_state_dict``.
        Gradients are checked by their sum (finite iff its terms are, barring overflow,
        which falls back to the exact check). On CPU each parameter is then done in one
        go (check, momentum, ``P_1 M P_2``, its norm, the update) while its tensors are
        still in cache, host reads being free there; elsewhere one host sync checks
        every gradient and one more reads every RMS.
        Returns False, having changed nothing, when the general path must run
        (a parameter without state, DTensor parameters).
        """
        plan = self._plan
        if plan is None:
            plan = self._plan = self._build_plan()
            if plan is None:
                return False
        if any(p.grad is not None for p in self._fresh):
            self._plan = None
            return False
        live = []
        for e in plan:
            g = e.p.grad
            if g is not None:
                if g.is_sparse:
                    self._check_grad(e.p, g)
                live.append((e, g))
        if not live:
            return True
        if self._plan_cpu:
            for e, g in live:
                self._plain_one(e, g)
            return True
        sums = torch.stack([g.sum() for _, g in live])
        if not bool(torch.isfinite(sums).all()):
            finite = _all_finite([g for _, g in live])
            for (e, _), ok in zip(live, finite):
                if not ok:
                    self._warn_nonfinite(self._param_name(e.group, e.index, e.p))
            live = [item for item, ok in zip(live, finite) if ok]
            if not live:
                return True
        torch._foreach_add_([e.step_t for e, _ in live], 1)
        singles, batches = _split_batches(live)
        norms_t: list[Tensor] = []
        order: list[tuple[_Entry, Tensor]] = []
        for e, g in singles:
            e.step += 1
            order.append((e, self._plain_pre(e, g)))
            norms_t.append(torch.linalg.vector_norm(order[-1][1]).reshape(1))
        for b, items in batches:
            moms = []
            for e, g in items:
                e.step += 1
                g = g.reshape(e.shape) if g.shape != e.shape else g
                moms.append(g if g.dtype == b.mom.dtype else g.to(b.mom.dtype))
            torch._foreach_lerp_([e.mom for e, _ in items], moms, 1 - items[0][0].group["b1"])
            mom = b.mom if b.mom.dtype == b.mats[0].dtype else b.mom.to(b.mats[0].dtype)
            pre = F.precondition_batched(mom, b.mats)
            order.extend((e, pre[k]) for k, (e, _) in enumerate(items))
            norms_t.append(torch.linalg.vector_norm(pre.reshape(len(items), -1), dim=1))
        norms = torch.cat(norms_t).tolist()
        for (e, pre), nrm in zip(order, norms):
            _apply_update(e.group, e.p, pre, nrm, e.step)
        return True

    def _plain_pre(self, e: _Entry, g: Tensor) -> Tensor:
        """Momentum update (in place) and ``P m`` of one plan entry."""
        mom = e.mom
        g = g.reshape(e.shape) if g.shape != e.shape else g
        mom.lerp_(g if g.dtype == mom.dtype else g.to(mom.dtype), 1 - e.group["b1"])
        mats = e.mats
        m = mom if mom.dtype == mats[0].dtype else mom.to(mats[0].dtype)
        if e.two_mm and self._precondition is F.precondition:  # its 2-D dense case, inline
            return torch.mm(torch.mm(mats[0], m), mats[1].mT)
        return self._precondition(m, mats)

    def _plain_one(self, e: _Entry, g: Tensor) -> None:
        """One CPU parameter of a non-update step: check, momentum, ``P m``, norm, update."""
        s = g.sum()
        ok = bool(torch.isfinite(s)) if s.is_complex() else math.isfinite(float(s))
        if not ok and not _all_finite([g])[0]:
            self._warn_nonfinite(self._param_name(e.group, e.index, e.p))
            return
        e.step_t.add_(1)
        e.step += 1
        pre = self._plain_pre(e, g)
        _apply_update(e.group, e.p, pre, float(torch.linalg.vector_norm(pre)), e.step)

    @staticmethod
    def _fused(group: dict[str, Any]) -> bool:
        """Matmul geometry fitted to the momentum: fit after the update, reusing ``P m``."""
        return group["geometry"] in ("QEQ", "Q0.5EQ1.5", "QUAD") and bool(
            group["momentum_into_precond_update"]
        )


class _Entry:
    """Cached per-parameter metadata of a non-update step."""

    __slots__ = (
        "batch",
        "group",
        "index",
        "mats",
        "mom",
        "p",
        "shape",
        "state",
        "step",
        "step_t",
        "two_mm",
    )

    def __init__(
        self,
        group: dict[str, Any],
        index: int,
        p: Tensor,
        state: dict[str, Any],
        mom: Tensor,
        step_t: Tensor,
        step: int,
        mats: list[Tensor],
        shape: tuple[int, ...],
    ) -> None:
        self.group, self.index, self.p, self.state = group, index, p, state
        self.mom, self.step_t, self.step, self.mats, self.shape = mom, step_t, step, mats, shape
        self.batch: _Batch | None = None
        # 2-D with two dense factors: P_1 M P_2 as two torch.mm, as F.precondition does
        self.two_mm = len(mats) == 2 and mats[0].dim() == 2 and mats[1].dim() == 2


class _Batch:
    """Same-shaped parameters of one group whose preconditioners are applied as one ``bmm``.

    ``mom`` and ``mats`` are ``(N, ...)`` stacks; each member's momentum buffer (and each
    stored ``P_i``) is a view into them, so they stay current without copies.
    """

    __slots__ = ("mats", "members", "mom")

    def __init__(self, members: list[_Entry], mom: Tensor, mats: list[Tensor]) -> None:
        self.members, self.mom, self.mats = members, mom, mats


def _stacked_views(tensors: list[Tensor]) -> Tensor | None:
    """The ``(N, ...)`` buffer whose ``k``-th slice is ``tensors[k]`` (None if they are not)."""
    base = tensors[0]._base
    if base is None or base.dim() != tensors[0].dim() + 1 or base.shape[0] != len(tensors):
        return None
    if not base.is_contiguous():
        return None
    step = base.stride(0) * base.element_size()
    start = base.data_ptr()
    for k, t in enumerate(tensors):
        if t._base is not base or t.data_ptr() != start + k * step or t.shape != base.shape[1:]:
            return None
        if t.stride() != base.stride()[1:]:
            return None
    return base


def _stack_state(entries: list[_Entry], tensors: list[Tensor], key: str | None) -> Tensor:
    """Stack ``tensors`` (one per entry); with ``key``, the state entries become views of it."""
    base = _stacked_views(tensors)
    if base is not None:
        return base
    base = torch.stack(tensors)
    if key is not None:
        for k, e in enumerate(entries):
            e.state[key] = base[k]
    return base


def _state_key(state: dict[str, Any], t: Tensor) -> str | None:
    """The state key holding ``t`` itself (None: ``t`` is derived, e.g. a squared diagonal)."""
    for key, value in state.items():
        if value is t:
            return key
    return None


def _batch_entries(plan: list[_Entry], cpu: bool) -> None:
    """Group plan entries that can share one batched product; stack their buffers.

    Entries batch together when they belong to one parameter group, have the same
    working shape (1-D or 2-D), the same factor layout (dense/diagonal per dim), dtypes
    and device.
    """
    buckets: dict[tuple[Any, ...], list[_Entry]] = {}
    for e in plan:
        if len(e.shape) > 2 or not e.mom.is_contiguous():
            continue
        if e.p.device.type == "cpu" and not cpu:
            continue
        key = (
            id(e.group),
            e.shape,
            tuple((m.dim(), m.dtype) for m in e.mats),
            e.mom.dtype,
            e.p.dtype,
            e.p.device,
        )
        buckets.setdefault(key, []).append(e)
    for members in buckets.values():
        if len(members) < 2:
            continue
        mom = _stack_state(members, [e.mom for e in members], "momentum_buffer")
        mats = []
        for i in range(len(members[0].mats)):
            tensors = [e.mats[i] for e in members]
            keys = [_state_key(e.state, t) for e, t in zip(members, tensors)]
            name = keys[0] if all(k == keys[0] for k in keys) else None
            if name is None or not all(t.is_contiguous() for t in tensors):
                mats.append(torch.stack(tensors))  # derived (diagonal squares): a copy
                continue
            mats.append(_stack_state(members, tensors, name))
        batch = _Batch(members, mom, mats)
        for k, e in enumerate(members):
            e.batch = batch
            e.mom = mom[k]
            e.mats = [m[k] for m in mats]


def _split_batches(
    live: list[tuple[_Entry, Tensor]],
) -> tuple[list[tuple[_Entry, Tensor]], list[tuple[_Batch, list[tuple[_Entry, Tensor]]]]]:
    """Live entries as singles and whole batches (a batch with a missing member runs singly)."""
    singles: list[tuple[_Entry, Tensor]] = []
    by_batch: dict[int, list[tuple[_Entry, Tensor]]] = {}
    for item in live:
        b = item[0].batch
        if b is None:
            singles.append(item)
        else:
            by_batch.setdefault(id(b), []).append(item)
    batches = []
    for items in by_batch.values():
        b = items[0][0].batch
        assert b is not None
        if len(items) == len(b.members):
            batches.append((b, items))
        else:
            singles.extend(items)
    return singles, batches


def _apply_update(group: dict[str, Any], p: Tensor, pre: Tensor, nrm: float, step: int) -> None:
    """Decoupled weight decay and the debiased, RMS-clipped update of a non-update step.

    ``nrm`` is ``||pre||``: debias (1/bc) and clip the RMS in one scalar,
    ``s = min(1/bc, clip / rms(P m))`` (the general path's formula).
    """
    inv_bc = 1.0 / (1 - group["b1"] ** step)
    rms = nrm / math.sqrt(pre.numel()) * inv_bc
    scale = inv_bc * min(1.0, group["clip_update_rms"] / (rms + 1e-12))
    if group["weight_decay"] != 0 and p.dim() >= 2:
        p.add_(p, alpha=-group["lr"] * group["weight_decay"])
    update = pre.view(p.shape)
    p.add_(update if update.dtype == p.dtype else update.to(p.dtype), alpha=-group["lr"] * scale)


@functools.lru_cache(maxsize=4096)
def _layout_of(
    shape: tuple[int, ...],
    merge_dims: bool,
    max_size: float,
    min_ndim: int,
    max_skew: float,
    memory_save_mode: str | None,
) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """Working shape and dense-factor choice (memoised: called for every parameter and step)."""
    merged = F.merged_shape(shape, merge_dims)
    dense = F.choose_dense(
        merged,
        max_size=max_size,
        min_ndim=min_ndim,
        max_skew=max_skew,
        memory_save_mode=memory_save_mode,
    )
    return merged, dense


def _all_finite(tensors: list[Tensor]) -> list[bool]:
    """Per-tensor finiteness with one host sync (min/max propagate NaN and reveal inf).

    ``aminmax`` is a vectorised one-pass reduction (a max-abs ``_foreach_norm`` was
    about 10x slower on CPU).
    """
    if not tensors:
        return []
    ext = torch.stack(
        [torch.stack(torch.aminmax(t.detach().reshape(-1).real)).float() for t in tensors]
    )
    return torch.isfinite(ext).all(dim=1).tolist()
