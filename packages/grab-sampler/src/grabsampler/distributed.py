"""``DistributedGraBSampler``: CD-GraB, coordinated pair balance across ranks.

Every rank keeps its own shard of the data for the whole run (the first
epoch's shards are cut like ``DistributedSampler``'s: a seeded permutation,
padded or truncated to a multiple of ``num_replicas``, rank ``r`` taking
positions ``r, r + W, ...``). At each step every rank pairs consecutive
examples of its own stream and forms their gradient differences. The
differences of all ranks are gathered (``all_gather``) and balanced in one
shared sequence -- pair ``k`` of rank 0, of rank 1, ..., then pair ``k + 1``
-- against one running sum that every rank holds identically; rank 0's signs
are broadcast so the decisions are the same everywhere. A ``+1`` puts the
first of the pair at the front of its rank's next order and the second at the
back; ``-1`` the reverse.

Reference:
    A. F. Cooper, W. Guo, K. Pham, T. Yuan, C. Ruan, Y. Lu, C. De Sa.
    Coordinating Distributed Example Orders for Provably Accelerated Training.
    NeurIPS 2023.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler

from grabsampler._bank import AuxBank
from grabsampler._rows import DenseRows, rows_from_grads
from grabsampler.balance.base import Decider, TwoEnded
from grabsampler.balance.pair import pair_up

__all__ = ["DistributedGraBSampler"]


class DistributedGraBSampler(Sampler[int]):
    """CD-GraB sampler with ``DistributedSampler``'s signature.

    Args:
        dataset: the data set (only ``len`` is used).
        num_replicas: number of ranks (default: the process group's world size).
        rank: this rank (default: the process group's rank).
        seed: seed of the first epoch's permutation and of probabilistic signs.
        shuffle: shuffle the first epoch (else ``0..n-1``).
        drop_last: drop the tail instead of padding to equal shards.
        trainable_params: optional parameters; fixes the split of a ``(B, d)`` input
            (otherwise taken from the first ``step``).
        probabilistic: self-balancing walk signs (see :class:`~grabsampler.GraBSampler`).
        prob_c: the walk's constant.
        normalize: unit-norm pair differences (default: ``probabilistic``).

    Raises:
        ValueError: bad ``num_replicas`` / ``rank`` or empty data.
        RuntimeError: ``num_replicas``/``rank`` omitted without a process group.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        trainable_params: Mapping[str, Tensor] | Sequence[Tensor] | None = None,
        probabilistic: bool = False,
        prob_c: float = 30.0,
        normalize: bool | None = None,
    ) -> None:
        if num_replicas is None or rank is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    "num_replicas and rank are required without an initialized process group"
                )
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas - 1}], got {rank}")
        self.n = len(dataset)
        if self.n <= 0:
            raise ValueError("dataset is empty")
        self.num_replicas, self.rank, self.seed = int(num_replicas), int(rank), int(seed)
        self.shuffle, self.drop_last = shuffle, drop_last
        if drop_last and self.n % self.num_replicas:
            self.num_samples = self.n // self.num_replicas
        else:
            self.num_samples = math.ceil(self.n / self.num_replicas)
        if self.num_samples == 0:
            raise ValueError("fewer examples than replicas with drop_last=True")
        self.total_size = self.num_samples * self.num_replicas
        self.generator = torch.Generator().manual_seed(self.seed)
        self.decider = Decider(
            probabilistic, prob_c, probabilistic if normalize is None else normalize, self.generator
        )
        self._sizes: list[int] | None = None
        self._names: list[str] = []
        if trainable_params is not None:
            tensors = (
                list(trainable_params.values())
                if isinstance(trainable_params, Mapping)
                else list(trainable_params)
            )
            self._names = (
                [str(k) for k in trainable_params] if isinstance(trainable_params, Mapping) else []
            )
            self._sizes = [int(t.numel()) for t in tensors]
        self.bank: AuxBank | None = None
        self.epoch = 0
        self.rounds = -1
        self.in_epoch = False
        self.position = 0
        self.order: list[int] = []
        self.place = TwoEnded(self.num_samples)
        self.cache = -1  # position in this rank's epoch stream of the unpaired example
        self._cache_rows: list[Tensor] | None = None
        self._resume = False

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Records the epoch number (the order itself evolves by balancing)."""
        self.epoch = int(epoch)

    def _first_shard(self) -> list[int]:
        if self.shuffle:
            perm = torch.randperm(self.n, generator=self.generator).tolist()
        else:
            perm = list(range(self.n))
        if self.total_size > self.n:
            pad = self.total_size - self.n
            perm = perm + (perm * math.ceil(pad / self.n))[:pad]
        perm = perm[: self.total_size]
        return perm[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        if self._resume:
            self._resume = False
            return iter(self.order[self.position :])
        if self.rounds < 0:
            order = self._first_shard()
        else:
            middle = ([self.order[self.cache]] if self.cache >= 0 else []) + self.order[
                self.position :
            ]
            order = self.place.finish(middle)
        self.order = order
        self.rounds += 1
        self.position = 0
        self.cache = -1
        self._cache_rows = None
        self.place = TwoEnded(len(order))
        self.in_epoch = True
        if self.bank is not None:
            self.bank.transform(torch.zeros(1, 1, dtype=torch.float64))
        return iter(list(order))

    def _gather(self, local: list[Tensor]) -> list[Tensor]:
        """All ranks' ``(P, numel)`` rows, interleaved pair-major: ``(P * W, numel)``."""
        if self.num_replicas == 1:
            return local
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("step() needs an initialized process group for num_replicas > 1")
        out = []
        for t in local:
            parts = [torch.empty_like(t) for _ in range(self.num_replicas)]
            dist.all_gather(parts, t.contiguous())
            out.append(torch.stack(parts, dim=1).reshape(-1, t.shape[1]))
        return out

    @torch.no_grad()
    def step(self, per_sample_grads: Mapping[str, Tensor] | Sequence[Tensor] | Tensor) -> None:
        """Balances this rank's batch together with the other ranks' (collective call).

        All ranks must call ``step`` with the same batch size. Same errors as
        :meth:`GraBSampler.step`; the state is unchanged when one is raised.
        """
        if not self.in_epoch:
            raise RuntimeError("step() called before an epoch started: iterate the sampler first")
        if self._sizes is None:
            if isinstance(per_sample_grads, Tensor):
                self._sizes = [int(per_sample_grads[0].numel())]
            else:
                vals = (
                    list(per_sample_grads.values())
                    if isinstance(per_sample_grads, Mapping)
                    else list(per_sample_grads)
                )
                self._sizes = [int(v[0].numel()) for v in vals]
        rows = rows_from_grads(per_sample_grads, self._names, self._sizes)
        xs = [r.x for r in rows if isinstance(r, DenseRows)]
        b = int(xs[0].shape[0])
        if b > self.num_samples:
            raise ValueError(f"batch of {b} examples is larger than this rank's shard")
        if self.position + b > self.num_samples:
            raise ValueError(
                f"step() got {b} examples but only {self.num_samples - self.position} of this "
                "epoch are left: step() was called more times than the epoch has examples"
            )
        if any(int(x.shape[1]) != s for x, s in zip(xs, self._sizes)):
            raise ValueError("per_sample_grads do not match the parameter sizes seen before")
        if self.bank is None:
            self.bank = AuxBank(self._sizes, 1, xs[0].dtype, xs[0].device)
        seq = ([-1] if self.cache >= 0 else []) + list(range(b))
        pairs, left = pair_up(seq)
        diffs = []
        for p, x in enumerate(xs):
            src = torch.cat([self._cache_rows[p], x]) if self._cache_rows is not None else x
            off = 1 if self._cache_rows is not None else 0
            ia = torch.tensor([u + off for u, _ in pairs], dtype=torch.long, device=x.device)
            ib = torch.tensor([v + off for _, v in pairs], dtype=torch.long, device=x.device)
            diffs.append(src[ia] - src[ib])
        gathered = self._gather(diffs)
        grows = [DenseRows(g) for g in gathered]
        gram, brows = self.bank.batch_gram(grows)
        kk = gram.shape[0] - 1
        if not bool(torch.isfinite(gram).all()):
            raise ValueError(
                "per_sample_grads contain non-finite values (inf or nan, or too large to square)"
            )
        coef = torch.zeros(kk, kk + 1, dtype=torch.float64)
        coef[:, :kk] = torch.eye(kk, dtype=torch.float64)
        s = torch.zeros(kk + 1, dtype=torch.float64)
        s[kk] = 1.0
        eps, coef = self.decider.walk(coef, gram, s)
        eps_t = torch.tensor(eps, dtype=torch.float64)
        if self.num_replicas > 1:
            dist.broadcast(eps_t, src=0)
            eps = [int(e) for e in eps_t.tolist()]
        self.bank.apply(grows, brows, [0], (eps_t @ coef)[None, :kk])
        base = self.position
        for k, (u, v) in enumerate(pairs):
            e = eps[k * self.num_replicas + self.rank]
            pu = self.cache if u < 0 else base + u
            pv = self.cache if v < 0 else base + v
            self.place.put(self.order[pu], e)
            self.place.put(self.order[pv], -e)
        if left is not None:
            self.cache = base + left
            self._cache_rows = [x[left : left + 1].clone() for x in xs]
        else:
            self.cache = -1
            self._cache_rows = None
        self.position += b

    def state_dict(self) -> dict[str, Any]:
        """Resumable state (tensors and plain values)."""
        return {
            "n": self.n,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "epoch": self.epoch,
            "rounds": self.rounds,
            "in_epoch": self.in_epoch,
            "position": self.position,
            "order": torch.tensor(self.order, dtype=torch.int64),
            "place": self.place.state(),
            "cache": self.cache,
            "cache_rows": list(self._cache_rows) if self._cache_rows is not None else [],
            "sizes": list(self._sizes or []),
            "aux": self.bank.state() if self.bank is not None else [],
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict`; the next ``iter`` resumes the interrupted epoch."""
        for key, mine in (("n", self.n), ("num_replicas", self.num_replicas), ("rank", self.rank)):
            if state.get(key) != mine:
                raise ValueError(f"state_dict: {key} is {state.get(key)!r}, expected {mine!r}")
        self.epoch, self.rounds = int(state["epoch"]), int(state["rounds"])
        self.in_epoch, self.position = bool(state["in_epoch"]), int(state["position"])
        self.order = [int(v) for v in state["order"].tolist()]
        self.place = TwoEnded(len(self.order) or self.num_samples)
        self.place.load(state["place"])
        self.cache = int(state["cache"])
        self._cache_rows = [t.clone() for t in state["cache_rows"]] or None
        self._sizes = [int(s) for s in state["sizes"]] or None
        if state["aux"]:
            assert self._sizes is not None
            self.bank = AuxBank(self._sizes, 1, state["aux"][0].dtype, state["aux"][0].device)
            self.bank.load(state["aux"])
        self.generator.set_state(state["generator"])
        self._resume = self.in_epoch and self.position < len(self.order)
