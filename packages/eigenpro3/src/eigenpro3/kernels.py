"""Positive semidefinite kernels ``K(x, z)`` evaluated as dense blocks.

Every kernel takes two row-matrices ``x`` (n, d) and ``z`` (m, d) and returns
the (n, m) block ``K(x, z)``. Distances use the ``|x|^2 + |z|^2 - 2 x.z``
expansion so that the heavy work is one matrix product, followed by in-place
elementwise passes (no extra n x m temporaries).

Any user callable ``K(X, Z) -> Tensor`` of the same signature works as a
kernel as well; :func:`get_kernel` turns a name into a kernel callable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

__all__ = [
    "KERNELS",
    "KernelFn",
    "dispersal",
    "gaussian",
    "get_kernel",
    "laplacian",
    "ntk_relu",
    "squared_distances",
]

KernelFn = Callable[[Tensor, Tensor], Tensor]


def _check_pair(x: Tensor, z: Tensor) -> None:
    if x.dim() != 2 or z.dim() != 2:
        raise ValueError(f"x and z must be 2-D, got shapes {tuple(x.shape)} and {tuple(z.shape)}")
    if x.shape[1] != z.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but z has {z.shape[1]}")


def _check_bandwidth(bandwidth: float) -> None:
    if not bandwidth > 0 or not math.isfinite(bandwidth):
        raise ValueError(f"bandwidth must be a positive finite number, got {bandwidth}")


def squared_distances(x: Tensor, z: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances ``|x_i - z_j|^2`` as an (n, m) block.

    Computed as ``|x|^2 + |z|^2 - 2 x z^T`` with a single ``addmm`` and clamped
    at zero to remove negative rounding.
    """
    _check_pair(x, z)
    xx = (x * x).sum(dim=1, keepdim=True)
    zz = (z * z).sum(dim=1).unsqueeze(0)
    out = torch.addmm(zz, x, z.T, beta=1.0, alpha=-2.0)
    out.add_(xx)
    return out.clamp_(min=0.0)


def laplacian(x: Tensor, z: Tensor, bandwidth: float = 1.0) -> Tensor:
    """Laplacian kernel ``exp(-|x - z| / bandwidth)``."""
    _check_bandwidth(bandwidth)
    return squared_distances(x, z).sqrt_().mul_(-1.0 / bandwidth).exp_()


def gaussian(x: Tensor, z: Tensor, bandwidth: float = 1.0) -> Tensor:
    """Gaussian kernel ``exp(-|x - z|^2 / (2 bandwidth^2))``."""
    _check_bandwidth(bandwidth)
    return squared_distances(x, z).mul_(-0.5 / bandwidth**2).exp_()


def dispersal(x: Tensor, z: Tensor, bandwidth: float = 1.0, gamma: float = 1.5) -> Tensor:
    """Exponential-power (dispersal) kernel ``exp(-(|x - z| / bandwidth)^gamma)``.

    Positive definite for ``0 < gamma <= 2``; ``gamma = 1`` is the Laplacian and
    ``gamma = 2`` a Gaussian with bandwidth ``bandwidth / sqrt(2)``.
    """
    _check_bandwidth(bandwidth)
    if not 0.0 < gamma <= 2.0:
        raise ValueError(f"gamma must lie in (0, 2], got {gamma}")
    d2 = squared_distances(x, z).mul_(1.0 / bandwidth**2)
    return d2.pow_(0.5 * gamma).neg_().exp_()


def _kappa0(u: Tensor) -> Tensor:
    return (math.pi - torch.arccos(u)) / math.pi


def _kappa1(u: Tensor) -> Tensor:
    return (u * (math.pi - torch.arccos(u)) + torch.sqrt(1.0 - u * u)) / math.pi


def ntk_relu(x: Tensor, z: Tensor, depth: int = 1, bandwidth: float = 1.0) -> Tensor:
    """Neural tangent kernel of a fully connected ReLU network.

    ``depth`` hidden layers, He-scaled (so ``Sigma(x, x) = |x|^2`` in every layer),
    inputs divided by ``bandwidth``. The diagonal is ``(depth + 1) |x|^2``, so
    unlike the distance kernels its maximum is not 1.

    References:
        Jacot, Gabriel, Hongler. Neural Tangent Kernel (2018); Arora et al.
        On Exact Computation with an Infinitely Wide Neural Net (2019).
    """
    _check_pair(x, z)
    _check_bandwidth(bandwidth)
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    x = x / bandwidth
    z = z / bandwidth
    nx = x.norm(dim=1, keepdim=True)
    nz = z.norm(dim=1).unsqueeze(0)
    norms = nx * nz
    sigma = x @ z.T
    theta = sigma.clone()
    safe = norms.clamp(min=torch.finfo(x.dtype).tiny)
    for _ in range(depth):
        u = (sigma / safe).clamp_(-1.0, 1.0)
        sigma = norms * _kappa1(u)
        theta = theta * _kappa0(u) + sigma
    return theta


KERNELS: dict[str, Callable[..., Tensor]] = {
    "laplacian": laplacian,
    "gaussian": gaussian,
    "dispersal": dispersal,
    "ntk_relu": ntk_relu,
}


def get_kernel(kernel: str | KernelFn, **kwargs: float) -> KernelFn:
    """Return a two-argument kernel callable.

    Args:
        kernel: a name in :data:`KERNELS` or a callable ``K(X, Z)``.
        **kwargs: keyword arguments bound to the named kernel (``bandwidth``,
            ``depth``, ``gamma``).

    Raises:
        ValueError: for an unknown name. TypeError: for a non-callable.
    """
    if isinstance(kernel, str):
        if kernel not in KERNELS:
            raise ValueError(f"Unknown kernel_fn {kernel!r}; expected one of {sorted(KERNELS)}")
        return partial(KERNELS[kernel], **kwargs)
    if not callable(kernel):
        raise TypeError(f"kernel_fn must be a kernel name or a callable, got {type(kernel)}")
    if kwargs:
        return partial(kernel, **kwargs)
    return kernel
