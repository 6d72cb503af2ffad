"""torchsso: second-order optimization and variational inference for PyTorch.

Public API::

    torchsso.optim.SecondOrderOptimizer(model, curv_type, curv_shapes, curv_kwargs, lr=...,
        momentum=..., momentum_type=..., weight_decay=..., l2_reg=..., acc_steps=...,
        curv_interval=..., inv_interval=..., kl_clip=...)
    torchsso.curvature  # Kron / Diag / Full / Unit blocks, Capture, per_example_grads
"""

from . import curvature, optim
from .optim import SecondOrderOptimizer

__all__ = ["SecondOrderOptimizer", "curvature", "optim"]
__version__ = "0.1.0"
