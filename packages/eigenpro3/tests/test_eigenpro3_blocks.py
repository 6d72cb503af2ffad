"""Kernel blocks into reused buffers, the transposed skinny product, the exact projector."""

from __future__ import annotations

import pytest
import torch

from eigenpro3 import KernelModel
from eigenpro3.blocks import CenterSet, times
from eigenpro3.kernels import RadialKernel, get_kernel
from eigenpro3.preconditioner import single_thread
from eigenpro3.projection import CholeskyFactor


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _data(n: int, m: int, d: int = 7, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(m, d, generator=g, dtype=dtype)


@pytest.mark.parametrize(
    ("name", "kw", "ref"),
    [
        ("laplacian", {"bandwidth": 1.7}, lambda r: torch.exp(-r / 1.7)),
        ("gaussian", {"bandwidth": 1.7}, lambda r: torch.exp(-(r**2) / (2 * 1.7**2))),
        ("dispersal", {"bandwidth": 1.7, "gamma": 0.8}, lambda r: torch.exp(-((r / 1.7) ** 0.8))),
    ],
    ids=["laplacian", "gaussian", "dispersal"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radial_block_into_reused_buffer_matches_closed_form(name, kw, ref, dtype) -> None:
    x, z = _data(50, 40, dtype=dtype)
    kern = get_kernel(name, **kw)
    assert isinstance(kern, RadialKernel)
    zp = kern.prepare(z)
    buf = torch.full((64, 40), float("nan"), dtype=dtype)
    tol = 1e-9 if dtype == torch.float64 else 2e-3  # float32: sqrt of a rounded distance
    for rows in (50, 17):  # the same buffer serves blocks of different heights
        out = kern.block(x[:rows], zp, out=buf[:rows])
        assert out.data_ptr() == buf.data_ptr()
        expected = ref(torch.cdist(x[:rows].double(), z.double())).to(dtype)
        torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="features"):
        kern.block(x[:, :3], zp)


def test_times_is_the_plain_product_and_center_set_reuses_its_buffer() -> None:
    x, z = _data(30, 25)
    w = torch.randn(25, 4, dtype=torch.float64)
    k = get_kernel("laplacian", bandwidth=2.0)(x, z)
    torch.testing.assert_close(times(k, w.T.contiguous()), k @ w)
    cs = CenterSet(
        z, get_kernel("laplacian", bandwidth=2.0), [torch.device("cpu")], budget=2**20, cache=False
    )
    first = cs.block(x, 0)
    again = cs.block(x[:10], 0)
    assert again.data_ptr() == first.data_ptr()  # no new allocation per call
    torch.testing.assert_close(cs.matmul(x, w), k @ w)


def test_cholesky_factor_float32_when_accurate_else_float64() -> None:
    x, _ = _data(200, 1, d=5)
    good = get_kernel("laplacian", bandwidth=1.0)(x, x)  # well conditioned
    f = CholeskyFactor(good.float(), torch.float32)
    assert f.factor is not None and f.factor.dtype == torch.float32
    u = torch.randn(200, 3, dtype=torch.float64)
    torch.testing.assert_close(f.solve(good.float() @ u.float()).double(), u, rtol=1e-3, atol=1e-3)
    bad = get_kernel("gaussian", bandwidth=3.0)(x, x)  # condition number far beyond float32
    assert float(torch.linalg.cond(bad)) > 1e8
    f64 = CholeskyFactor(bad.float(), torch.float32)
    assert f64.factor is not None and f64.factor.dtype == torch.float64
    with pytest.raises(ValueError, match="not positive definite"):
        CholeskyFactor(-good, torch.float64)


def test_auto_inner_solver_picks_cholesky_only_when_it_fits() -> None:
    _, z = _data(1, 60)
    kw = dict(bandwidth=2.0, verbose=False)
    assert KernelModel(2, z, "laplacian", **kw).inner_solver == "cholesky"
    assert KernelModel(2, z, "laplacian", cache=False, **kw).inner_solver == "eigenpro2"
    sharded = KernelModel(2, z, "laplacian", devices=["cpu", "cpu"], **kw)
    assert sharded.inner_solver == "eigenpro2"
    with pytest.raises(ValueError, match="inner_solver must be"):
        KernelModel(2, z, "laplacian", inner_solver="lu", **kw)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["laplacian", "gaussian", "dispersal"])
def test_compiled_elementwise_pass_equals_eager(name: str) -> None:
    # torch.compile needs a C++ compiler on CPU (~10 s per kernel): slow test
    x, z = _data(70, 90, dtype=torch.float32)
    eager = get_kernel(name, bandwidth=1.5)
    fused = get_kernel(name, bandwidth=1.5, compiled=True)
    assert isinstance(fused, RadialKernel) and fused.compiled
    zp = fused.prepare(z)
    buf = torch.empty(70, 90)
    for rows in (70, 33):  # dynamic shapes: one compilation serves both
        out = fused.block(x[:rows], zp, out=buf[:rows])
        assert out.data_ptr() == buf.data_ptr()
        torch.testing.assert_close(out, eager(x[:rows], z), rtol=1e-5, atol=1e-6)
