"""``SecondOrderOptimizer``: gradients preconditioned by layer-wise curvature.

The update of every layer block is ``w <- w - lr * (C + damping I)^-1 grad`` where
``C`` is the block's curvature (Fisher, empirical Fisher "Cov", Gauss-Newton or
Hessian) in the block's shape (``Kron`` / ``Diag`` / ``Full`` / ``Unit``), kept as a
moving average and re-estimated / re-inverted at their own intervals.

Reference: K. Osawa et al., "Large-Scale Distributed Second-Order Optimization Using
Kronecker-Factored Approximate Curvature for Deep Convolutional Neural Networks", CVPR
2019; J. Martens & R. Grosse, "Optimizing Neural Networks with Kronecker-factored
Approximate Curvature", ICML 2015.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_map

from optcore.distributed import (
    all_reduce_mean,
    assign_by_cost,
    broadcast_tensors,
    get_rank,
    get_world_size,
    is_distributed,
)

from ..curvature.capture import CURV_TYPES, LOSSES, Capture
from ..curvature.factory import build_blocks
from ..curvature.shapes import DAMPING_SPLITS, LayerCurvature

__all__ = ["SecondOrderOptimizer"]

_ALIASES = {"GN": "GaussNewton", "Gauss-Newton": "GaussNewton", "GGN": "GaussNewton"}
Interval = int | Callable[[int], bool]
Damping = float | Callable[[int], float]


def _finite(ts: list[Tensor]) -> bool:
    """All entries finite (one reduction per tensor, one host read)."""
    total = ts[0].sum()
    for t in ts[1:]:
        total = total + t.sum()
    return math.isfinite(float(total))


def _due(interval: Interval, step: int) -> bool:
    return bool(interval(step)) if callable(interval) else step % interval == 0


_ADAPT_KEYS = ("interval", "omega", "min_damping", "max_damping")


def _adaptation(value: Any, damping: Any, acc_steps: int) -> dict[str, float] | None:
    """Validated ``curv_kwargs["damping_adaptation"]`` (``None`` when off). The default
    (``None``) turns it on where it applies: a constant ``damping`` within the default
    bounds ``[1e-6, 1e2]`` and ``acc_steps=1``."""
    if value is None:
        value = not callable(damping) and 1e-6 <= float(damping) <= 1e2 and acc_steps == 1
    if value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise TypeError(
            "curv_kwargs['damping_adaptation'] must be a bool or a dict with keys "
            f"{_ADAPT_KEYS}, got {type(value).__name__}"
        )
    unknown = set(value) - set(_ADAPT_KEYS)
    if unknown:
        raise ValueError(f"curv_kwargs['damping_adaptation']: unknown keys {sorted(unknown)}")
    interval = value.get("interval", 5)
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        raise ValueError(
            f"curv_kwargs['damping_adaptation']['interval'] must be a positive int, got {interval!r}"
        )
    omega = float(value.get("omega", (19.0 / 20.0) ** interval))
    if not 0.0 < omega < 1.0:
        raise ValueError(
            f"curv_kwargs['damping_adaptation']['omega'] must be in (0, 1), got {omega}"
        )
    lo = float(value.get("min_damping", 1e-6))
    hi = float(value.get("max_damping", 1e2))
    if not (0.0 < lo <= hi and math.isfinite(hi)):
        raise ValueError(
            "curv_kwargs['damping_adaptation']: need 0 < min_damping <= max_damping < inf, "
            f"got {lo}, {hi}"
        )
    if callable(damping):
        raise ValueError(
            "curv_kwargs['damping_adaptation'] needs a float curv_kwargs['damping'] (the "
            "initial value), not a schedule"
        )
    if not lo <= float(damping) <= hi:
        raise ValueError(
            f"curv_kwargs['damping'] ({damping}) must lie in [min_damping, max_damping] = "
            f"[{lo}, {hi}] under damping_adaptation"
        )
    return {"interval": interval, "omega": omega, "min_damping": lo, "max_damping": hi}


def _check_interval(name: str, value: Any) -> None:
    if callable(value):
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int or a callable step -> bool, got {value!r}")


class SecondOrderOptimizer(torch.optim.Optimizer):
    """Second-order optimizer with layer-wise Kron / Diag / Full / Unit curvature.

    Args:
        model: the network (an ``nn.Module``; may be wrapped in DDP).
        curv_type: ``"Fisher"`` (Monte-Carlo sampled labels), ``"Cov"`` (empirical
            Fisher), ``"GaussNewton"`` (exact GGN = exact Fisher for cross-entropy) or
            ``"Hessian"`` (exact block Hessian; the closure must call
            ``loss.backward(create_graph=True)``; shapes ``Diag``/``Full`` only).
        curv_shapes: shape per layer class name, e.g. ``{"Linear": "Kron",
            "Conv2d": "Kron", "BatchNorm2d": "Diag"}``, or one shape for all layers.
        curv_kwargs: ``damping`` (float or ``step -> float``, default ``1e-3``),
            ``ema_decay`` (weight of the *new* estimate, as in PyTorch-SSO; 1 = no
            averaging, default 1), ``pi_type`` (``"trace_norm"`` factored damping or
            ``"none"``), ``damping_split`` (how factored damping splits ``damping``
            between the factors: ``"tikhonov"`` (default), the split that adds exactly
            ``damping`` at the factors' mean eigenvalues, see
            :func:`torchsso.curvature.shapes._split_damping`, or ``"sqrt"``,
            ``pi sqrt(damping)`` and ``sqrt(damping) / pi``, which damps more),
            ``inverse_method`` (``"cholesky"`` or ``"eigh"``: exact
            Tikhonov damping of ``A (x) G``), ``loss`` (``"cross_entropy"`` or ``"mse"``),
            ``num_mc`` (sampled labels per step for ``"Fisher"``), ``approx_type``
            (``"mc"`` or ``"exact"`` for ``"Fisher"``), ``damping_adaptation``
            (Levenberg-Marquardt adaptation of ``damping``, Martens & Grosse 2015, sec.
            6.5, see :meth:`step`; ``damping`` is then the initial value): ``True`` or a
            dict ``{"interval": 5, "omega": (19/20)**interval, "min_damping": 1e-6,
            "max_damping": 1e2}``, ``False`` turns it off; the default (``None``) turns it
            on with those settings where it applies: a constant ``damping`` in
            ``[1e-6, 1e2]`` and ``acc_steps=1``.
        lr: learning rate.
        momentum: heavy-ball momentum.
        momentum_type: ``"preconditioned"`` (momentum on the preconditioned gradient)
            or ``"raw"`` (momentum on the gradient, then preconditioning).
        weight_decay: decoupled decay added to the update (after preconditioning).
        l2_reg: L2 term added to the gradient before preconditioning.
        acc_steps: the closure is called this many times per step; gradients and
            curvature are averaged over the calls (gradient accumulation).
        non_reg_for_bn: no ``weight_decay`` / ``l2_reg`` for normalization layers.
        curv_interval: re-estimate the curvature every this many steps (or a callable
            ``step -> bool``).
        inv_interval: recompute the inverses every this many steps (or a callable);
            default ``None``: whenever the curvature was re-estimated.
        kl_clip: KL clipping (default ``1e-4``; ``None`` turns it off): the preconditioned
            gradient ``u`` is scaled, before momentum, so that ``lr^2 sum(u . grad) <= kl_clip``
            (a bound on the step's predicted KL change; Ba et al., 2017). The defaults
            (``1e-4``, ``damping_split="tikhonov"``, damping adaptation) were chosen for
            robustness to lr and damping (the package README has the measurements); the
            Tikhonov split damps less than ``"sqrt"``, so without KL clipping prefer
            ``damping_split="sqrt"``.
        max_update_ratio: if set, the step of each layer block is scaled down to at most
            this fraction of the block's weight norm (a trust ratio in the spirit of
            PyTorch-SSO's LARS options; trades some speed for robustness to lr / damping).
        seed: seed of the generator for sampled labels.

    The closure must zero the gradients, compute the loss, call ``loss.backward()``
    and return ``(loss, output)``.

    Example:
        >>> opt = SecondOrderOptimizer(model, "Fisher", {"Linear": "Kron"}, lr=0.1,
        ...                            curv_kwargs={"damping": 1e-2})
        >>> def closure():
        ...     opt.zero_grad()
        ...     out = model(x); loss = F.cross_entropy(out, y); loss.backward()
        ...     return loss, out
        >>> loss = opt.step(closure)
    """

    def __init__(
        self,
        model: nn.Module,
        curv_type: str,
        curv_shapes: dict[str, str] | str,
        curv_kwargs: dict[str, Any] | None = None,
        *,
        lr: float = 0.01,
        momentum: float = 0.0,
        momentum_type: str = "preconditioned",
        weight_decay: float = 0.0,
        l2_reg: float = 0.0,
        acc_steps: int = 1,
        non_reg_for_bn: bool = False,
        curv_interval: Interval = 1,
        inv_interval: Interval | None = None,
        kl_clip: float | None = 1e-4,
        max_update_ratio: float | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        curv_type = _ALIASES.get(curv_type, curv_type)
        if curv_type not in CURV_TYPES:
            raise ValueError(f"curv_type must be one of {CURV_TYPES}, got {curv_type!r}")
        kw = dict(curv_kwargs or {})
        unknown = set(kw) - {
            "damping", "ema_decay", "pi_type", "inverse_method", "loss", "num_mc",
            "approx_type", "mc_samples", "damping_split", "damping_adaptation",
        }  # fmt: skip
        if unknown:
            raise ValueError(f"curv_kwargs: unknown keys {sorted(unknown)}")
        if kw.get("approx_type", "mc") not in ("mc", "exact"):
            raise ValueError(
                f"curv_kwargs['approx_type'] must be 'mc' or 'exact', got {kw['approx_type']!r}"
            )
        if curv_type == "Fisher" and kw.get("approx_type") == "exact":
            curv_type = "GaussNewton"
        loss = kw.get("loss", "cross_entropy")
        if loss not in LOSSES:
            raise ValueError(f"curv_kwargs['loss'] must be one of {LOSSES}, got {loss!r}")
        damping = kw.get("damping", 1e-3)
        if not callable(damping) and not (isinstance(damping, (int, float)) and damping >= 0):
            raise ValueError(f"curv_kwargs['damping'] must be >= 0 or a callable, got {damping!r}")
        ema = kw.get("ema_decay", 1.0)
        if not 0.0 < float(ema) <= 1.0:
            raise ValueError(f"curv_kwargs['ema_decay'] must be in (0, 1], got {ema!r}")
        if kw.get("pi_type", "trace_norm") not in ("trace_norm", "none"):
            raise ValueError(
                f"curv_kwargs['pi_type'] must be 'trace_norm' or 'none', got {kw['pi_type']!r}"
            )
        if kw.get("damping_split", "tikhonov") not in DAMPING_SPLITS:
            raise ValueError(
                f"curv_kwargs['damping_split'] must be one of {DAMPING_SPLITS}, "
                f"got {kw['damping_split']!r}"
            )
        if kw.get("inverse_method", "cholesky") not in ("cholesky", "eigh"):
            raise ValueError("curv_kwargs['inverse_method'] must be 'cholesky' or 'eigh'")
        adapt = _adaptation(kw.get("damping_adaptation"), damping, acc_steps)
        if adapt is not None and acc_steps != 1:
            raise ValueError(
                "curv_kwargs['damping_adaptation'] needs acc_steps=1 (the loss after the step "
                "is re-evaluated with one closure call)"
            )
        num_mc = int(kw.get("num_mc", kw.get("mc_samples", 1)))
        if num_mc < 1:
            raise ValueError(f"curv_kwargs['num_mc'] must be >= 1, got {num_mc}")
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum}")
        if momentum_type not in ("preconditioned", "raw"):
            raise ValueError(
                f"momentum_type must be 'preconditioned' or 'raw', got {momentum_type!r}"
            )
        if weight_decay < 0 or l2_reg < 0:
            raise ValueError("weight_decay and l2_reg must be >= 0")
        if not isinstance(acc_steps, int) or acc_steps < 1:
            raise ValueError(f"acc_steps must be a positive int, got {acc_steps!r}")
        _check_interval("curv_interval", curv_interval)
        if inv_interval is not None:
            _check_interval("inv_interval", inv_interval)
        if kl_clip is not None and kl_clip <= 0:
            raise ValueError(f"kl_clip must be > 0 or None, got {kl_clip}")
        if max_update_ratio is not None and max_update_ratio <= 0:
            raise ValueError(f"max_update_ratio must be > 0 or None, got {max_update_ratio}")

        self.model = model
        inner = model.module if isinstance(model, DistributedDataParallel) else model
        self._ddp = isinstance(model, DistributedDataParallel)
        self.curv_type = curv_type
        self.blocks: list[LayerCurvature] = build_blocks(inner, curv_shapes, curv_type)
        self.curv_opts = {
            "pi_type": kw.get("pi_type", "trace_norm"),
            "damping_split": kw.get("damping_split", "tikhonov"),
            "inverse_method": kw.get("inverse_method", "cholesky"),
        }
        # inverses recomputed on every step are used once: Kron blocks then keep Cholesky
        # factors and apply them by triangular solves instead of forming explicit inverses
        self._every_step = inv_interval == 1 or (inv_interval is None and curv_interval == 1)
        self._solve_opts = {**self.curv_opts, "solve": True}
        self.damping = damping
        self.damping_adaptation = adapt
        self.ema_decay = float(ema)
        self.acc_steps = acc_steps
        self.curv_interval = curv_interval
        self.inv_interval = inv_interval
        self.kl_clip = kl_clip
        self.generator = torch.Generator().manual_seed(seed)
        norm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)
        groups = []
        for b in self.blocks:
            no_reg = non_reg_for_bn and isinstance(b.module, norm)
            groups.append(
                {
                    "params": b.params,
                    "curv_shape": b.shape,
                    "weight_decay": 0.0 if no_reg else weight_decay,
                    "l2_reg": 0.0 if no_reg else l2_reg,
                }
            )
        defaults = dict(lr=lr, momentum=momentum, momentum_type=momentum_type,
                        weight_decay=weight_decay, l2_reg=l2_reg,
                        max_update_ratio=max_update_ratio)  # fmt: skip
        super().__init__(groups, defaults)
        self.capture = Capture(
            inner,
            [b.module for b in self.blocks],
            curv_type,
            loss,
            num_mc,
            self.generator,
            [b.bdim for b in self.blocks],
        )
        # a Linear layer's gradient is D^T X of its input rows X and output gradients D, so
        # with fewer rows than the layer's sizes the Kronecker preconditioner can act on the
        # rows (Kron.precondition_dot_lowrank, which checks the product) on the steps that
        # record them for the curvature anyway (every step for every-step K-FAC)
        self._lowrank_enabled = acc_steps == 1 and curv_type != "Hessian" and not self._ddp
        self._lowrank_rows: dict[int, tuple[Tensor, Tensor]] = {}
        self._probe_gen = torch.Generator().manual_seed(seed + 1)
        if self._lowrank_enabled:
            rows = [b.lowrank_max_rows(self._every_step) for b in self.blocks]
            self.capture.loss_grad_modules = {i: r for i, r in enumerate(rows) if r > 0}

    # ------------------------------------------------------------------ helpers
    def _anchor(self, block: LayerCurvature) -> dict[str, Any]:
        return self.state[block.params[0]]

    @property
    def global_step(self) -> int:
        """Number of completed steps."""
        return int(self.state[self.blocks[0].params[0]].get("global_step", 0))

    def current_damping(self, step: int | None = None) -> float:
        """The damping at ``step`` (default: the current step); under
        ``damping_adaptation`` the current adapted value (``step`` is ignored)."""
        if self.damping_adaptation is not None:
            return float(self.state[self.blocks[0].params[0]].get("damping", self.damping))
        s = self.global_step if step is None else step
        d = float(self.damping(s)) if callable(self.damping) else float(self.damping)
        if not (d >= 0 and math.isfinite(d)):
            raise ValueError(f"damping schedule returned {d!r} at step {s}")
        return d

    def _block_damping(self, block: LayerCurvature, base: float) -> float:
        return base

    def _prior_l2(self) -> float:
        return 0.0

    def _run_closure(self, closure: Callable[[], Any]) -> Tensor:
        total: Tensor | None = None
        acc: list[Tensor | None] | None = None
        params = [p for g in self.param_groups for p in g["params"]]
        for i in range(self.acc_steps):
            res = closure()
            if res is None:
                raise TypeError("closure returned None; it must return (loss, output)")
            loss = res[0] if isinstance(res, (tuple, list)) else res
            if not isinstance(loss, Tensor):
                raise TypeError(
                    f"closure must return (loss, output) with a tensor loss, got {type(loss).__name__}"
                )
            if loss.numel() != 1:
                raise ValueError(
                    f"closure returned a loss with shape {tuple(loss.shape)}: reduce it (mean) first"
                )
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"closure returned a non-finite loss ({float(loss)})")
            total = loss.detach() if total is None else total + loss.detach()
            if self.acc_steps > 1:
                gs = [p.grad for p in params]
                if acc is None:
                    acc = [None if g is None else g.detach().clone() for g in gs]
                else:
                    acc = [
                        a if g is None else (g.detach().clone() if a is None else a + g)
                        for a, g in zip(acc, gs)
                    ]
                if i < self.acc_steps - 1 and self.curv_type == "Hessian":
                    self._hessian_pending(accumulate=True)
        if acc is not None:
            for p, a in zip(params, acc):
                p.grad = None if a is None else a / self.acc_steps
        assert total is not None
        return total / self.acc_steps

    def _forward_backward(self, closure: Callable[[], Any]) -> Tensor:
        """Run the closure(s) of one step; subclasses sample weights around it."""
        return self._run_closure(closure)

    def _hessian_pending(self, accumulate: bool = False) -> None:
        ests = getattr(self, "_hess_acc", None) or []
        new = []
        for b in self.blocks:
            gs = [p.grad for p in b.params]
            if any(g is None or g.grad_fn is None for g in gs):
                raise ValueError(
                    "curv_type='Hessian' needs the closure to call loss.backward(create_graph=True)"
                )
            new.append(b.hessian(gs))  # type: ignore[arg-type]
        if ests:
            new = [{k: v + e[k] for k, v in n.items()} for n, e in zip(new, ests)]
        self._hess_acc = new
        self._hess_count = getattr(self, "_hess_count", 0) + 1
        if accumulate:
            for p in self.blocks_params():
                if p.grad is not None:
                    p.grad = p.grad.detach()

    def blocks_params(self) -> list[Tensor]:
        """All parameters covered by the blocks, in order."""
        return [p for b in self.blocks for p in b.params]

    def _estimates(self) -> list[dict[str, Tensor] | None]:
        if self.curv_type == "Hessian":
            self._hessian_pending()
            n = self._hess_count
            ests: list[dict[str, Tensor] | None] = [
                {k: v / n for k, v in e.items()} for e in self._hess_acc
            ]
            self._hess_acc, self._hess_count = [], 0
            for p in self.blocks_params():
                if p.grad is not None:
                    p.grad = p.grad.detach()
            return ests
        return [b.estimate(recs) for b, recs in zip(self.blocks, self.capture.records)]

    def _keep_lowrank_rows(self) -> None:
        """Keep, per block, the input and loss gradient of the step's single forward call
        (for :meth:`Kron.precondition_dot_lowrank`)."""
        self._lowrank_rows = {}
        if not self._lowrank_enabled or is_distributed():
            return
        for i in self.capture.loss_grad_modules:
            recs = self.capture.records[i]
            if len(recs) == 1 and recs[0].loss_grad is not None and recs[0].inputs:
                x = recs[0].inputs[0]
                if isinstance(x, Tensor):
                    self._lowrank_rows[i] = (x, recs[0].loss_grad)

    def _update_curvature(self) -> bool:
        ests = self._estimates()
        self.capture.clear()
        if is_distributed():
            flat = [t for e in ests if e is not None for t in e.values()]
            all_reduce_mean(flat)
        updated = False
        new = [v for e in ests if e is not None for v in e.values()]
        if new and not _finite(new):  # one host read; name the culprit only on failure
            for b, est in zip(self.blocks, ests):
                for k, v in (est or {}).items():
                    if not math.isfinite(float(v.sum())):
                        raise FloatingPointError(f"non-finite curvature {k!r} in layer {b.name!r}")
        for b, est in zip(self.blocks, ests):
            if est is None:
                continue
            st = self._anchor(b)
            for k, v in est.items():
                old = st.get("curv_" + k)
                if old is None or self.ema_decay == 1.0:
                    st["curv_" + k] = v.detach()
                else:  # in place (as torch.optim's moment buffers), one fused kernel
                    old.lerp_(v, self.ema_decay)
            updated = True
        return updated

    def _factors(self, b: LayerCurvature) -> dict[str, Tensor] | None:
        st = self._anchor(b)
        f = {k[5:]: v for k, v in st.items() if k.startswith("curv_")}
        return f or None

    def _inv_opts(self) -> dict[str, Any]:
        return self._solve_opts if self._every_step else self.curv_opts

    def _invert(self, b: LayerCurvature, damping: float) -> None:
        f = self._factors(b)
        if f is None:
            return
        inv = b.inverse(f, self._block_damping(b, damping), self._inv_opts())
        st = self._anchor(b)
        for k in [k for k in st if k.startswith("inv_")]:
            del st[k]
        for k, v in inv.items():
            st["inv_" + k] = v

    def _update_inverses(self, damping: float) -> None:
        ws = get_world_size()
        have = all(
            any(k.startswith("inv_") for k in self._anchor(b)) or self._factors(b) is None
            for b in self.blocks
        )
        if ws == 1 or not have:
            for b in self.blocks:
                self._invert(b, damping)
            return
        owners = assign_by_cost([b.cost() for b in self.blocks], ws)
        rank = get_rank()
        for b, o in zip(self.blocks, owners):
            if o == rank:
                self._invert(b, damping)
        for b, o in zip(self.blocks, owners):
            st = self._anchor(b)
            keys = sorted(k for k in st if k.startswith("inv_"))
            ts = [st[k] for k in keys]
            if ts:
                broadcast_tensors(ts, src=o)

    def _inverse(self, b: LayerCurvature) -> dict[str, Tensor] | None:
        st = self._anchor(b)
        inv = {k[4:]: v for k, v in st.items() if k.startswith("inv_")}
        return inv or None

    def _sync_grads(self) -> None:
        if is_distributed() and not self._ddp:
            gs = [p.grad for p in self.blocks_params() if p.grad is not None]
            all_reduce_mean(gs)

    # --------------------------------------------------------------------- step
    def _precondition(self, b: LayerCurvature, grads: list[Tensor], damping: float) -> list[Tensor]:
        inv = self._inverse(b)
        if inv is None:
            return grads
        out = b.precondition(inv, grads)
        tries = 0
        while not _finite(out):
            tries += 1
            if tries > 4:
                raise FloatingPointError(
                    f"preconditioned gradient of layer {b.name!r} stays non-finite after raising "
                    "the damping"
                )
            damping = max(damping, 1e-8) * 10.0
            self._invert(b, damping)
            inv = self._inverse(b)
            assert inv is not None
            out = b.precondition(inv, grads)
        return out

    @torch.no_grad()
    def _apply(self, damping: float) -> None:
        # pass 1: precondition every block; per block the dot u . v (u = C^-1 v, >= 0) both
        # drives the KL clipping and, summed, detects a non-finite update with one host read
        pre: list[tuple[dict[str, Any], LayerCurvature, list[Tensor], list[Tensor], Tensor]] = []
        rows, self._lowrank_rows = self._lowrank_rows, {}
        for i, (group, b) in enumerate(zip(self.param_groups, self.blocks)):
            params = group["params"]
            if all(p.grad is None for p in params):
                continue
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
            l2 = group["l2_reg"] + self._prior_l2()
            if l2:
                grads = [g.add(p, alpha=l2) for g, p in zip(grads, params)]
            mom = group["momentum"]
            vs = grads
            if mom and group["momentum_type"] == "raw":
                vs = []
                for p, g in zip(params, grads):
                    st = self.state[p]
                    buf = st.get("momentum_buffer")
                    buf = g.clone() if buf is None else buf.mul_(mom).add_(g)
                    st["momentum_buffer"] = buf
                    vs.append(buf)
            inv = self._inverse(b)
            if inv is None:
                upd, dot = vs, sum((v * v).sum() for v in vs)
            else:
                res = None
                if i in rows and vs is grads and not l2:
                    probe = torch.randn(
                        grads[0].shape[-1] + len(grads) - 1, generator=self._probe_gen
                    )
                    res = b.precondition_dot_lowrank(inv, vs, *rows[i], probe)
                upd, dot = b.precondition_dot(inv, vs) if res is None else res
            pre.append((group, b, vs, upd, dot * group["lr"] ** 2))  # type: ignore[operator]
        if not pre:
            return
        kl = float(torch.stack([d for *_, d in pre]).sum())
        if not math.isfinite(kl):  # recovery path: raise the damping of the culprits
            for i, (group, b, vs, upd, dot) in enumerate(pre):
                if not math.isfinite(float(dot)):
                    upd = self._precondition(b, vs, damping)
                    dot = sum((u * v).sum() for u, v in zip(upd, vs)) * group["lr"] ** 2
                    pre[i] = (group, b, vs, upd, dot)  # type: ignore[assignment]
            kl = float(torch.stack([d for *_, d in pre]).sum())
            if not math.isfinite(kl):
                raise FloatingPointError("the preconditioned gradient is not finite")
        # KL clipping (Ba et al. 2017): scale the preconditioned gradient, before momentum,
        # so that lr^2 sum(u . g) <= kl_clip
        nu = 1.0
        if self.kl_clip is not None and kl > self.kl_clip:
            nu = math.sqrt(self.kl_clip / kl)
        for group, _b, _vs, upd, _dot in pre:
            params = group["params"]
            mom = group["momentum"]
            if mom and group["momentum_type"] != "raw":
                bufs = []
                for p in params:
                    st = self.state[p]
                    buf = st.get("momentum_buffer")
                    if buf is None:
                        buf = st["momentum_buffer"] = torch.zeros_like(p)
                    bufs.append(buf)
                torch._foreach_mul_(bufs, mom)
                torch._foreach_add_(bufs, upd, alpha=nu)
                upd, scale = bufs, group["lr"]
            else:
                scale = group["lr"] * nu
            if scale == 0:
                continue
            if group["weight_decay"]:  # decoupled: lr * weight_decay * p, not KL-clipped
                upd = list(
                    torch._foreach_add(
                        upd, params, alpha=group["weight_decay"] * group["lr"] / scale
                    )
                )
            ratio = group.get("max_update_ratio")
            if ratio is not None:
                # trust ratio: the step of a layer is at most `ratio` times its weight norm
                wn = math.sqrt(sum(float((p * p).sum()) for p in params))
                un = scale * math.sqrt(sum(float((u * u).sum()) for u in upd))
                if un > ratio * wn > 0:
                    scale *= ratio * wn / un
            torch._foreach_add_(params, upd, alpha=-scale)

    @torch.no_grad()
    def predicted_reduction(
        self, grads: list[Tensor | None], deltas: list[Tensor], damping: float
    ) -> Tensor:
        """The quadratic model ``M(d) = g^T d + 1/2 d^T (C + damping I) d`` of the change of
        the loss for the parameter change ``d`` (``deltas``, per parameter of
        :meth:`blocks_params`), with ``C`` the curvature the optimizer holds (the moving
        average of the blocks' Kron / Diag / Full / Unit estimates, without the factored
        damping) and ``g`` the gradients (``None``: zero)."""
        total = torch.zeros((), dtype=deltas[0].dtype, device=deltas[0].device)
        i = 0
        for b in self.blocks:
            n = len(b.params)
            ds, gs = deltas[i : i + n], grads[i : i + n]
            i += n
            for g, d in zip(gs, ds):
                if g is not None:
                    total += (g * d).sum()
                total += 0.5 * damping * (d * d).sum()
            f = self._factors(b)
            if f is not None:
                total += 0.5 * b.quad(f, ds)
        return total

    def _adapt_damping(
        self,
        closure: Callable[[], Any],
        loss: Tensor,
        before: list[Tensor],
        grads: list[Tensor | None],
        damping: float,
    ) -> None:
        """Levenberg-Marquardt rule: ``rho = (h(theta + d) - h(theta)) / M(d)`` on the step's
        batch; ``damping *= omega`` if ``rho > 3/4``, ``/= omega`` if ``rho < 1/4``."""
        adapt = self.damping_adaptation
        assert adapt is not None
        params = self.blocks_params()
        with torch.no_grad():
            deltas = [p.detach() - b for p, b in zip(params, before)]
        pred = self.predicted_reduction(grads, deltas, damping)
        self.capture.active = False
        res = self._evaluate(closure)  # the loss after the step, same batch
        new = res[0] if isinstance(res, (tuple, list)) else res
        if not isinstance(new, Tensor) or new.numel() != 1:
            raise TypeError("closure must return (loss, output) with a scalar tensor loss")
        vals = torch.stack([loss.detach().reshape(()), new.detach().reshape(()).to(loss.dtype)])
        if is_distributed():
            all_reduce_mean([vals])
        actual = float(vals[1] - vals[0])
        m = float(pred)
        if not math.isfinite(actual):
            rho = -math.inf
        elif m < 0:
            rho = actual / m
        else:  # the model predicts no decrease: only an actual increase says anything
            rho = -math.inf if actual > 0 else math.nan
        d = damping
        if rho > 0.75:
            d = damping * adapt["omega"]
        elif rho < 0.25:
            d = damping / adapt["omega"]
        anchor = self._anchor(self.blocks[0])
        anchor["damping"] = min(max(d, adapt["min_damping"]), adapt["max_damping"])
        anchor["damping_rho"] = rho
        for p in params:  # drop the gradients of the re-evaluation
            p.grad = None

    def _evaluate(self, closure: Callable[[], Any]) -> Any:
        """Call the closure for its loss only: the model's forward runs without autograd
        and its output is handed to the loss as a fresh leaf, so the closure's
        ``backward()`` stops at the output (no backward pass through the network, no
        parameter gradients). A DDP-wrapped model is run as is (its reducer expects the
        full backward)."""
        if self._ddp:
            return closure()
        inner = self.model
        mode = torch.is_grad_enabled()
        depth = [0]

        def pre(_m: nn.Module, _args: Any) -> None:
            depth[0] += 1
            if depth[0] == 1:
                torch.set_grad_enabled(False)

        def post(_m: nn.Module, _args: Any, out: Any) -> Any:
            depth[0] -= 1
            if depth[0]:
                return out
            torch.set_grad_enabled(mode)

            def leaf(t: Any) -> Any:
                if isinstance(t, Tensor) and t.is_floating_point():
                    return t.detach().requires_grad_(True)
                return t

            return tree_map(leaf, out)

        handles = [
            inner.register_forward_pre_hook(pre),
            inner.register_forward_hook(post, always_call=True),
        ]
        try:
            return closure()
        finally:
            for h in handles:
                h.remove()
            torch.set_grad_enabled(mode)

    def step(self, closure: Callable[[], Any] | None = None) -> Tensor:  # type: ignore[override]
        """One optimization step.

        Under ``curv_kwargs["damping_adaptation"]``, every ``interval``-th step calls the
        closure a second time after the update, on the same batch, to measure the actual
        change of the loss ``h(theta + d) - h(theta)`` (the model's forward runs without
        autograd there and the closure's ``backward()`` stops at the model output, so this
        costs about one forward pass); its ratio ``rho`` to the change
        predicted by :meth:`predicted_reduction` (with the damping used for the step) sets
        the damping of the next steps: ``damping *= omega`` when ``rho > 3/4`` (the model is
        trusted), ``damping /= omega`` when ``rho < 1/4`` (including any step that raised
        the loss while the model predicted a decrease), bounded by ``min_damping`` /
        ``max_damping``. The re-evaluation's gradients are discarded (set to ``None``) and
        no curvature is recorded from it; it runs the model once more in training mode
        (BatchNorm running statistics see that batch twice). The adapted damping and the
        last ``rho`` are kept in the optimizer state (``state_dict``).

        Args:
            closure: zeroes the gradients, computes the loss, calls ``backward`` and
                returns ``(loss, output)``. Required.

        Returns:
            The loss (averaged over ``acc_steps`` calls).
        """
        if closure is None:
            raise TypeError("step() needs a closure returning (loss, output)")
        anchor = self.state[self.blocks[0].params[0]]
        k = int(anchor.get("global_step", 0))
        first = not any(self._factors(b) is not None for b in self.blocks)
        upd_curv = first or _due(self.curv_interval, k)
        self.capture.clear()
        self.capture.active = upd_curv and self.curv_type != "Hessian"
        if "rng_state" in anchor:
            self.generator.set_state(anchor["rng_state"].to(torch.uint8).cpu())
        try:
            loss = self._forward_backward(closure)
        finally:
            self.capture.active = False
        damping = self.current_damping(k)
        if upd_curv:
            self._keep_lowrank_rows()
        updated = self._update_curvature() if upd_curv else False
        self.capture.clear()
        self._sync_grads()
        missing = any(
            self._inverse(b) is None and self._factors(b) is not None for b in self.blocks
        )
        inv_due = updated if self.inv_interval is None else _due(self.inv_interval, k)
        if missing or inv_due:
            self._update_inverses(damping)
        adapt = self.damping_adaptation
        if adapt is not None and (k + 1) % int(adapt["interval"]) == 0:
            params = self.blocks_params()
            before = [p.detach().clone() for p in params]
            # _apply reads the gradients without changing them, and the model M(d) is
            # evaluated before the closure runs again: no copies needed
            grads = [None if p.grad is None else p.grad.detach() for p in params]
            self._apply(damping)
            self._adapt_damping(closure, loss, before, grads, damping)
        else:
            self._apply(damping)
        anchor["global_step"] = k + 1
        anchor["rng_state"] = self.generator.get_state()
        return loss
