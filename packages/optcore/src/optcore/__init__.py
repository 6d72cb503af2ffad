"""optcore: the shared core of the training-algorithm packages.

Modules (one idea each):

* :mod:`optcore.tree` - named parameters, flatten / unflatten, dtype-device groups
* :mod:`optcore.persample` - per-sample gradients with ``torch.func``
* :mod:`optcore.curvature` - Hessian- and Gauss-Newton-vector products
* :mod:`optcore.linalg` - safe eigh, damped inverse / inverse root, top-k eigenpairs
* :mod:`optcore.distributed` - rank / world size, all-reduce mean, work assignment
* :mod:`optcore.data` - offline data sets and file-format loaders
* :mod:`optcore.testing` - ``spawn`` for multi-process gloo tests
"""

from optcore.curvature import gnvp, hvp
from optcore.data import Split, load_cifar10, load_mnist, load_sklearn, make_mnist1d
from optcore.distributed import (
    all_reduce_mean,
    assign_by_cost,
    broadcast_seed,
    broadcast_tensors,
    get_rank,
    get_world_size,
    is_distributed,
)
from optcore.linalg import (
    damped_inverse,
    inverse_root,
    safe_eigh,
    solve_triangular_left,
    solve_triangular_right,
    topk_eigh,
)
from optcore.persample import functional_per_sample_grads, per_sample_grads
from optcore.tree import flatten, group_by_dtype_device, named_parameters, numel, unflatten

__version__ = "0.1.0"

__all__ = [
    "Split",
    "all_reduce_mean",
    "assign_by_cost",
    "broadcast_seed",
    "broadcast_tensors",
    "damped_inverse",
    "flatten",
    "functional_per_sample_grads",
    "get_rank",
    "get_world_size",
    "gnvp",
    "group_by_dtype_device",
    "hvp",
    "inverse_root",
    "is_distributed",
    "load_cifar10",
    "load_mnist",
    "load_sklearn",
    "make_mnist1d",
    "named_parameters",
    "numel",
    "per_sample_grads",
    "safe_eigh",
    "solve_triangular_left",
    "solve_triangular_right",
    "topk_eigh",
    "unflatten",
]
