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
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = [
    "CHUNK",
    "ONEDNN_COLS",
    "SPLIT_COLS",
    "DenseRows",
    "Rows",
    "onednn_mm",
    "rows_from_grads",
    "split_mm",
    "stored_cross",
]

#: column chunk of the batched update of wide rows
CHUNK = 16384
#: rows at least this wide per intra-op thread have their products split by columns
SPLIT_COLS = 1 << 17
#: float32 CPU rows at least this wide take oneDNN for their products with stored vectors
ONEDNN_COLS = 1 << 18


def _split_parts(n: int) -> int:
    """Into how many column parts a product over ``n`` columns is split (1: not split)."""
    p = torch.get_num_threads()
    return p if p > 1 and n >= SPLIT_COLS * p else 1


def split_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` for wide ``(m, n)`` and ``(k, n)``, the reduction split over threads.

    BLAS runs the ``(m, k)`` product of thin, very wide matrices on one thread
    (it parallelises over the output, which has only ``m k`` entries). Here the
    ``n`` columns are cut into one part per intra-op thread
    (``torch.get_num_threads()``) and the parts go through one batched product,
    whose batch is spread over the threads; the partial products are summed.
    With one thread, or narrow rows, it is ``torch.mm``.
    """
    n = int(a.shape[1])
    p = _split_parts(n)
    if p == 1 or a.stride(1) != 1 or b.stride(1) != 1:
        return torch.mm(a, b.T)
    q = n // p
    main = p * q
    av = a[:, :main].unflatten(1, (p, q)).transpose(0, 1)  # (p, m, q), no copy
    bv = b[:, :main].unflatten(1, (p, q)).transpose(0, 1)
    out = torch.bmm(av, bv.transpose(1, 2)).sum(0)
    if main < n:
        out.addmm_(a[:, main:], b[:, main:].T)
    return out


def _onednn_linear() -> Any:
    """torch's oneDNN linear operator (``input @ weight.T``), or None where it is missing."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


#: oneDNN's linear operator while it is usable (set to None after a failure)
_ONEDNN: list[Any] = [_onednn_linear()]


def onednn_mm(inp: Tensor, weight: Tensor) -> Tensor | None:
    """``inp @ weight.T`` through torch's oneDNN linear operator, or None where not taken.

    Taken for contiguous float32 CPU tensors while the operator works; a
    failure disables it for good (the caller then takes a plain product).
    """
    op = _ONEDNN[0]
    if (
        op is None
        or inp.dtype != torch.float32
        or weight.dtype != torch.float32
        or inp.device.type != "cpu"
        or weight.device.type != "cpu"
        or not inp.is_contiguous()
        or not weight.is_contiguous()
    ):
        return None
    try:
        out = op(inp, weight, None, "none", [], "")
    except (RuntimeError, NotImplementedError, TypeError):
        _ONEDNN[0] = None
        return None
    if isinstance(out, Tensor) and out.shape == (inp.shape[0], weight.shape[0]):
        return out
    _ONEDNN[0] = None
    return None


def stored_cross(act: Tensor, x: Tensor) -> Tensor:
    """``act @ x.T``: the ``(k, B)`` inner products of ``k`` stored vectors with ``B`` rows.

    For a thin ``(k, n)`` times ``(n, B)`` product (``k`` = 2 or 3) MKL's kernel
    runs at about half the memory speed on wide float32 rows; torch's oneDNN
    linear operator streams the rows at memory speed (measured: 3.0 ms against
    6 ms at ``n`` = 1M, ``B`` = 16, one thread). It is used for contiguous
    float32 CPU rows of at least :data:`ONEDNN_COLS` columns where torch
    provides it (:func:`onednn_mm`); any failure falls back to :func:`split_mm`
    for good.
    """
    if int(x.shape[1]) >= ONEDNN_COLS:
        out = onednn_mm(act, x)
        if out is not None:
            return out
    return split_mm(act, x)


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
        return split_mm(self.x, self.x)

    def cross(self, aux: Tensor) -> Tensor:
        return split_mm(self.x, aux.to(self.x.dtype))

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
