"""PSGD: preconditioned stochastic gradient descent as ``torch.optim.Optimizer`` subclasses.

* :class:`Kron` -- drop-in for kron-torch's ``Kron`` (cached ``P = Q^H Q``, tensor state).
* :class:`KronWhiten`, :class:`KronNewton` -- Kronecker-factored whitening / Newton.
* :class:`LRAWhiten`, :class:`LRANewton` -- low-rank plus diagonal ``Q = (I + U V^T) diag(d)``.
* :class:`DenseNewton` -- one dense ``Q`` over all parameters.
* :func:`precond_update_prob_schedule` -- kron-torch's annealed update probability.
"""

from .factors import GEOMETRIES
from .family import DenseNewton, KronNewton, KronWhiten
from .kron import Kron
from .lra import LRANewton, LRAWhiten
from .schedule import ProbSchedule, precond_update_prob_schedule

__all__ = [
    "GEOMETRIES",
    "DenseNewton",
    "Kron",
    "KronNewton",
    "KronWhiten",
    "LRANewton",
    "LRAWhiten",
    "ProbSchedule",
    "precond_update_prob_schedule",
]
