"""Batches of per-example gradient rows, seen only through inner products.

Every balancer in this package needs three things from a batch of ``B``
per-example gradients ``x_1..x_B`` of one parameter tensor (``numel`` entries
each):

* ``gram()``: the ``(B, B)`` matrix of inner products ``<x_i, x_j>``;
* ``cross(A)``: the ``(B, k)`` inner products with ``k`` stored vectors;
* ``combine(W)``: the ``(k, numel)`` linear combinations ``W @ X``.

:class:`DenseRows` serves them from a materialised ``(B, numel)`` view (the
per-sample-gradient route); :mod:`grabsampler.hooks` serves them from layer
activations and output gradients without ever forming ``x_i``. Nothing here
concatenates parameters into one ``(B, d)`` matrix: each parameter tensor is
handled on its own and the results (``B x B`` numbers) are summed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["CHUNK", "DenseRows", "Rows", "rows_from_grads"]

#: column chunk of the batched update of wide rows
CHUNK = 16384


class Rows(Protocol):
    """Protocol for one parameter tensor's batch of per-example gradients."""

    batch_size: int
    numel: int

    def gram(self) -> Tensor:
        """``(B, B)`` inner products between the rows."""
        ...

    def cross(self, aux: Tensor) -> Tensor:
        """``(B, k)`` inner products of the rows with ``aux`` of shape ``(k, numel)``."""
        ...

    def combine(self, weights: Tensor) -> Tensor:
        """``(k, numel)`` combinations ``weights @ rows`` for ``weights`` of shape ``(k, B)``."""
        ...


class DenseRows:
    """Rows held as a ``(B, numel)`` tensor (usually a view of a per-sample gradient)."""

    def __init__(self, x: Tensor) -> None:
        self.x = x
        self.batch_size = int(x.shape[0])
        self.numel = int(x.shape[1])

    def gram(self) -> Tensor:
        return self.x @ self.x.T

    def cross(self, aux: Tensor) -> Tensor:
        return self.x @ aux.to(self.x.dtype).T

    def combine(self, weights: Tensor) -> Tensor:
        return weights.to(self.x.dtype) @ self.x

    def combine_into(self, out: Tensor, weights: Tensor) -> None:
        """``out += combine(weights)`` in place (``out`` is ``(k, numel)``).

        Wide rows are updated in column chunks by one batched product: a
        ``(k, B) @ (B, n)`` product with tiny ``k`` and ``B`` runs far below memory
        speed in BLAS, chunks of :data:`CHUNK` columns run faster.
        """
        w = weights.to(out.dtype)
        x = self.x.to(out.dtype)
        n = self.numel
        if n < 16 * CHUNK or x.stride(1) != 1 or out.stride(1) != 1:
            out.addmm_(w, x)
            return
        c = n // CHUNK
        main = c * CHUNK
        xv = x[:, :main].unflatten(1, (c, CHUNK)).transpose(0, 1)  # (C, B, CHUNK)
        ov = out[:, :main].unflatten(1, (c, CHUNK)).transpose(0, 1)  # (C, k, CHUNK)
        ov.baddbmm_(w.expand(c, -1, -1), xv)
        if main < n:
            out[:, main:].addmm_(w, x[:, main:])


def rows_from_grads(
    per_sample_grads: Mapping[str, Tensor] | Sequence[Tensor] | Tensor,
    names: Sequence[str],
    sizes: Sequence[int],
) -> list[Rows]:
    """Turns per-sample gradients into one :class:`DenseRows` per parameter tensor.

    Args:
        per_sample_grads: a dict ``name -> (B, *shape)`` (as from
            ``torch.func.vmap(grad(...))``), a list of ``(B, *shape)`` tensors, or a
            single ``(B, d)`` tensor.
        names: names of the trainable parameters, in order.
        sizes: number of entries of each trainable parameter, in order.

    Returns:
        A list of rows, one per given tensor (a ``(B, d)`` tensor is split into
        ``len(sizes)`` views without copying).

    Raises:
        TypeError: ``per_sample_grads`` is not a tensor, mapping or sequence of tensors.
        ValueError: batch dimensions disagree or the total size differs from ``sum(sizes)``.
    """
    d = int(sum(sizes))
    if isinstance(per_sample_grads, Tensor):
        if per_sample_grads.dim() < 1:
            raise ValueError("per_sample_grads: a tensor needs a batch dimension")
        flat = per_sample_grads.reshape(per_sample_grads.shape[0], -1)
        if flat.shape[1] != d:
            raise ValueError(
                f"per_sample_grads: {flat.shape[1]} entries per example, but trainable_params "
                f"has d = {d}"
            )
        return [DenseRows(v) for v in torch.split(flat, list(sizes), dim=1)]
    if isinstance(per_sample_grads, Mapping):
        if set(per_sample_grads.keys()) == set(names):
            tensors = [per_sample_grads[k] for k in names]
        else:
            tensors = list(per_sample_grads.values())
    elif isinstance(per_sample_grads, Sequence) and not isinstance(per_sample_grads, str):
        tensors = list(per_sample_grads)
    else:
        raise TypeError(
            "per_sample_grads must be a dict of tensors, a list of tensors or a (B, d) tensor, "
            f"got {type(per_sample_grads).__name__}"
        )
    if not tensors:
        raise ValueError("per_sample_grads is empty")
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"per_sample_grads: expected tensors, got {type(t).__name__}")
        if t.dim() < 1:
            raise ValueError("per_sample_grads: every tensor needs a leading batch dimension")
    b = int(tensors[0].shape[0])
    views: list[Tensor] = []
    total = 0
    for t in tensors:
        if int(t.shape[0]) != b:
            raise ValueError(
                "per_sample_grads: tensors disagree on the batch size: "
                f"{[int(t.shape[0]) for t in tensors]}"
            )
        v = t.flatten(1) if t.dim() > 1 else t[:, None]
        total += int(v.shape[1])
        views.append(v)
    if b > 0 and total != d:
        raise ValueError(
            f"per_sample_grads: {total} entries per example, but trainable_params has d = {d}"
        )
    return [DenseRows(v) for v in views]
