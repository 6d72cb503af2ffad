"""Shared step logic of the reference PSGD family (whitening and Newton variants).

A *unit* is what one preconditioner covers: a single parameter (Kron) or the
flattened concatenation of a group's parameters (LRA, Dense). Subclasses define
how a unit's preconditioner is created, fitted and applied; this class handles
closures, Hessian-vector products, momentum, clipping, weight decay, the
update-probability counter, non-finite gradients and the tensor-only state.

DTensor (FSDP2-style) parameters, sharded or replicated: gradients (and ``H v``)
are gathered to full tensors, the state is full-size on every rank, and each rank
adds its own piece of the identical update (``psgd._dtensor``).

Under ``torch.distributed`` (more than one rank) the whitening variants fit each
unit's preconditioner on one rank only (units assigned to ranks by cost, as
``Kron`` does) and broadcast it, so all ranks keep identical preconditioners
without repeating the fit. The Newton variants take their gradients and ``H v``
with ``torch.autograd.grad``, which DDP does not reduce, so there the optimizer
averages both over the ranks itself (plain, non-DTensor parameters; the probes
``v`` are drawn identically on every rank) before fitting the same way: each rank
passes the closure of its own share of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from optcore import distributed as odist
from optcore.curvature import hvp as optcore_hvp

from ._base import PSGDBase, check_positive, check_unit, closure_loss
from ._dist import Ownership
from ._dtensor import full, is_dtensor, like
from .factors import GEOMETRIES
from .schedule import advance, check_probability

__all__ = ["FamilyBase"]


class FamilyBase(PSGDBase):
    """Base of ``KronWhiten``/``KronNewton``/``LRAWhiten``/``LRANewton``/``DenseNewton``."""

    newton: bool = False
    flat: bool = False  # one preconditioner per parameter group over the flattened parameters

    def __init__(
        self, params: Iterable[Any], defaults: dict[str, Any], distributed: bool | None = None
    ) -> None:
        check_positive("lr", defaults["lr"], allow_zero=True)
        check_positive("lr_preconditioner", defaults["lr_preconditioner"])
        check_unit("momentum", defaults["momentum"])
        check_unit("beta_lipschitz", defaults["beta_lipschitz"])
        check_positive("weight_decay", defaults["weight_decay"], allow_zero=True)
        check_positive("damping", defaults["damping"], allow_zero=True)
        check_probability(defaults["preconditioner_update_probability"])
        if defaults["preconditioner_init_scale"] is not None:
            check_positive("preconditioner_init_scale", defaults["preconditioner_init_scale"])
        for key in ("grad_clip_max_rms", "grad_clip_max_amp"):
            v = defaults[key]
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"Invalid {key}: {v} (must be > 0; inf disables)")
        geometry = defaults.get("geometry", "EQ")
        if geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
        if defaults["hvp_method"] not in ("autograd", "fd"):
            raise ValueError(
                f"hvp_method must be 'autograd' or 'fd', got {defaults['hvp_method']!r}"
            )
        if distributed is not None and not isinstance(distributed, bool):
            raise TypeError(f"distributed must be a bool or None, got {type(distributed).__name__}")
        super().__init__(params, defaults)
        for key in ("prob_step", "update_counter", "num_updates"):
            self._counters[key] = torch.tensor(0, dtype=torch.int64)
        self._ownership = Ownership(distributed)

    # ----------------------------------------------------- subclass interface
    def _unit_init(self, group: dict[str, Any], state: dict[str, Any], g: Tensor) -> None:
        raise NotImplementedError

    def _unit_update(
        self,
        group: dict[str, Any],
        state: dict[str, Any],
        h: Tensor,
        v: Tensor | None,
        balance: bool,
    ) -> None:
        raise NotImplementedError

    def _unit_apply(self, group: dict[str, Any], state: dict[str, Any], x: Tensor) -> Tensor:
        raise NotImplementedError

    def _unit_needs_v(self, group: dict[str, Any]) -> bool:
        """Whether whitening needs an explicit probe ``v`` (else it is integrated out)."""
        return True

    # ------------------------------------------------------------------ units
    def _units(self) -> list[tuple[dict[str, Any], list[int], list[Tensor]]]:
        units = []
        for group in self.param_groups:
            params = group["params"]
            if self.flat:
                units.append((group, list(range(len(params))), list(params)))
            else:
                units.extend((group, [i], [p]) for i, p in enumerate(params))
        return units

    @staticmethod
    def _join(tensors: list[Tensor], like: list[Tensor], flat: bool) -> Tensor:
        if not flat:
            t = tensors[0]
            return t.reshape(1) if t.dim() == 0 else t
        return torch.cat([t.reshape(-1) for t in tensors])

    @staticmethod
    def _split(x: Tensor, like: list[Tensor], flat: bool) -> list[Tensor]:
        if not flat:
            return [x.view(like[0].shape)]
        out, k = [], 0
        for p in like:
            out.append(x[k : k + p.numel()].view(p.shape))
            k += p.numel()
        return out

    # ------------------------------------------------------------------- step
    def _gradients(self, closure: Callable[[], Any] | None, do_update: bool, n_upd: int) -> Any:
        """Return ``(loss, grads, hvps, vs)`` per parameter (lists keyed like ``_units``)."""
        params = [p for g in self.param_groups for p in g["params"]]
        if not self.newton:
            loss = closure_loss(closure)
            return loss, [None if p.grad is None else full(p.grad) for p in params], None, None
        name = type(self).__name__
        if closure is None:
            raise ValueError(f"{name} needs a closure returning the loss (closure=None)")
        with torch.enable_grad():
            loss = closure_loss(closure, required=name)
            if not isinstance(loss, Tensor) or not loss.requires_grad:
                raise TypeError(f"{name}: the closure must return a loss tensor that requires grad")
            method = self.param_groups[0]["hvp_method"]
            create = do_update and method == "autograd"
            raw = torch.autograd.grad(loss, params, create_graph=create, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, raw)]
            hvps = vs = None
            if do_update:
                # probes drawn whole (a plain tensor of the global shape, also for a
                # DTensor parameter, which gets its own layout of it for the products;
                # H v comes back gathered)
                vs = [self._randn_like(p.detach(), n_upd, i) for i, p in enumerate(params)]
                probes = [like(p, v) for p, v in zip(params, vs)]
                hvps = None
                if create and any(g.requires_grad for g in grads):
                    try:
                        hv = torch.autograd.grad(
                            grads,
                            params,
                            grad_outputs=probes,
                            allow_unused=True,
                            materialize_grads=True,
                        )
                        hvps = [full(h.detach()) for h in hv]
                    except RuntimeError:
                        hvps = None  # no second derivative: fall back to finite differences
                # gradients without a graph (once-differentiable ops, or a loss linear in the
                # parameters): finite differences tell the two apart
                if hvps is None:
                    fd = optcore_hvp(closure_as_loss(closure), params, probes, method="fd")
                    hvps = [full(h) for h in fd]
        grads = [g.detach() for g in grads]
        if self._ownership.active():
            # data parallel: the gradient and H v of the mean loss over all ranks' shares
            # (DTensor parameters' products are global already)
            self._ownership.check(("newton", tuple(tuple(p.shape) for p in params)))
            local = [i for i, p in enumerate(params) if not is_dtensor(p)]
            reduce = [grads[i] for i in local]
            if hvps is not None:
                reduce += [hvps[i] for i in local]
            odist.all_reduce_mean(reduce)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        return loss.detach(), [full(g) for g in grads], hvps, vs

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step. Whitening: ``closure`` optional (grads from ``.grad``). Newton: required,
        returning the loss *without* calling ``backward`` (gradients and Hessian-vector
        products are taken here)."""
        c = self._counters
        do_update, n_upd = advance(c, self.param_groups[0]["preconditioner_update_probability"])
        balance = do_update and n_upd % 100 == 99
        loss, grads, hvps, vs = self._gradients(closure, do_update, n_upd)

        offset = 0
        flat_index = {}
        for group in self.param_groups:
            for i, _ in enumerate(group["params"]):
                flat_index[(id(group), i)] = offset + i
            offset += len(group["params"])

        work = []  # units with finite gradients: (uidx, group, params, state, g, h, v, x)
        for uidx, (group, idxs, params) in enumerate(self._units()):
            gl = [grads[flat_index[(id(group), i)]] for i in idxs]
            if all(g is None for g in gl):
                continue
            gl = [
                torch.zeros(p.shape, dtype=p.dtype, device=p.device) if g is None else g
                for p, g in zip(params, gl)
            ]
            for g, p in zip(gl, params):
                self._check_grad(p, g)
            g = self._join(gl, params, self.flat)
            h = v = None
            if hvps is not None and vs is not None:
                h = self._join([hvps[flat_index[(id(group), i)]] for i in idxs], params, self.flat)
                v = self._join([vs[flat_index[(id(group), i)]] for i in idxs], params, self.flat)
            finite = bool(torch.isfinite(g).all()) and (h is None or bool(torch.isfinite(h).all()))
            if not finite:
                for i, p in zip(idxs, params):
                    self._warn_nonfinite(self._param_name(group, i, p))
                continue
            state = self.state[params[0]]
            if not state:
                state["step"] = torch.tensor(0, dtype=torch.int32)
                if group["momentum"] > 0:
                    state["momentum_buffer"] = torch.zeros_like(g)
                self._unit_init(group, state, h if self.newton and h is not None else g)
            t = int(state["step"])
            state["step"].add_(1)
            x = g
            if group["momentum"] > 0:
                beta = min(t / (t + 1), group["momentum"])
                state["momentum_buffer"].mul_(beta).add_(g, alpha=1 - beta)
                x = state["momentum_buffer"]
            work.append((uidx, group, params, state, g, h, v, x))

        owners = None
        if do_update:
            fitted = [self._fitted_tensors(w[3]) for w in work]
            key = tuple((w[0], tuple(tuple(t.shape) for t in f)) for w, f in zip(work, fitted))
            costs = [float(sum(t.numel() ** 1.5 for t in f)) for f in fitted]
            owners = self._ownership.owners_by_cost(key, costs)
        for j, (uidx, group, _, state, g, h, v, x) in enumerate(work):
            if not do_update or (owners is not None and not self._ownership.mine(owners[j])):
                continue
            if self.newton:
                assert h is not None and v is not None
                if group["damping"] > 0:
                    h = h + group["damping"] * self._randn_like(h, n_upd, -1 - uidx)
                self._unit_update(group, state, h, v, balance)
            else:
                target = x if group["whiten_momentum"] else g
                if group["damping"] > 0:
                    target = target + group["damping"] * self._randn_like(target, n_upd, -1 - uidx)
                probe = self._randn_like(target, n_upd, uidx) if self._unit_needs_v(group) else None
                self._unit_update(group, state, target, probe, balance)
        if owners is not None:  # every unit's fitted preconditioner from its owner
            for j, w in enumerate(work):
                odist.broadcast_tensors(self._fitted_tensors(w[3]), src=owners[j])

        for _, group, params, state, _, _, _, x in work:
            pre = self._unit_apply(group, state, x)
            max_rms, max_amp = group["grad_clip_max_rms"], group["grad_clip_max_amp"]
            if math.isfinite(max_rms):
                rms = torch.linalg.vector_norm(pre) / math.sqrt(pre.numel())
                pre = pre * torch.clamp(max_rms / (rms + 1e-30), max=1.0)
            if math.isfinite(max_amp):
                pre = pre.clamp(-max_amp, max_amp) if not pre.is_complex() else pre
            for p, d in zip(params, self._split(pre, params, self.flat)):
                if group["weight_decay"] > 0:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(like(p, d.to(p.dtype)), alpha=-group["lr"])
        return loss

    @staticmethod
    def _fitted_tensors(state: dict[str, Any]) -> list[Tensor]:
        """A unit's preconditioner state: every state tensor but its step and momentum."""
        return [
            v
            for k, v in sorted(state.items())
            if isinstance(v, Tensor) and k not in ("step", "momentum_buffer")
        ]


def closure_as_loss(closure: Callable[[], Any]) -> Callable[[], Tensor]:
    """Wrap a closure (loss or tuple whose first item is the loss) as ``fn() -> loss``."""

    def fn() -> Tensor:
        out = closure()
        return out[0] if isinstance(out, (tuple, list)) else out

    return fn
