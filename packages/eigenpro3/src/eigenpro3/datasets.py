"""A tensor dataset that also serves whole batches by index tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

__all__ = ["CustomDataset", "batch_loader"]


class CustomDataset(Dataset):
    """Pairs ``(X[i], y[i])``; indexing with a list / tensor returns a whole batch.

    Args:
        X: (n, ...) inputs.
        y: (n, ...) targets (labels or one-hot rows).

    Raises:
        ValueError: when ``X`` and ``y`` have different lengths.
    """

    def __init__(self, X: Tensor, y: Tensor) -> None:
        if len(X) != len(y):
            raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
        self.X = X
        self.y = y

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, idx: int | Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(idx, list):
            idx = torch.as_tensor(idx, dtype=torch.long)
        return self.X[idx], self.y[idx]


def batch_loader(
    X: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """A loader yielding ``(X_b, y_b)`` batches by fancy indexing (no per-item collation).

    With ``shuffle`` the order is redrawn every epoch from ``generator``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = CustomDataset(X, y)
    base = RandomSampler(ds, generator=generator) if shuffle else SequentialSampler(ds)
    return DataLoader(ds, sampler=BatchSampler(base, batch_size, drop_last=False), batch_size=None)
