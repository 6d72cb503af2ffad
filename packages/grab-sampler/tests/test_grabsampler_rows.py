"""Dense rows: the chunked in-place update of wide rows equals the plain product."""

from __future__ import annotations

import pytest
import torch

from grabsampler._rows import CHUNK, DenseRows


@pytest.mark.parametrize(
    ("n", "pad"), [(100, 0), (16 * CHUNK, 0), (16 * CHUNK + 123, 0), (17 * CHUNK + 5, 7)]
)
def test_combine_into_matches_product(n, pad):
    gen = torch.Generator().manual_seed(n)
    base = torch.randn(5, n + pad, generator=gen, dtype=torch.float64)
    x = base[:, :n]  # rows with a stride larger than n when pad > 0
    out = torch.randn(2, n, generator=gen, dtype=torch.float64)
    w = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    want = out + w @ x
    DenseRows(x).combine_into(out, w)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(DenseRows(x).combine(w), w @ x)
