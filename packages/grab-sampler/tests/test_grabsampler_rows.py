"""Dense rows: the chunked update and the column-split products equal the plain products."""

from __future__ import annotations

import pytest
import torch

from grabsampler import _rows
from grabsampler._rows import CHUNK, DenseRows, split_mm, stored_cross


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


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("n", "pad"), [(40, 0), (41, 3), (1000, 0)])
def test_split_products_match_plain_products(monkeypatch, threads, n, pad):
    """Wide rows: the reduction split into one column part per thread (plus a tail)."""
    monkeypatch.setattr(_rows, "SPLIT_COLS", 8)
    gen = torch.Generator().manual_seed(n + threads)
    base = torch.randn(6, n + pad, generator=gen, dtype=torch.float64)
    x = base[:, :n]  # rows with a stride larger than n when pad > 0
    aux = torch.randn(2, n, generator=gen, dtype=torch.float64)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert _rows._split_parts(n) == (threads if threads > 1 and n >= 8 * threads else 1)
        rows = DenseRows(x)
        torch.testing.assert_close(rows.gram(), x @ x.T)
        torch.testing.assert_close(rows.cross(aux), x @ aux.T)
        torch.testing.assert_close(split_mm(aux, x), aux @ x.T)
        # a transposed (column-strided) operand falls back to the plain product
        torch.testing.assert_close(split_mm(x.T.contiguous().T, aux), x @ aux.T)
    finally:
        torch.set_num_threads(old)


def test_stored_cross_matches_product_and_falls_back(monkeypatch):
    """The oneDNN product with stored vectors (float32, wide rows) and its fallback."""
    monkeypatch.setattr(_rows, "ONEDNN_COLS", 64)
    available = _rows._ONEDNN[0] is not None
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(16, 300, generator=gen)
    act = torch.randn(3, 300, generator=gen)
    want = (act.double() @ x.double().T).float()
    torch.testing.assert_close(stored_cross(act, x), want, rtol=1e-5, atol=1e-4)
    assert (_rows._ONEDNN[0] is not None) == available  # used, not disabled
    # float64, narrow or strided rows take the plain product
    torch.testing.assert_close(stored_cross(act.double(), x.double()), act.double() @ x.double().T)
    torch.testing.assert_close(stored_cross(act[:, :50], x[:, :50]), act[:, :50] @ x[:, :50].T)

    def broken(*args):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(_rows, "_ONEDNN", [broken])
    torch.testing.assert_close(stored_cross(act, x), want, rtol=1e-5, atol=1e-4)
    assert _rows._ONEDNN[0] is None  # disabled after the failure


def test_factored_cross_through_onednn_matches_product_and_falls_back(monkeypatch):
    """Hooks mode's ``<G_i, V_k>`` of a wide float32 layer (oneDNN) and its fallback."""
    from grabsampler.hooks import FactoredRows

    monkeypatch.setattr(_rows, "ONEDNN_COLS", 64)
    available = _rows._ONEDNN[0] is not None
    gen = torch.Generator().manual_seed(12)
    a = torch.randn(5, 1, 9, generator=gen)
    g = torch.randn(5, 1, 8, generator=gen)
    aux = torch.randn(2, 8 * 9, generator=gen)
    dense = torch.einsum("bo,bi->boi", g[:, 0].double(), a[:, 0].double()).reshape(5, -1)
    want = (dense @ aux.double().T).float()
    rows = FactoredRows(a, g)
    torch.testing.assert_close(rows.cross(aux), want, rtol=1e-5, atol=1e-4)
    assert (_rows._ONEDNN[0] is not None) == available  # used, not disabled

    def broken(*args):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(_rows, "_ONEDNN", [broken])
    torch.testing.assert_close(rows.cross(aux), want, rtol=1e-5, atol=1e-4)
    assert _rows._ONEDNN[0] is None  # disabled after the failure


def test_pair_differences_of_factored_rows_match_dense_rows():
    """Hooks mode's pair-difference products (from the Gram matrix and one stored-vector
    product) equal those of the materialised gradients: <d_p, d_q> and <d_p, s>."""
    from grabsampler._bank import AuxBank
    from grabsampler.hooks import FactoredRows

    gen = torch.Generator().manual_seed(3)
    b, t, o, i = 6, 2, 5, 7  # a sequence layer: rows are sums over t of g_t a_t^T
    a = torch.randn(b, t, i, generator=gen, dtype=torch.float64)
    g = torch.randn(b, t, o, generator=gen, dtype=torch.float64)
    bias = torch.randn(b, 3, generator=gen, dtype=torch.float64)
    dense = torch.einsum("bto,bti->boi", g, a).reshape(b, -1)
    bank = AuxBank([o * i, 3], 2, torch.float64, torch.device("cpu"))
    for blk in bank.blocks:
        blk[0].copy_(torch.randn(blk.shape[1], generator=gen, dtype=torch.float64))
    s = torch.cat([bank.buffers[0][0], bank.buffers[1][0]])
    got, _ = bank.pair_diff_lists([FactoredRows(a, g), DenseRows(bias)], b)
    x = torch.cat([dense, bias], dim=1)
    d = x[0::2] - x[1::2]
    want = torch.cat([d @ d.T, (d @ s)[:, None]], dim=1)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=1e-12, atol=1e-12)
    assert bank.pair_diff_lists([FactoredRows(a[:5], g[:5]), DenseRows(bias[:5])], 5) is None


def _state_equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("kind", ["mean", "pair"])
@pytest.mark.parametrize("wide", [False, True])
def test_dict_fast_path_matches_tensor_input_and_rejects_bad_batches(monkeypatch, kind, wide):
    from grabsampler import GraBSampler, _bank

    if wide:  # the (B + k, B) product with host-tracked stored products
        monkeypatch.setattr(_bank, "ONE_PRODUCT_COLS", 0)

    gen = torch.Generator().manual_seed(0)
    n, batch, epochs = 18, 4, 3
    params = {"w": torch.zeros(3, 4, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}
    table = torch.randn(epochs, n, 15, generator=gen, dtype=torch.float64) + 0.5
    fast = GraBSampler(range(n), params, kind, seed=1)
    slow = GraBSampler(range(n), params, kind, seed=1)
    assert fast._flat_ok
    for e in range(epochs):
        order = list(iter(fast))
        assert list(iter(slow)) == order
        for s in range(0, n, batch):
            rows = table[e, order[s : s + batch]]
            # non-contiguous per-parameter tensors in the dict
            w = rows[:, :12].reshape(-1, 4, 3).transpose(1, 2)
            fast.step({"w": w, "b": rows[:, 12:]})
            slow.step(rows)
            if e == 1 and s == 0:
                before = fast.state_dict()
                bad = rows[:, 12:].clone()
                bad[1, 2] = float("nan")
                with pytest.raises(ValueError, match="non-finite"):
                    fast.step({"w": w, "b": bad})
                with pytest.raises(ValueError, match="entries per example"):
                    fast.step({"w": w[:, :2], "b": rows[:, 12:]})
                assert _state_equal(fast.state_dict(), before)
    assert list(iter(fast)) == list(iter(slow))


@pytest.mark.parametrize("kind", ["mean", "pair"])
@pytest.mark.parametrize("variant", ["requires_grad", "flat_shapes", "float32_into_float64"])
def test_dicts_off_the_fast_path_give_the_same_orders(kind, variant):
    """Dicts the fast path does not take (autograd history, other shapes of the same
    size, another dtype) go through the general path with the same result."""
    from grabsampler import GraBSampler

    gen = torch.Generator().manual_seed(3)
    n, batch, epochs = 14, 4, 3
    params = {"w": torch.zeros(3, 4, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}
    table = torch.randn(epochs, n, 15, generator=gen, dtype=torch.float64) + 0.5
    if variant == "float32_into_float64":
        table = table.float().double()  # values exact in both dtypes
    odd = GraBSampler(range(n), params, kind, seed=2)
    ref = GraBSampler(range(n), params, kind, seed=2)
    for e in range(epochs):
        order = list(iter(odd))
        assert list(iter(ref)) == order
        for s in range(0, n, batch):
            rows = table[e, order[s : s + batch]]
            w, b = rows[:, :12], rows[:, 12:]
            if variant == "requires_grad":
                w = w.reshape(-1, 3, 4).clone().requires_grad_(True)
            elif variant == "float32_into_float64":
                w, b = w.reshape(-1, 3, 4).float(), b.float()
            pos = odd.position
            odd.step({"w": w, "b": b})
            assert odd.position == pos + rows.shape[0]
            ref.step(rows)
    assert list(iter(odd)) == list(iter(ref))
