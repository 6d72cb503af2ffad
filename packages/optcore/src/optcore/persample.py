"""Per-sample gradients with ``torch.func`` (``functional_call`` + ``vmap`` + ``grad``).

Both entry points return ``name -> Tensor`` of shape ``(batch, *param.shape)``
and evaluate the batch in chunks of ``chunk_size`` examples to bound memory.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from optcore.tree import named_parameters

__all__ = ["functional_per_sample_grads", "per_sample_grads"]


def _batch_size(args: tuple[Any, ...]) -> int:
    sizes = {a.shape[0] for a in args if isinstance(a, Tensor)}
    if not sizes:
        raise ValueError("at least one batched tensor argument is required")
    if len(sizes) != 1:
        raise ValueError(f"batched arguments disagree on the batch size: {sorted(sizes)}")
    (size,) = sizes
    if size == 0:
        raise ValueError("the batch is empty")
    return size


def functional_per_sample_grads(
    fn: Callable[..., Tensor],
    params: Mapping[str, Tensor],
    *batched_args: Any,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Per-example gradients of ``fn(params, *example_args)`` with respect to ``params``.

    Args:
        fn: ``fn(params, *args)`` returning a scalar loss for ONE example
            (each tensor in ``args`` without its batch dimension).
        params: ``name -> Tensor`` to differentiate with respect to (not modified).
        *batched_args: tensors with a leading batch dimension (non-tensors are
            passed unchanged to every example).
        chunk_size: examples per vectorised call (``None``: the whole batch).

    Returns:
        ``name -> Tensor`` of shape ``(batch, *params[name].shape)``.
    """
    if not isinstance(params, Mapping) or not params:
        raise TypeError("params must be a non-empty mapping name -> Tensor")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
    n = _batch_size(batched_args)
    detached = {k: v.detach() for k, v in params.items()}
    in_dims = (None, *(0 if isinstance(a, Tensor) else None for a in batched_args))
    per_example = vmap(grad(fn), in_dims=in_dims)
    step = n if chunk_size is None else chunk_size
    chunks: list[dict[str, Tensor]] = []
    for start in range(0, n, step):
        args = tuple(a[start : start + step] if isinstance(a, Tensor) else a for a in batched_args)
        try:
            chunks.append(per_example(detached, *args))
        except RuntimeError as exc:
            # Some fused kernels (nn.RNN/LSTM/GRU among them) have no batching
            # rule; fall back to one grad call per example, same result.
            _warn_fallback(exc)
            chunks.append(_loop(fn, detached, args))
    if len(chunks) == 1:
        return chunks[0]
    return {k: torch.cat([c[k] for c in chunks]) for k in detached}


_WARNED: set[str] = set()


def _warn_fallback(exc: Exception) -> None:
    key = str(exc).splitlines()[0][:200]
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            "torch.func.vmap could not batch this model "
            f"({key}); computing per-sample gradients one example at a time",
            RuntimeWarning,
            stacklevel=3,
        )


def _loop(
    fn: Callable[..., Tensor], params: dict[str, Tensor], args: tuple[Any, ...]
) -> dict[str, Tensor]:
    n = _batch_size(args)
    g = grad(fn)
    rows = [g(params, *(a[i] if isinstance(a, Tensor) else a for a in args)) for i in range(n)]
    return {k: torch.stack([r[k] for r in rows]) for k in params}


def per_sample_grads(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Mapping[str, Tensor] | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Per-example gradients of ``loss_fn(model(x_i), y_i)`` for every trainable parameter.

    ``loss_fn`` is the ordinary batched loss (e.g. ``F.cross_entropy``); inside
    ``vmap`` it sees one example with a batch dimension of 1. Buffers (e.g.
    BatchNorm running statistics) are read, not updated; use ``model.eval()``
    for models whose training-mode forward couples the examples of a batch.

    Args:
        model: any ``nn.Module`` whose forward takes a batch of inputs.
        loss_fn: ``loss_fn(output, target) -> scalar``.
        inputs: ``(batch, ...)`` inputs.
        targets: ``(batch, ...)`` targets.
        params: parameters to differentiate (default: the model's trainable ones).
        chunk_size: examples per vectorised call, to bound memory.

    Returns:
        ``name -> Tensor`` of shape ``(batch, *param.shape)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError("inputs and targets must be tensors")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs and targets disagree on the batch size: {inputs.shape[0]} vs {targets.shape[0]}"
        )
    if params is None:
        params = named_parameters(model)
        if not params:
            raise ValueError("model has no trainable parameters")
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def one_example(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    return functional_per_sample_grads(one_example, params, inputs, targets, chunk_size=chunk_size)
