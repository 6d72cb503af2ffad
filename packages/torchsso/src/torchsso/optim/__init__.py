"""Optimizers: second-order (``SecondOrderOptimizer``) and variational (``VIOptimizer``)."""

from .second_order import SecondOrderOptimizer

__all__ = ["SecondOrderOptimizer"]
