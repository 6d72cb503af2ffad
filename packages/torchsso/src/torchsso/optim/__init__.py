"""Optimizers: second-order (``SecondOrderOptimizer``) and variational (``VIOptimizer``)."""

from .second_order import SecondOrderOptimizer
from .vi import VIOptimizer, prediction

__all__ = ["SecondOrderOptimizer", "VIOptimizer", "prediction"]
