"""The preconditioner update-probability schedule and its deterministic counter.

kron-torch anneals the probability of a preconditioner update from 1.0 to 0.03:
``p(n) = clamp(max_prob * exp(-decay * (n - flat_start)), min_prob, max_prob)``, and
turns the probability into a deterministic decision: a counter grows by one per
step and an update happens when ``counter >= 1 / p`` (the counter then resets).
The same arithmetic (float32) is used here, so the decisions match step for step;
no host random generator is involved.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["ProbSchedule", "advance", "precond_update_prob_schedule", "should_update"]


class ProbSchedule:
    """Exponential anneal with a flat start (picklable, no state).

    Args:
        max_prob: probability during the flat start.
        min_prob: floor of the probability.
        decay: exponential decay rate per step after the flat start.
        flat_start: number of steps at ``max_prob``.
    """

    def __init__(
        self,
        max_prob: float = 1.0,
        min_prob: float = 0.03,
        decay: float = 0.001,
        flat_start: float = 500,
    ) -> None:
        for name, value in (("max_prob", max_prob), ("min_prob", min_prob)):
            if not (0.0 < value <= 1.0):
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if min_prob > max_prob:
            raise ValueError(f"min_prob ({min_prob}) must not exceed max_prob ({max_prob})")
        if not (decay >= 0 and math.isfinite(decay)):
            raise ValueError(f"decay must be non-negative and finite, got {decay}")
        self.max_prob, self.min_prob = float(max_prob), float(min_prob)
        self.decay, self.flat_start = float(decay), float(flat_start)

    def __call__(self, n: int | Tensor) -> Tensor:
        """Probability at step ``n`` (a float32 0-dim tensor)."""
        f32 = torch.float32
        n_t = torch.as_tensor(n, dtype=f32)
        prob = torch.tensor(self.max_prob, dtype=f32) * torch.exp(
            -torch.tensor(self.decay, dtype=f32) * (n_t - torch.tensor(self.flat_start, dtype=f32))
        )
        return prob.clamp(min=self.min_prob, max=self.max_prob)

    def __repr__(self) -> str:
        return (
            f"ProbSchedule(max_prob={self.max_prob}, min_prob={self.min_prob}, "
            f"decay={self.decay}, flat_start={self.flat_start})"
        )


def precond_update_prob_schedule(
    max_prob: float = 1.0, min_prob: float = 0.03, decay: float = 0.001, flat_start: float = 500
) -> ProbSchedule:
    """kron-torch's default schedule: 1.0 for 500 steps, then down to 0.03 by ~4000 steps."""
    return ProbSchedule(max_prob, min_prob, decay, flat_start)


def check_probability(prob: float | Callable[[int], float | Tensor] | None) -> None:
    """Raise ``ValueError`` unless ``prob`` is None, a callable, or a number in [0, 1]."""
    if prob is None or callable(prob):
        return
    if isinstance(prob, bool) or not isinstance(prob, (int, float)):
        raise TypeError(
            "preconditioner_update_probability must be a float, a callable or None, "
            f"got {type(prob).__name__}"
        )
    if not (0.0 <= float(prob) <= 1.0):
        raise ValueError(f"preconditioner_update_probability must be in [0, 1], got {prob}")


def should_update(
    prob: float | Callable[[int], float | Tensor] | None, step: int, counter: int
) -> tuple[bool, int]:
    """Decide whether step ``step`` updates the preconditioner.

    Args:
        prob: a probability, a schedule ``f(step)``, or None for the default schedule.
        step: the number of steps taken before this one.
        counter: the counter before this step.

    Returns:
        ``(update, new_counter)``.
    """
    if prob is None:
        prob = _DEFAULT
    if isinstance(prob, float) and 0.0 <= prob <= 1.0:
        # a constant: the same float32 decision on host floats (no tensor ops)
        counter += 1
        threshold = _reciprocal32(prob)
        update = threshold is not None and _f32(counter) >= threshold
        return update, (0 if update else counter)
    value = prob(step) if callable(prob) else prob
    p = torch.as_tensor(value, dtype=torch.float32)
    if not bool(torch.isfinite(p)) or not (0.0 <= float(p) <= 1.0):
        raise ValueError(f"preconditioner_update_probability returned {float(p)} at step {step}")
    counter += 1
    if float(p) <= 0.0:
        return False, counter
    update = bool(torch.tensor(counter, dtype=torch.float32) >= 1.0 / p)
    return update, (0 if update else counter)


def _f32(x: float) -> float:
    """``x`` rounded to float32 (round to nearest even)."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


@functools.lru_cache(maxsize=64)
def _reciprocal32(prob: float) -> float | None:
    """float32 ``1 / float32(prob)`` (None for a zero probability: never update).

    The double quotient of two float32 values rounded once more to float32 is the
    correctly rounded float32 quotient (53 >= 2 * 24 + 2 bits), so this matches
    ``1.0 / torch.tensor(prob, dtype=torch.float32)``.
    """
    p32 = _f32(prob)
    if p32 <= 0.0:
        return None
    return _f32(1.0 / p32)


def advance(
    counters: dict[str, Tensor], prob: float | Callable[[int], float | Tensor] | None
) -> tuple[bool, int]:
    """Advance an optimizer's step counters by one step, in place.

    ``counters`` holds the 0-dim tensors ``prob_step``, ``update_counter`` and
    ``num_updates`` kept in optimizer state.

    Returns:
        ``(update, updates_before)``: whether this step updates the
        preconditioner, and how many updates preceded it.
    """
    update, counter = should_update(
        prob, int(counters["prob_step"]), int(counters["update_counter"])
    )
    counters["update_counter"].fill_(counter)
    counters["prob_step"].add_(1)
    before = int(counters["num_updates"])
    if update:
        counters["num_updates"].add_(1)
    return update, before


_DEFAULT = ProbSchedule()
