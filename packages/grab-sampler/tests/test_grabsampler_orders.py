"""Orders of every balance type equal a one-at-a-time reference implementation."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

from grabsampler import GraBSampler

_spec = importlib.util.spec_from_file_location(
    "grabsampler_reference", pathlib.Path(__file__).with_name("grabsampler_reference.py")
)
assert _spec is not None and _spec.loader is not None
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

SHAPES = {"w": (3, 2), "b": (3,), "v": (1,)}
D = 10


def make_params(dtype=torch.float64):
    return {k: torch.zeros(s, dtype=dtype) for k, s in SHAPES.items()}


def grad_table(epochs, n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # a non-zero mean so that centering matters
    return torch.randn(epochs, n, D, generator=g, dtype=dtype) + 0.7


def as_dict(rows):
    out, off = {}, 0
    for k, s in SHAPES.items():
        size = int(torch.tensor(s).prod())
        out[k] = rows[:, off : off + size].reshape(rows.shape[0], *s)
        off += size
    return out


def run_sampler(sampler, table, batch, epochs, mode="dict"):
    orders = []
    for e in range(epochs):
        order = list(iter(sampler))
        orders.append(order)
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            rows = table[e, idx]
            if mode == "dict":
                sampler.step(as_dict(rows))
            elif mode == "tensor":
                sampler.step(rows)
            else:
                sampler.step(list(as_dict(rows).values()))
    return orders


def reference_sign(got, n, seed, probabilistic):
    """The reference sign rule for a sampler seeded with ``seed``; for probabilistic
    balancing it first asserts that the first epoch is the seeded random permutation and
    hands the generator on (its state after that draw) to the reference."""
    if not probabilistic:
        return ref.Sign()
    gen = torch.Generator().manual_seed(seed)
    assert got[0] == torch.randperm(n, generator=gen).tolist()
    return ref.Sign(probabilistic=True, c=2.0, gen=gen)


def reference_orders(kind, order0, table, batch, epochs, sign, depth=4):
    orders = [order0]
    m = torch.zeros(D, dtype=table.dtype)
    order = order0
    for e in range(epochs - 1):

        def grad(i, e=e):
            return table[e, i]

        if kind == "mean":
            order, m = ref.ref_mean_epoch(order, grad, m, sign)
        elif kind == "batch":
            order, m = ref.ref_mean_epoch(order, grad, m, sign, batch=batch, parallel=True)
        elif kind == "pair":
            order = ref.ref_pair_epoch(order, grad, sign)
        elif kind == "recursive":
            order, m = ref.ref_recursive_epoch(order, grad, m, sign, depth)
        elif kind == "recursive_pair":
            order = ref.ref_recursive_pair_epoch(order, grad, sign, batch)
        orders.append(order)
    return orders


KINDS = ["mean", "pair", "batch", "recursive", "recursive_pair"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("n", "batch"), [(24, 4), (23, 5), (17, 16), (9, 1)])
@pytest.mark.parametrize("mode", ["dict", "tensor", "list"])
def test_deterministic_orders_match_reference(kind, n, batch, mode):
    epochs = 4
    table = grad_table(epochs, n, seed=n + batch)
    sampler = GraBSampler(range(n), make_params(), kind, depth=3, seed=3)
    got = run_sampler(sampler, table, batch, epochs, mode)
    want = reference_orders(kind, got[0], table, batch, epochs, ref.Sign(), depth=3)
    assert got == want
    for o in got:
        assert sorted(o) == list(range(n))


@pytest.mark.parametrize("kind", KINDS)
def test_probabilistic_orders_match_reference(kind):
    n, batch, epochs = 20, 4, 3
    table = grad_table(epochs, n, seed=11)
    sampler = GraBSampler(range(n), make_params(), kind, probabilistic=True, prob_c=2.0, seed=5)
    got = run_sampler(sampler, table, batch, epochs)
    sign = reference_sign(got, n, 5, probabilistic=True)
    want = reference_orders(kind, got[0], table, batch, epochs, sign)
    assert got == want


def test_probabilistic_differs_from_deterministic_and_is_seeded():
    n, batch, epochs = 32, 8, 3
    table = grad_table(epochs, n, seed=1)
    runs = []
    for prob, seed in [(False, 0), (True, 0), (True, 0), (True, 1)]:
        s = GraBSampler(range(n), make_params(), "mean", probabilistic=prob, prob_c=0.5, seed=seed)
        runs.append(run_sampler(s, table, batch, epochs)[-1])
    assert runs[1] == runs[2]
    assert runs[0] != runs[1]
    assert runs[1] != runs[3]


@pytest.mark.parametrize("layout", ["one_block", "large_blocks"])
def test_float32_vmap_dict_matches_float64_reference(monkeypatch, layout):
    """float32 gradients; ``large_blocks``: each tensor its own block, the products with
    the stored vectors through oneDNN where torch has it."""
    from grabsampler import _bank, _rows

    if layout == "large_blocks":
        monkeypatch.setattr(_bank, "SMALL_COLS", 0)
        monkeypatch.setattr(_rows, "ONEDNN_COLS", 1)
    n, batch, epochs = 40, 8, 3
    table = grad_table(epochs, n, seed=4)
    sampler = GraBSampler(range(n), make_params(torch.float32), "mean")
    got = run_sampler(sampler, table.float(), batch, epochs)
    want = reference_orders("mean", got[0], table.float().double(), batch, epochs, ref.Sign())
    assert got == want


def test_rr_and_so():
    n = 15
    table = grad_table(3, n)
    rr = run_sampler(GraBSampler(range(n), make_params(), "rr", seed=2), table, 5, 3)
    gen = torch.Generator().manual_seed(2)
    assert rr == [torch.randperm(n, generator=gen).tolist() for _ in range(3)]
    so = run_sampler(GraBSampler(range(n), make_params(), "so", seed=2), table, 5, 3)
    assert so[0] == so[1] == so[2] == rr[0]


def test_no_shuffle_first_epoch_and_aliases():
    s = GraBSampler(range(6), make_params(), "recursive-pair", random_first_epoch=False)
    assert list(iter(s)) == list(range(6))
    assert s.balance_type == "recursive_pair"
    assert len(s) == 6


@pytest.mark.parametrize("kind", ["mean", "pair", "recursive"])
def test_irregular_batch_sizes_match_reference(kind):
    # batch sizes 3, 2, 4, 1, 2, 5, ... exercise pair balance's waiting example
    # together with even and odd batches
    n, epochs = 25, 4
    sizes = [3, 2, 4, 1, 2, 5, 2, 3, 3]
    assert sum(sizes) == n
    table = grad_table(epochs, n, seed=21)
    sampler = GraBSampler(range(n), make_params(), kind, depth=3)
    got = []
    for e in range(epochs):
        order = list(iter(sampler))
        got.append(order)
        start = 0
        for b in sizes:
            sampler.step(as_dict(table[e, order[start : start + b]]))
            start += b
    want = reference_orders(kind, got[0], table, 0, epochs, ref.Sign(), depth=3)
    assert got == want


@pytest.mark.parametrize("small_cols", [0, 4, "split"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("probabilistic", [False, True])
def test_large_block_layouts_match_reference(monkeypatch, small_cols, kind, probabilistic):
    """Tensors above ``SMALL_COLS`` get their own block and host-tracked stored products.

    ``"split"``: the blocks' products are split by columns over 4 threads (with a tail).
    """
    from grabsampler import _bank, _rows

    if small_cols == "split":
        monkeypatch.setattr(_rows, "SPLIT_COLS", 1)
        old = torch.get_num_threads()
        torch.set_num_threads(4)
        small_cols = 0
    else:
        old = None
    monkeypatch.setattr(_bank, "SMALL_COLS", small_cols)
    n, batch, epochs = 23, 5, 4
    table = grad_table(epochs, n, seed=31)
    sampler = GraBSampler(
        range(n), make_params(), kind, depth=3, seed=7, probabilistic=probabilistic, prob_c=2.0
    )
    assert sampler.bank.track and len(sampler.bank.groups) == (3 if small_cols == 0 else 2)
    try:
        got = run_sampler(sampler, table, batch, epochs)
    finally:
        if old is not None:
            torch.set_num_threads(old)
    sign = reference_sign(got, n, 7, probabilistic)
    assert got == reference_orders(kind, got[0], table, batch, epochs, sign, depth=3)


@pytest.mark.parametrize("kind", ["mean", "pair"])
@pytest.mark.parametrize("probabilistic", [False, True])
def test_wide_one_block_fast_path_matches_reference(monkeypatch, kind, probabilistic):
    """One wide small block: one (B + k, B) product, stored products tracked on the host.

    Irregular batch sizes (pair balance's waiting example enters the running
    sum) and a switch to tensor input mid-epoch (general path) included.
    """
    from grabsampler import _bank

    monkeypatch.setattr(_bank, "ONE_PRODUCT_COLS", 0)
    n, epochs = 25, 4
    sizes = [3, 2, 4, 1, 2, 5, 2, 3, 3]
    table = grad_table(epochs, n, seed=41)
    sampler = GraBSampler(
        range(n), make_params(), kind, seed=5, probabilistic=probabilistic, prob_c=2.0
    )
    assert sampler._flat_ok and not sampler.bank.track
    got, tracked = [], 0
    for e in range(epochs):
        order = list(iter(sampler))
        got.append(order)
        start = 0
        for j, b in enumerate(sizes):
            rows = table[e, order[start : start + b]]
            sampler.step(rows if (e, j) == (2, 4) else as_dict(rows))
            tracked += sampler.bank._fss is not None
            start += b
    # the stored products are carried over from batch to batch, not recomputed
    assert tracked >= epochs * (len(sizes) - 2)
    sign = reference_sign(got, n, 5, probabilistic)
    assert got == reference_orders(kind, got[0], table, 0, epochs, sign)


@pytest.mark.parametrize("small_cols", [0, 4])
@pytest.mark.parametrize("chunk", [1 << 19, 6])
def test_pair_differences_path_matches_reference(monkeypatch, small_cols, chunk):
    """Wide blocks, greedy pair balance, even batches: signs from the pair differences.

    Odd batches in between (a waiting example) take the full-matrix path; the
    differences are formed in chunks (``chunk`` workspace entries, with tails),
    the tracked stored products stay those of the stored vectors, and a
    non-finite gradient is reported with the state left unchanged.
    """
    from grabsampler import _bank

    monkeypatch.setattr(_bank, "SMALL_COLS", small_cols)
    monkeypatch.setattr(_bank, "PAIR_ENTRIES", chunk)
    taken = []
    original = _bank.AuxBank.pair_diff_lists

    def counting(self, rows, b):
        out = original(self, rows, b)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(_bank.AuxBank, "pair_diff_lists", counting)
    n, epochs = 25, 4
    sizes = [4, 2, 3, 1, 6, 2, 5, 2]
    table = grad_table(epochs, n, seed=43)
    sampler = GraBSampler(range(n), make_params(), "pair", seed=3)
    assert sampler.bank.track
    got = []
    for e in range(epochs):
        order = list(iter(sampler))
        got.append(order)
        start = 0
        for j, b in enumerate(sizes):
            rows = table[e, order[start : start + b]]
            if (e, j) == (1, 1):
                before = sampler.state_dict()
                bad = rows.clone()
                bad[1, 3] = float("inf")
                with pytest.raises(ValueError, match="non-finite"):
                    sampler.step(as_dict(bad))
                for key in ("position", "epoch"):
                    assert sampler.state_dict()[key] == before[key]
                for a, c in zip(sampler.state_dict()["aux"], before["aux"]):
                    assert torch.equal(a, c)
            sampler.step(as_dict(rows))
            start += b
        # the tracked products of the stored vectors equal recomputed ones
        ss = sampler.bank._ss
        if ss is not None:
            s = torch.cat([blk[0] for blk in sampler.bank.state()])
            assert ss[0][0] == pytest.approx(float(s @ s), rel=1e-9, abs=1e-9)
    assert sum(taken) >= epochs * 3  # the even batches after an even batch
    assert got == reference_orders("pair", got[0], table, 0, epochs, ref.Sign())
