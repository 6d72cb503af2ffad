"""Baselines that ignore gradients: random reshuffling and shuffle once."""

from __future__ import annotations

from typing import Any

import torch

from grabsampler.balance.base import Balancer, Decider, Gram

__all__ = ["RandomReshuffling", "ShuffleOnce"]


class RandomReshuffling(Balancer):
    """A fresh uniformly random permutation every epoch (``"rr"``)."""

    name = "rr"
    uses_gradients = False

    def start_epoch(self, order: list[int]) -> None:
        return None

    def step(self, gram: Gram, indices: list[int]) -> None:
        return None

    def end_epoch(self, unvisited: list[int]) -> tuple[list[int], None]:
        return torch.randperm(self.n, generator=self.decider.generator).tolist(), None


class ShuffleOnce(Balancer):
    """One random permutation, reused every epoch (``"so"``)."""

    name = "so"
    uses_gradients = False

    def __init__(self, n: int, decider: Decider) -> None:
        super().__init__(n, decider)
        self.fixed: list[int] = []

    def start_epoch(self, order: list[int]) -> None:
        if not self.fixed:
            self.fixed = list(order)

    def step(self, gram: Gram, indices: list[int]) -> None:
        return None

    def end_epoch(self, unvisited: list[int]) -> tuple[list[int], None]:
        return list(self.fixed), None

    def state_dict(self) -> dict[str, Any]:
        return {"fixed": torch.tensor(self.fixed, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fixed = [int(v) for v in state["fixed"].tolist()]
