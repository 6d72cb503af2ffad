"""DTensor (FSDP2-style) parameters: gather a gradient whole, give an update back its layout.

The optimizers fit and apply their preconditioners on whole tensors. For a DTensor
parameter (sharded or replicated) the gradient is gathered to the full tensor
(every rank gets the same), the preconditioner state is full-size on every rank,
and each rank adds its own piece of the identical full update, so the parameter
keeps its placement.
"""

from __future__ import annotations

from torch import Tensor

try:  # absent on builds without torch.distributed
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]

__all__ = ["full", "is_dtensor", "like"]


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (False on builds without DTensor)."""
    return DTensor is not None and isinstance(t, DTensor)


def full(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor (gathered; every rank gets the same), else ``t``."""
    if DTensor is not None and isinstance(t, DTensor):
        return t.full_tensor()
    return t


def like(p: Tensor, update: Tensor) -> Tensor:
    """``update`` (a full tensor, identical on every rank) laid out like the parameter ``p``."""
    if DTensor is not None and isinstance(p, DTensor):
        # every rank holds the same full update: take the local piece, no communication
        return distribute_tensor(update, p.device_mesh, p.placements, src_data_rank=None)
    return update
