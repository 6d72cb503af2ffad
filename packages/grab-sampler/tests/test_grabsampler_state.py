"""state_dict / resume, partial epochs, drop_last, odd n, and bad input."""

from __future__ import annotations

import io

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from grabsampler import BALANCE_TYPES, GraBSampler

D = 6


def params():
    return {"a": torch.zeros(2, 2, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}


def table(epochs, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(epochs, n, D, generator=g, dtype=torch.float64) + 0.5


def equal_states(s1, s2):
    buf1, buf2 = io.BytesIO(), io.BytesIO()
    torch.save(s1, buf1)
    torch.save(s2, buf2)
    return buf1.getvalue() == buf2.getvalue()


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kind", BALANCE_TYPES)
@pytest.mark.parametrize("prob", [False, True])
def test_resume_mid_epoch_gives_same_orders(kind, prob):
    n, batch, epochs = 21, 4, 4
    t = table(epochs, n)

    def make():
        return GraBSampler(range(n), params(), kind, probabilistic=prob, depth=2, seed=7)

    full = make()
    want = []
    for e in range(epochs):
        order = list(iter(full))
        want.append(order)
        for s in range(0, n, batch):
            full.step(t[e, order[s : s + batch]])

    got = []
    first = make()
    order = list(iter(first))
    got.append(order)
    for s in range(0, n, batch):
        first.step(t[0, order[s : s + batch]])
    order = list(iter(first))
    got.append(order)
    for s in range(0, 12, batch):
        first.step(t[1, order[s : s + batch]])
    state = roundtrip(first.state_dict())

    resumed = make()
    resumed.load_state_dict(state)
    rest = list(iter(resumed))
    assert rest == order[12:]
    for s in range(12, n, batch):
        resumed.step(t[1, order[s : s + batch]])
    for e in range(2, epochs):
        order = list(iter(resumed))
        got.append(order)
        for s in range(0, n, batch):
            resumed.step(t[e, order[s : s + batch]])
    assert got == want


@pytest.mark.parametrize("kind", BALANCE_TYPES)
def test_partial_epoch_then_next_epoch_is_a_permutation(kind):
    n = 13
    t = table(3, n)
    s = GraBSampler(range(n), params(), kind, depth=2)
    order = list(iter(s))
    s.step(t[0, order[:5]])  # epoch broken off after 5 examples
    nxt = list(iter(s))
    assert sorted(nxt) == list(range(n))
    for i in range(0, n, 3):
        s.step(t[1, nxt[i : i + 3]])
    assert sorted(iter(s)) == list(range(n))


def test_partial_epoch_keeps_unvisited_in_the_middle_for_mean():
    n = 10
    s = GraBSampler(range(n), params(), "mean", random_first_epoch=False)
    list(iter(s))
    s.step(torch.ones(4, D, dtype=torch.float64))
    nxt = list(iter(s))
    # signs of identical vectors alternate: -, +, -, + (first is -, as <0, c> = 0)
    assert nxt[:2] == [1, 3]
    assert nxt[2:8] == [4, 5, 6, 7, 8, 9]
    assert nxt[8:] == [2, 0]


@pytest.mark.parametrize("kind", ["mean", "pair", "recursive_pair"])
def test_dataloader_drop_last_and_odd_n(kind):
    n = 11
    x = torch.randn(n, D, dtype=torch.float64)
    ds = TensorDataset(x, torch.arange(n))
    s = GraBSampler(ds, params(), kind)
    loader = DataLoader(ds, batch_size=4, sampler=s, drop_last=True)
    for _ in range(3):
        seen = []
        for xb, ib in loader:
            seen += ib.tolist()
            s.step(xb * (1 + ib[:, None].double()))
        assert len(seen) == 8
        assert sorted(s.order) == list(range(n))


def test_bad_input_errors_leave_state_unchanged():
    n = 8
    s = GraBSampler(range(n), params(), "mean")
    with pytest.raises(RuntimeError, match="iterate"):
        s.step(torch.zeros(2, D, dtype=torch.float64))
    order = list(iter(s))
    s.step(torch.randn(4, D, dtype=torch.float64))
    before = s.state_dict()
    bad = [
        (torch.zeros(2, D + 1, dtype=torch.float64), ValueError, "d = 6"),
        ({"a": torch.zeros(2, 2, 2)}, ValueError, "d = 6"),
        ([torch.zeros(2, 4), torch.zeros(3, 2)], ValueError, "batch size"),
        (torch.zeros(9, D, dtype=torch.float64), ValueError, "larger than the data"),
        (torch.zeros(5, D, dtype=torch.float64), ValueError, "more times"),
        (torch.full((2, D), float("nan"), dtype=torch.float64), ValueError, "non-finite"),
        (torch.tensor([[float("inf")] + [0.0] * 5], dtype=torch.float64), ValueError, "non-finite"),
        ("grads", TypeError, "per_sample_grads"),
        ([1, 2], TypeError, "tensors"),
        ([torch.zeros(2, 2)], ValueError, "d = 6"),
    ]
    for arg, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            s.step(arg)
        assert equal_states(before, s.state_dict())
    # training continues normally after the errors
    s.step(torch.randn(4, D, dtype=torch.float64))
    assert sorted(iter(s)) == sorted(order)


def test_rr_also_rejects_nonfinite_and_oversized():
    s = GraBSampler(range(4), params(), "rr")
    list(iter(s))
    with pytest.raises(ValueError, match="non-finite"):
        s.step(torch.full((2, D), float("inf"), dtype=torch.float64))
    with pytest.raises(ValueError, match="larger"):
        s.step(torch.zeros(5, D, dtype=torch.float64))
    assert s.position == 0


def test_constructor_and_load_errors():
    with pytest.raises(ValueError, match="balance_type"):
        GraBSampler(range(4), params(), "nope")
    with pytest.raises(ValueError, match="empty"):
        GraBSampler([], params())
    with pytest.raises(ValueError, match="empty"):
        GraBSampler(range(3), {})
    with pytest.raises(TypeError, match="trainable_params"):
        GraBSampler(range(3), 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prob_c"):
        GraBSampler(range(3), params(), probabilistic=True, prob_c=0.0)
    with pytest.raises(TypeError, match="unexpected"):
        GraBSampler(range(3), params(), bogus=1)
    compat = GraBSampler(range(3), params(), prob_balance=True, prob_balance_c=5.0, batch_size=4)
    assert compat.decider.probabilistic and compat.decider.c == 5.0 and compat.decider.normalize
    a = GraBSampler(range(4), params(), "mean")
    with pytest.raises(ValueError, match="balance_type"):
        GraBSampler(range(4), params(), "pair").load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="n is"):
        GraBSampler(range(5), params(), "mean").load_state_dict(a.state_dict())


def test_state_dict_holds_only_tensors_and_plain_values():
    s = GraBSampler(range(6), params(), "recursive", depth=2)
    list(iter(s))
    s.step(torch.randn(3, D, dtype=torch.float64))

    def check(v):
        if isinstance(v, dict):
            for x in v.values():
                check(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                check(x)
        else:
            assert isinstance(v, (torch.Tensor, int, float, bool, str)), type(v)

    check(s.state_dict())


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["mean", "pair", "recursive_pair"])
def test_cuda_orders_equal_cpu_orders(kind):
    n, batch = 40, 8
    t = table(3, n)
    orders = []
    for device in ["cpu", "cuda"]:
        p = {k: v.to(device) for k, v in params().items()}
        s = GraBSampler(range(n), p, kind, seed=1)
        run = []
        for e in range(3):
            order = list(iter(s))
            run.append(order)
            for i in range(0, n, batch):
                s.step(t[e, order[i : i + batch]].to(device))
        orders.append(run)
    assert orders[0] == orders[1]


@pytest.mark.parametrize("kind", ["mean", "pair"])
def test_step_allocates_only_order_d_memory(kind):
    """No (B, d) concatenation: every allocation during step() is at most a few d-vectors."""
    d_big = 1 << 18
    p = {"big": torch.zeros(d_big), "small": torch.zeros(10)}
    s = GraBSampler(range(64), p, kind)
    list(iter(s))
    g = {"big": torch.randn(16, d_big), "small": torch.randn(16, 10)}
    s.step(g)
    with torch.profiler.profile(profile_memory=True) as prof:
        s.step(g)
    largest = max(e.cpu_memory_usage for e in prof.events())
    per_example = 4 * (d_big + 10)
    assert largest <= 3 * per_example, largest  # a (B, d) copy would be 16 per_example
