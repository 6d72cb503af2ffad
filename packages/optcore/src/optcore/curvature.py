"""Curvature-vector products: Hessian-vector and Gauss-Newton-vector.

Closure style: ``fn()`` recomputes a scalar loss from ``params`` (tensors with
``requires_grad=True``), as an optimizer's closure does.

* ``hvp(..., method="autograd")``: exact, by double backward (Pearlmutter).
* ``hvp(..., method="fd")``: central finite difference of gradients, for
  models whose operations have no second derivative; ``params`` are perturbed
  in place and restored bit-exactly.
* ``gnvp``: the Gauss-Newton product ``J^T H_out J v`` where ``J`` is the
  Jacobian of the model output and ``H_out`` the Hessian of the loss with
  respect to the output (positive semi-definite for convex losses).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["gnvp", "hvp"]


def _check(
    params: Sequence[Tensor], vectors: Sequence[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    params, vectors = list(params), list(vectors)
    if not params:
        raise ValueError("params is empty")
    if len(params) != len(vectors):
        raise ValueError(f"got {len(params)} params but {len(vectors)} vectors")
    for i, (p, v) in enumerate(zip(params, vectors)):
        if p.shape != v.shape:
            raise ValueError(
                f"vectors[{i}] has shape {tuple(v.shape)} but params[{i}] has {tuple(p.shape)}"
            )
    return params, vectors


def _loss(fn: Callable[[], Tensor]) -> Tensor:
    loss = fn()
    if not isinstance(loss, Tensor):
        raise TypeError(f"fn must return a scalar Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"fn must return a scalar loss, got shape {tuple(loss.shape)}")
    return loss.reshape(())


def _grads(loss: Tensor, params: list[Tensor], create_graph: bool) -> list[Tensor]:
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _sum_sq(t: Tensor) -> float:
    """Sum of squares of ``t`` as a float; for a DTensor over all of its shards (the same
    on every rank), not only the local piece."""
    s = t.detach().double().square().sum()
    full = getattr(s, "full_tensor", None)  # DTensor: the partial sums reduced over ranks
    return float(full() if full is not None else s)


def hvp(
    fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    vectors: Sequence[Tensor],
    *,
    method: str = "autograd",
    eps: float | None = None,
) -> list[Tensor]:
    """Hessian of ``fn()`` with respect to ``params`` times ``vectors``.

    Args:
        fn: closure recomputing the scalar loss from ``params``.
        params: tensors requiring grad.
        vectors: same shapes as ``params``.
        method: ``"autograd"`` (exact double backward) or ``"fd"`` (central
            finite difference of gradients).
        eps: finite-difference step (default: ``sqrt(machine eps)`` scaled by
            the sizes of ``params`` and ``vectors``).

    Returns:
        ``H v`` as a list shaped like ``params``.
    """
    params, vectors = _check(params, vectors)
    if method == "autograd":
        with torch.enable_grad():
            grads = _grads(_loss(fn), params, create_graph=True)
            dots = [g for g in grads if g.requires_grad]
            if not dots:  # the loss is linear in params: the Hessian is zero
                return [torch.zeros_like(p) for p in params]
            hv = torch.autograd.grad(
                grads, params, grad_outputs=vectors, allow_unused=True, materialize_grads=True
            )
        return [h.detach() for h in hv]
    if method != "fd":
        raise ValueError(f"method must be 'autograd' or 'fd', got {method!r}")
    if eps is None:
        pnorm = math.sqrt(sum(_sum_sq(p) for p in params))
        vnorm = math.sqrt(sum(_sum_sq(v) for v in vectors))
        if vnorm == 0.0:
            return [torch.zeros_like(p) for p in params]
        eps = math.sqrt(torch.finfo(params[0].dtype).eps) * (1.0 + pnorm) / vnorm
    elif not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be positive and finite, got {eps}")
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, v in zip(params, vectors):
                p.add_(v, alpha=eps)
        with torch.enable_grad():
            plus = _grads(_loss(fn), params, create_graph=False)
        with torch.no_grad():
            for p, s, v in zip(params, saved, vectors):
                p.copy_(s).sub_(v, alpha=eps)
        with torch.enable_grad():
            minus = _grads(_loss(fn), params, create_graph=False)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return [(a - b) / (2 * eps) for a, b in zip(plus, minus)]


def gnvp(
    output_fn: Callable[[], Tensor],
    loss_of_output: Callable[[Tensor], Tensor],
    params: Sequence[Tensor],
    vectors: Sequence[Tensor],
) -> list[Tensor]:
    """Gauss-Newton matrix times ``vectors``: ``J^T H_out J v``.

    Args:
        output_fn: closure computing the model output from ``params``.
        loss_of_output: maps that output to the scalar loss.
        params: tensors requiring grad.
        vectors: same shapes as ``params``.

    Returns:
        ``G v`` as a list shaped like ``params``.
    """
    params, vectors = _check(params, vectors)
    with torch.enable_grad():
        out = output_fn()
        if not isinstance(out, Tensor):
            raise TypeError(f"output_fn must return a Tensor, got {type(out).__name__}")
        # J v by the double-vjp trick: d/du <J^T u, v> = J v.
        u = torch.zeros_like(out, requires_grad=True)
        jtu = torch.autograd.grad(
            out,
            params,
            grad_outputs=u,
            create_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        (jv,) = torch.autograd.grad(
            jtu, u, grad_outputs=vectors, allow_unused=True, materialize_grads=True
        )
        loss = loss_of_output(out)
        if loss.numel() != 1:
            raise ValueError(f"loss_of_output must return a scalar, got shape {tuple(loss.shape)}")
        (g_out,) = torch.autograd.grad(loss.reshape(()), out, create_graph=True)
        if g_out.requires_grad:
            (hjv,) = torch.autograd.grad(
                g_out,
                out,
                grad_outputs=jv,
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
        else:  # loss linear in the output
            hjv = torch.zeros_like(out)
        gv = torch.autograd.grad(
            out, params, grad_outputs=hjv.detach(), allow_unused=True, materialize_grads=True
        )
    return [g.detach() for g in gv]
