"""``torch.distributed`` helpers that also work without a process group.

Without an initialised process group every helper behaves as a world of one:
rank 0, world size 1, reductions are no-ops. Work is assigned to ranks
deterministically (same input, same assignment on every rank), so no
coordination is needed to agree on who computes what.
"""

from __future__ import annotations

import hashlib
import heapq
import secrets
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_reduce_mean",
    "assign_by_cost",
    "broadcast_seed",
    "broadcast_tensors",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "same_on_all_ranks",
]


def is_distributed() -> bool:
    """True when a process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of processes, 1 without a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean(tensors: Sequence[Tensor]) -> None:
    """Average each tensor over all processes, in place.

    Tensors of one dtype and device are packed into one buffer so that each
    group costs a single collective.
    """
    tensors = list(tensors)
    if not is_distributed() or not tensors:
        return
    world = dist.get_world_size()
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"all_reduce_mean takes tensors, got {type(t).__name__}")
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_tensors(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Broadcast each tensor from rank ``src`` to all ranks, in place."""
    if not is_distributed():
        return
    for t in tensors:
        dist.broadcast(t, src=src)


def _backend_device() -> torch.device:
    backend = dist.get_backend()
    return (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )


def same_on_all_ranks(value: object) -> bool:
    """Whether every rank passed an equal ``value`` (compared by a digest of its ``repr``).

    One collective of two integers; True without a process group. Every rank must
    call it (it is a collective), and every rank gets the same answer.
    """
    if not is_distributed():
        return True
    digest = hashlib.sha256(repr(value).encode()).digest()
    h = int.from_bytes(digest[:8], "little") >> 2  # 62 bits: -h fits in an int64
    t = torch.tensor([h, -h], dtype=torch.int64, device=_backend_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # [max h, -min h]
    return int(t[0]) == -int(t[1])


def broadcast_seed(seed: int | None = None, src: int = 0) -> int:
    """Return one seed agreed by all ranks: rank ``src``'s ``seed`` (random when None)."""
    if seed is None:
        seed = secrets.randbits(62)
    if not is_distributed():
        return int(seed)
    buf = torch.tensor([int(seed)], dtype=torch.int64, device=_backend_device())
    dist.broadcast(buf, src=src)
    return int(buf.item())


def assign_by_cost(costs: Sequence[float], world_size: int | None = None) -> list[int]:
    """Assign work items to ranks, balancing the total cost (greedy, largest first).

    Deterministic: ties go to the lower item index and the lower rank, so every
    rank computes the same assignment locally.

    Args:
        costs: non-negative cost of each item (e.g. ``n**3`` for an n x n inverse).
        world_size: number of ranks (default: the current world size).

    Returns:
        ``owner[i]``: the rank that handles item ``i``.
    """
    if world_size is None:
        world_size = get_world_size()
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    for i, c in enumerate(costs):
        if not c >= 0:
            raise ValueError(f"costs[{i}] must be non-negative, got {c}")
    owner = [0] * len(costs)
    loads = [(0.0, r) for r in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda j: (-float(costs[j]), j)):
        load, rank = heapq.heappop(loads)
        owner[i] = rank
        heapq.heappush(loads, (load + float(costs[i]), rank))
    return owner
