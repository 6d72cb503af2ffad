"""Who fits which preconditioner under ``torch.distributed``.

Every rank sees the same (all-reduced) gradients, so the preconditioners would
be identical if every rank fitted all of them. Instead each parameter's factors
are owned by one rank (assigned by cost with :func:`optcore.distributed.assign_by_cost`),
fitted there, and broadcast to the others; all ranks then apply the same cached
preconditioner locally.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from optcore import distributed as odist

from .factors import factor_cost

__all__ = ["Ownership"]


class Ownership:
    """Parameter-to-rank assignment, computed once per parameter layout.

    Args:
        enabled: True/False, or None for "when a process group of more than one
            rank is initialised".
    """

    def __init__(self, enabled: bool | None) -> None:
        self.enabled = enabled
        self._key: tuple[Any, ...] | None = None
        self._owners: list[int] | None = None
        self._checked: set[Any] = set()

    def active(self) -> bool:
        on = odist.is_distributed() and odist.get_world_size() > 1
        return on if self.enabled is None else (bool(self.enabled) and on)

    def check(self, key: Any) -> None:
        """Raise a clear error, on every rank, when the ranks' parameters differ.

        ``key`` describes this rank's parameter layout (hashable; compared once per
        layout with one small collective, before anything is split, reduced or
        broadcast, which would otherwise hang or mix up different tensors).
        """
        if key in self._checked:
            return
        if not odist.same_on_all_ranks(key):
            raise ValueError(
                "psgd under torch.distributed: the ranks' parameters differ in number or "
                "shape; the optimizer assumes data parallelism (every rank holds the same "
                "parameters and sees the same averaged gradients). Pass distributed=False "
                "for model- or pipeline-parallel runs."
            )
        self._checked.add(key)

    def owners(self, groups: list[dict[str, Any]], layout: Callable[..., Any]) -> list[int] | None:
        """``owner[i]`` for the flat parameter index ``i`` (None when not distributed)."""
        if not self.active():
            return None
        layouts = [layout(g, p) for g in groups for p in g["params"]]
        key = (odist.get_world_size(), tuple(layouts))
        if key != self._key:
            self.check(key)
            costs = [factor_cost(shape, dense) for shape, dense in layouts]
            self._owners = odist.assign_by_cost(costs, odist.get_world_size())
            self._key = key
        return self._owners

    def owners_by_cost(self, key: Any, costs: list[float]) -> list[int] | None:
        """``owner[j]`` for item ``j`` of ``costs`` (None when not distributed); ``key``
        identifies the item list, the assignment is recomputed when it changes."""
        if not self.active():
            return None
        key = (odist.get_world_size(), key)
        if key != self._key:
            self.check(key)
            self._owners = odist.assign_by_cost(costs, odist.get_world_size())
            self._key = key
        return self._owners

    @staticmethod
    def mine(owner: int) -> bool:
        return owner == odist.get_rank()

    @staticmethod
    def broadcast(
        owners: list[int],
        groups: list[dict[str, Any]],
        state: dict[Tensor, dict[str, Any]],
        factors: Callable[..., Any],
        layout: Callable[..., Any],
        select: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        """Broadcast each parameter's factors, caches and bounds from its owner."""
        index = -1
        for group in groups:
            for p in group["params"]:
                index += 1
                st = state.get(p)
                if not st or (select is not None and not select(group)):
                    continue
                shape, _ = layout(group, p)
                qs, ps, ls = factors(st, len(shape))
                tensors = [t for t in (*qs, *ps, *ls) if t is not None]
                odist.broadcast_tensors(tensors, src=owners[index])
