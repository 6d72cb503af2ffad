"""Kernels against their closed forms; PSD-ness; name lookup."""

from __future__ import annotations

import math

import pytest
import torch

from eigenpro3 import kernels
from eigenpro3.preconditioner import single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    # small problems: multi-threaded LAPACK is slower than one thread on a busy CPU
    with single_thread():
        yield


def _data(n: int = 30, m: int = 20, d: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(
        m, d, generator=g, dtype=torch.float64
    )


@pytest.mark.parametrize(
    ("fn", "ref"),
    [
        (lambda x, z: kernels.laplacian(x, z, 1.5), lambda r: torch.exp(-r / 1.5)),
        (lambda x, z: kernels.gaussian(x, z, 1.5), lambda r: torch.exp(-(r**2) / (2 * 1.5**2))),
        (
            lambda x, z: kernels.dispersal(x, z, 1.5, gamma=1.3),
            lambda r: torch.exp(-((r / 1.5) ** 1.3)),
        ),
    ],
    ids=["laplacian", "gaussian", "dispersal"],
)
def test_distance_kernels_match_closed_form(fn, ref) -> None:
    x, z = _data()
    r = torch.cdist(x, z)
    torch.testing.assert_close(fn(x, z), ref(r), rtol=1e-9, atol=1e-9)


def test_ntk_relu_depth1_closed_form_and_diagonal() -> None:
    x, z = _data()
    nx, nz = x.norm(dim=1, keepdim=True), z.norm(dim=1)
    u = ((x @ z.T) / (nx * nz)).clamp(-1, 1)
    k1 = (u * (math.pi - torch.arccos(u)) + torch.sqrt(1 - u**2)) / math.pi
    k0 = (math.pi - torch.arccos(u)) / math.pi
    expected = (x @ z.T) * k0 + nx * nz * k1
    torch.testing.assert_close(kernels.ntk_relu(x, z, depth=1), expected)
    for depth in (1, 2, 3):
        diag = kernels.ntk_relu(x, x, depth=depth).diagonal()
        torch.testing.assert_close(diag, (depth + 1) * x.pow(2).sum(1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(kernels.KERNELS))
def test_kernels_are_psd_and_symmetric(name: str) -> None:
    x, _ = _data(40)
    k = kernels.get_kernel(name)(x, x)
    torch.testing.assert_close(k, k.T, rtol=1e-7, atol=1e-7)
    assert torch.linalg.eigvalsh(k)[0] > -1e-8 * torch.linalg.eigvalsh(k)[-1]


def test_get_kernel_errors_and_binding() -> None:
    with pytest.raises(ValueError, match="Unknown kernel_fn 'cosine'"):
        kernels.get_kernel("cosine")
    with pytest.raises(TypeError, match="kernel_fn"):
        kernels.get_kernel(3)  # type: ignore[arg-type]
    x, z = _data()
    k = kernels.get_kernel("laplacian", bandwidth=2.0)
    torch.testing.assert_close(k(x, z), kernels.laplacian(x, z, bandwidth=2.0))
    with pytest.raises(ValueError, match="bandwidth"):
        kernels.laplacian(x, z, bandwidth=0.0)
    with pytest.raises(ValueError, match="features"):
        kernels.gaussian(x, z[:, :2])
    with pytest.raises(ValueError, match="depth"):
        kernels.ntk_relu(x, z, depth=0)
