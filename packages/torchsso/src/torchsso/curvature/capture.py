"""Recording layer inputs and output gradients with forward hooks.

For every tracked module a forward hook stores the (detached) inputs of the call.
What is stored as the *output gradient* depends on the curvature type:

* ``"Cov"`` (empirical Fisher): a tensor hook on the module output receives the
  gradient of the user's loss during ``loss.backward()``. For a mean-reduced loss
  ``L = (1/B) sum_i l_i`` that gradient is ``(1/B) dl_i/ds_i``, so it is multiplied
  by ``B`` to give the per-example gradient ``dl_i/ds_i``.
* ``"Fisher"`` (Monte-Carlo) and ``"GaussNewton"`` (exact): a forward hook on the
  whole model sees the network output ``f`` and back-propagates vectors ``v_i``
  with ``E[v v^T] = H_out`` (sampled labels, or the columns of a factor of the
  output Hessian) to every recorded layer output with ``torch.autograd.grad``. The
  parameter gradients are not touched; the user's backward pass runs afterwards.
* ``"Hessian"``: nothing is recorded (the block Hessian comes from second
  derivatives of the gradient, see :mod:`torchsso.curvature.shapes`).

Recording only happens while :attr:`Capture.active` is true, i.e. on the steps where
the optimizer updates its curvature, so the other steps run at plain speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Capture", "Record", "output_vectors"]

CURV_TYPES = ("Fisher", "Cov", "GaussNewton", "Hessian")
LOSSES = ("cross_entropy", "mse")


@dataclass
class Record:
    """One forward call of a tracked module: its inputs and per-example output grads.

    ``grads`` holds ``(g, weight)`` pairs where ``g`` has the module output's shape and
    holds per-example gradients (not divided by the batch size); the curvature
    estimate is ``sum_k weight_k * (1/B) sum_i g_ki g_ki^T``.
    """

    inputs: tuple[Any, ...]
    kwargs: dict[str, Any]
    training: bool
    grads: list[tuple[Tensor, float]] = field(default_factory=list)
    # gradient of the user's loss w.r.t. the module output (from the user's backward),
    # kept only for the modules listed in ``Capture.loss_grad_modules``
    loss_grad: Tensor | None = None


def output_vectors(
    output: Tensor,
    curv_type: str,
    loss: str,
    mc_samples: int,
    generator: torch.Generator | None,
) -> list[tuple[Tensor, float]]:
    """Vectors ``v`` (per example, shaped like ``output``) with ``E[v v^T] = H_out``.

    Args:
        output: network output, ``(B, C)`` logits or ``(B, D)`` regression values.
        curv_type: ``"Fisher"`` (``mc_samples`` sampled labels) or ``"GaussNewton"``
            (exact: one vector per output dimension).
        loss: ``"cross_entropy"`` or ``"mse"`` (``F.mse_loss`` with mean reduction,
            i.e. per-example loss ``(1/D) ||f - y||^2``, output Hessian ``(2/D) I``).
        mc_samples: number of sampled labels for ``"Fisher"``.
        generator: random generator for the samples.

    Returns:
        A list of ``(v, weight)`` pairs.
    """
    out = output.detach()
    if out.dim() != 2:
        out = out.reshape(out.shape[0], -1)
    C = out.shape[1]
    if not math.isfinite(float(out.sum())):
        raise FloatingPointError("non-finite curvature: the network output holds NaN or inf")
    vecs: list[tuple[Tensor, float]] = []
    if loss == "cross_entropy":
        low = out.dtype in (torch.float16, torch.bfloat16)
        p = torch.softmax(out.float(), dim=1).to(out.dtype) if low else torch.softmax(out, dim=1)
        if curv_type == "Fisher":
            # labels y ~ Categorical(p) by inverse CDF (one uniform per example; cheaper
            # than torch.multinomial's input validation on every curvature step)
            cdf = torch.cumsum(p, dim=1)
            minus = p.new_full((p.shape[0], 1), -1.0)
            for _ in range(mc_samples):
                u = torch.rand((out.shape[0], 1), generator=generator, dtype=p.dtype)
                if u.device != p.device:
                    u = u.to(p.device)
                y = (cdf < u * cdf[:, -1:]).sum(1, keepdim=True).clamp_(max=C - 1)
                vecs.append((p.scatter_add(1, y, minus), 1.0 / mc_samples))
        else:
            # H = diag(p) - p p^T = sum_c p_c (e_c - p)(e_c - p)^T
            sq = p.sqrt()
            for c in range(C):
                v = p.clone()
                v[:, c] -= 1.0
                vecs.append((v * sq[:, c : c + 1], 1.0))
    else:
        scale = math.sqrt(2.0 / C)
        if curv_type == "Fisher":
            for _ in range(mc_samples):
                eps = torch.randn(out.shape, generator=generator, dtype=out.dtype)
                vecs.append((eps.to(out.device) * scale, 1.0 / mc_samples))
        else:
            for c in range(C):
                v = torch.zeros_like(out)
                v[:, c] = scale
                vecs.append((v, 1.0))
    if out.shape == output.shape:
        return vecs
    return [(v.reshape(output.shape), w) for v, w in vecs]


class Capture:
    """Forward hooks that record what the curvature estimates need.

    Args:
        model: the whole network (its forward hook drives Fisher / Gauss-Newton).
        modules: the tracked modules, in order.
        curv_type: one of ``"Fisher"``, ``"Cov"``, ``"GaussNewton"``, ``"Hessian"``.
        loss: ``"cross_entropy"`` or ``"mse"``.
        mc_samples: sampled labels per step for ``"Fisher"``.
        generator: random generator for the sampled labels.
        batch_dims: per module, the batch dimension of its first input (default 0).
    """

    def __init__(
        self,
        model: nn.Module,
        modules: list[nn.Module],
        curv_type: str,
        loss: str,
        mc_samples: int,
        generator: torch.Generator | None,
        batch_dims: list[int] | None = None,
    ) -> None:
        self.active = False
        self.curv_type = curv_type
        self.loss = loss
        self.mc_samples = mc_samples
        self.generator = generator
        self.records: list[list[Record]] = [[] for _ in modules]
        # index -> most rows: the modules whose output gradient of the user's loss is kept in
        # ``Record.loss_grad`` (set by the optimizer) when the output has at most that many
        # rows
        self.loss_grad_modules: dict[int, int] = {}
        # (record, module output, module index if its loss gradient is kept else -1)
        self._pending: list[tuple[Record, Tensor, int]] = []
        self._batch_dims = batch_dims or [0] * len(modules)
        self._handles = []
        for i, m in enumerate(modules):
            self._handles.append(
                m.register_forward_hook(self._make_hook(i), with_kwargs=True, always_call=False)
            )
        if curv_type in ("Fisher", "GaussNewton"):
            self._handles.append(model.register_forward_hook(self._model_hook))

    def clear(self) -> None:
        """Forget all records."""
        for r in self.records:
            r.clear()
        self._pending.clear()

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, index: int):
        bdim = self._batch_dims[index]

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not self.active or not torch.is_grad_enabled():
                return None
            out = output[0] if isinstance(output, tuple) else output
            if not isinstance(out, Tensor) or not out.requires_grad:
                return None
            inputs = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
            kw = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in kwargs.items()}
            rec = Record(inputs, kw, module.training)
            self.records[index].append(rec)
            max_rows = self.loss_grad_modules.get(index, -1)
            keep = out.dim() > 0 and out.numel() <= max_rows * out.shape[-1]
            if self.curv_type == "Cov":
                n = out.shape[bdim]

                def grad_hook(go: Tensor) -> None:
                    rec.grads.append((go.detach() * n, 1.0))
                    if keep:
                        rec.loss_grad = go.detach()

                out.register_hook(grad_hook)
            elif self.curv_type in ("Fisher", "GaussNewton"):
                # the loss-gradient hook (if kept) is registered by the model hook, after
                # the curvature vectors have been back-propagated
                self._pending.append((rec, out, index if keep else -1))
                if isinstance(output, Tensor):
                    # hand the network a copy, so that an in-place op downstream (ReLU with
                    # inplace=True) cannot change the tensor the gradient is taken against
                    return output.clone()
            return None

        return hook

    def _model_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self.active or not self._pending:
            return
        out = output[0] if isinstance(output, tuple) else output
        if not isinstance(out, Tensor) or not out.requires_grad:
            self._pending.clear()
            return
        pending = self._pending
        self._pending = []
        targets = [t for _, t, _ in pending]
        for v, w in output_vectors(out, self.curv_type, self.loss, self.mc_samples, self.generator):
            grads = torch.autograd.grad(out, targets, v, retain_graph=True, allow_unused=True)
            for (rec, t, _), g in zip(pending, grads):
                rec.grads.append((torch.zeros_like(t) if g is None else g, w))
        for rec, t, keep in pending:
            if keep >= 0:
                t.register_hook(_loss_grad_hook(rec))


def _loss_grad_hook(rec: Record):
    def hook(go: Tensor) -> None:
        rec.loss_grad = go.detach()

    return hook
