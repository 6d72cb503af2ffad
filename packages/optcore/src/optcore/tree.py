"""Parameter trees: named parameters as ordered dicts, flattening, grouping.

A *tree* here is either a mapping ``name -> Tensor`` (ordered, as returned by
:func:`named_parameters`) or a sequence of tensors. The helpers keep the order
of the input, so ``unflatten(flatten(t), t)`` reproduces ``t`` exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar, overload

import torch
from torch import Tensor, nn

__all__ = ["flatten", "group_by_dtype_device", "named_parameters", "numel", "unflatten"]

Tree = Mapping[str, Tensor] | Sequence[Tensor]
T = TypeVar("T", bound=Tensor)


def named_parameters(module: nn.Module, *, trainable_only: bool = True) -> dict[str, nn.Parameter]:
    """Return the module's parameters as an ordered ``name -> Parameter`` dict.

    Shared (tied) parameters appear once, under the first name PyTorch gives them.

    Args:
        module: the model.
        trainable_only: drop parameters with ``requires_grad=False``.

    Raises:
        TypeError: if ``module`` is not an ``nn.Module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    return {
        name: p for name, p in module.named_parameters() if p.requires_grad or not trainable_only
    }


def _values(tree: Tree, arg: str) -> list[Tensor]:
    if isinstance(tree, Mapping):
        values = list(tree.values())
    elif isinstance(tree, Sequence) and not isinstance(tree, (str, bytes)):
        values = list(tree)
    else:
        raise TypeError(
            f"{arg} must be a mapping or a sequence of tensors, got {type(tree).__name__}"
        )
    for i, v in enumerate(values):
        if not isinstance(v, Tensor):
            raise TypeError(f"{arg}[{i}] is a {type(v).__name__}, not a Tensor")
    return values


def numel(tree: Tree) -> int:
    """Total number of elements in the tree."""
    return sum(v.numel() for v in _values(tree, "tree"))


def flatten(tree: Tree) -> Tensor:
    """Concatenate every tensor of ``tree`` (in order) into one 1-D tensor.

    Raises:
        ValueError: if the tree is empty or mixes dtypes/devices.
    """
    values = _values(tree, "tree")
    if not values:
        raise ValueError("tree is empty: nothing to flatten")
    first = values[0]
    for v in values[1:]:
        if v.dtype != first.dtype or v.device != first.device:
            raise ValueError(
                "tree mixes dtypes/devices "
                f"({first.dtype}@{first.device} vs {v.dtype}@{v.device}); "
                "group it with group_by_dtype_device first"
            )
    return torch.cat([v.reshape(-1) for v in values])


@overload
def unflatten(vector: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]: ...
@overload
def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]: ...
def unflatten(vector: Tensor, like: Tree) -> dict[str, Tensor] | list[Tensor]:
    """Split a 1-D ``vector`` into tensors shaped like ``like`` (views of ``vector``).

    Raises:
        ValueError: if ``vector`` is not 1-D or its length differs from the tree's size.
    """
    values = _values(like, "like")
    if vector.dim() != 1:
        raise ValueError(f"vector must be 1-D, got shape {tuple(vector.shape)}")
    total = sum(v.numel() for v in values)
    if vector.numel() != total:
        raise ValueError(f"vector has {vector.numel()} elements but like holds {total}")
    pieces = torch.split(vector, [v.numel() for v in values])
    shaped = [p.view(v.shape) for p, v in zip(pieces, values)]
    if isinstance(like, Mapping):
        return dict(zip(like.keys(), shaped))
    return shaped


def group_by_dtype_device(
    tensors: Sequence[Tensor],
) -> dict[tuple[torch.dtype, torch.device], list[int]]:
    """Indices of ``tensors`` grouped by ``(dtype, device)``, in first-seen order.

    Each group can be handed to ``torch._foreach_*`` kernels, which need one
    dtype and device per call.
    """
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(_values(tensors, "tensors")):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return groups
