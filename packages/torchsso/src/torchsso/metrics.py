"""Calibration metric for the predictive distributions of :func:`torchsso.prediction`."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["expected_calibration_error"]


def expected_calibration_error(probs: Tensor, targets: Tensor, bins: int = 15) -> float:
    """Expected calibration error (ECE) of class probabilities with equal-width bins.

    Each example goes to the bin ``(i / bins, (i + 1) / bins]`` of its top-class
    probability; the ECE is the sum over bins of the bin's share of examples times
    ``|accuracy - mean confidence|`` in the bin.

    Args:
        probs: ``(N, C)`` predicted class probabilities (rows summing to one).
        targets: ``(N,)`` integer class labels.
        bins: Number of equal-width confidence bins (>= 1).

    Returns:
        The ECE as a Python float in ``[0, 1]``.

    Raises:
        ValueError: If the shapes do not match, ``bins < 1`` or ``probs`` is not finite.
    """
    if probs.dim() != 2:
        raise ValueError(f"probs must be (N, C), got shape {tuple(probs.shape)}")
    if targets.shape != probs.shape[:1]:
        raise ValueError(
            f"targets must be ({probs.shape[0]},) to match probs, got {tuple(targets.shape)}"
        )
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("probs contains non-finite values")
    conf, pred = probs.max(1)
    acc = (pred == targets).float()
    total = 0.0
    for i in range(bins):
        m = (conf > i / bins) & (conf <= (i + 1) / bins)
        if m.any():
            total += float(m.float().mean() * (acc[m].mean() - conf[m].mean()).abs())
    return total
