"""Balance types: one module per algorithm."""

from grabsampler.balance.base import Balancer, Decider
from grabsampler.balance.batch import BatchBalance
from grabsampler.balance.mean import MeanBalance
from grabsampler.balance.pair import PairBalance
from grabsampler.balance.recursive import RecursiveBalance
from grabsampler.balance.recursive_pair import RecursivePairBalance
from grabsampler.balance.shuffle import RandomReshuffling, ShuffleOnce

__all__ = [
    "BALANCERS",
    "Balancer",
    "BatchBalance",
    "Decider",
    "MeanBalance",
    "PairBalance",
    "RandomReshuffling",
    "RecursiveBalance",
    "RecursivePairBalance",
    "ShuffleOnce",
]

BALANCERS: dict[str, type[Balancer]] = {
    "mean": MeanBalance,
    "pair": PairBalance,
    "recursive": RecursiveBalance,
    "recursive_pair": RecursivePairBalance,
    "batch": BatchBalance,
    "rr": RandomReshuffling,
    "so": ShuffleOnce,
}
