"""torchsso: second-order optimization and variational inference for PyTorch.

Public API::

    torchsso.optim.SecondOrderOptimizer(model, curv_type, curv_shapes, curv_kwargs, lr=...,
        momentum=..., momentum_type=..., weight_decay=..., l2_reg=..., acc_steps=...,
        curv_interval=..., inv_interval=..., kl_clip=...)
    torchsso.optim.VIOptimizer(model, dataset_size, curv_type, curv_shapes, curv_kwargs,
        num_mc_samples=..., kl_weighting=..., warmup_kl_weighting_steps=..., prior_variance=...)
    torchsso.prediction(model, x, mc_samples=K)  # Bayesian model average (K=0: the mean)
    torchsso.expected_calibration_error(probs, targets, bins=15)
    torchsso.curvature  # Kron / Diag / Full / Unit blocks, Capture, per_example_grads
"""

from . import curvature, optim
from .metrics import expected_calibration_error
from .optim import SecondOrderOptimizer, VIOptimizer, prediction

__all__ = [
    "SecondOrderOptimizer",
    "VIOptimizer",
    "curvature",
    "expected_calibration_error",
    "optim",
    "prediction",
]
__version__ = "0.1.0"
