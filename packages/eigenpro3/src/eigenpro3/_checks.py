"""Input validation shared by the estimators (errors name the argument)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_features", "check_finite", "check_matrix", "targets_2d"]


def check_matrix(x: object, name: str) -> Tensor:
    """Return ``x`` as a 2-D floating tensor, or raise naming ``name``."""
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a tensor or array, got {type(x).__name__}") from err
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows)")
    if not x.is_floating_point():
        x = x.float()
    return x


def check_finite(x: Tensor, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` when ``x`` holds NaN or inf."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values")


def check_features(x: Tensor, d: int, name: str, other: str = "centers") -> None:
    """Raise when ``x`` does not have ``d`` columns."""
    if x.shape[-1] != d:
        raise ValueError(f"{name} has {x.shape[-1]} features but {other} has {d}")


def targets_2d(
    y: object, n: int, name: str, *, dtype: torch.dtype, n_outputs: int | None = None
) -> Tensor:
    """Targets as (n, c) floats: 1-D integer labels become one-hot when ``n_outputs > 1``."""
    if not isinstance(y, Tensor):
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a tensor or array, got {type(y).__name__}") from err
    if y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} rows but X has {n}")
    if y.dim() == 1:
        if n_outputs is not None and n_outputs > 1:
            if y.is_floating_point() or y.dtype == torch.bool:
                raise ValueError(
                    f"{name} is 1-D but n_outputs={n_outputs}: pass integer labels or (n, c) targets"
                )
            if int(y.min()) < 0 or int(y.max()) >= n_outputs:
                raise ValueError(f"{name} holds labels outside [0, {n_outputs})")
            y = torch.nn.functional.one_hot(y.long(), n_outputs)
        else:
            y = y.unsqueeze(1)
    elif y.dim() != 2:
        raise ValueError(f"{name} must be 1-D or 2-D, got shape {tuple(y.shape)}")
    y = y.to(dtype)
    check_finite(y, name)
    if n_outputs is not None and y.shape[1] != n_outputs:
        raise ValueError(f"{name} has {y.shape[1]} columns but n_outputs={n_outputs}")
    return y
