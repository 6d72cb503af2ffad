"""CD-GraB: two gloo processes agree with a single-process simulation of two workers."""

from __future__ import annotations

import pytest
import torch

from grabsampler import DistributedGraBSampler

N, D, EPOCHS, BATCH = 22, 5, 3, 3


def table():
    g = torch.Generator().manual_seed(123)
    return torch.randn(EPOCHS, N, D, generator=g, dtype=torch.float64) + 0.3


def as_dict(rows):
    return {"w": rows[:, :3].reshape(-1, 3, 1), "b": rows[:, 3:]}


def run_rank(rank, world, n=N, batch=BATCH):
    """Runs one rank; returns its orders per epoch and its final running sum."""
    t = table()
    sampler = DistributedGraBSampler(range(n), seed=9)
    assert (sampler.rank, sampler.num_replicas) == (rank, world)
    orders = []
    for e in range(EPOCHS):
        sampler.set_epoch(e)
        order = list(iter(sampler))
        orders.append(order)
        for s in range(0, len(order), batch):
            sampler.step(as_dict(t[e, order[s : s + batch]]))
    assert sampler.bank is not None
    return orders, [b.tolist() for b in sampler.bank.buffers]  # plain lists pickle safely


def simulate(world, n=N):
    """One-at-a-time CD-GraB with `world` simulated workers in one process."""
    t = table()
    gen = torch.Generator().manual_seed(9)
    perm = torch.randperm(n, generator=gen).tolist()
    per = -(-n // world)
    perm = (perm + perm)[: per * world]
    shards = [perm[r::world] for r in range(world)]
    history = [[list(s)] for s in shards]
    for e in range(EPOCHS - 1):
        s = torch.zeros(D, dtype=torch.float64)
        left = [[] for _ in range(world)]
        right = [[] for _ in range(world)]
        for k in range(0, per - 1, 2):
            for r in range(world):
                a, b = shards[r][k], shards[r][k + 1]
                dv = t[e, a] - t[e, b]
                eps = 1 if float(s @ dv) < 0 else -1
                s = s + eps * dv
                left[r] += [a] if eps > 0 else [b]
                right[r] += [b] if eps > 0 else [a]
        for r in range(world):
            mid = [shards[r][-1]] if per % 2 else []
            shards[r] = left[r] + mid + right[r][::-1]
            history[r].append(list(shards[r]))
    return history


@pytest.mark.distributed
def test_two_gloo_ranks_match_simulation():
    from optcore.testing import spawn

    results = spawn(2, run_rank)
    orders0, sums0 = results[0]
    orders1, sums1 = results[1]
    for o0, o1 in zip(orders0, orders1):
        assert not set(o0) & set(o1)
        assert sorted(o0 + o1) == list(range(N))
    for a, b in zip(sums0, sums1):
        assert a == b  # identical decisions: bitwise identical running sums
    sim = simulate(2)
    assert orders0 == sim[0]
    assert orders1 == sim[1]


def test_single_replica_is_pair_balance_of_the_stream():
    t = table()
    sampler = DistributedGraBSampler(range(N), num_replicas=1, rank=0, seed=9)
    got = []
    for e in range(EPOCHS):
        order = list(iter(sampler))
        got.append(order)
        for s in range(0, N, 4):
            sampler.step(t[e, order[s : s + 4]])
    assert got == simulate(1)[0]


def test_resume_and_errors():
    t = table()

    def make():
        return DistributedGraBSampler(range(N), num_replicas=1, rank=0, seed=9)

    a = make()
    order = list(iter(a))
    for s in range(0, 9, 3):
        a.step(t[0, order[s : s + 3]])
    b = make()
    b.load_state_dict(a.state_dict())
    assert list(iter(b)) == order[9:]
    for sampler in (a, b):
        for s in range(9, N, 3):
            sampler.step(t[0, order[s : s + 3]])
    assert list(iter(a)) == list(iter(b))
    with pytest.raises(ValueError, match="more times"):
        b.step(t[0, : N - 1])
        b.step(t[0, :5])
    with pytest.raises(ValueError, match="rank"):
        DistributedGraBSampler(range(4), num_replicas=2, rank=2)
    with pytest.raises(RuntimeError, match="process group"):
        DistributedGraBSampler(range(4))
    c = DistributedGraBSampler(range(5), num_replicas=2, rank=1, seed=0)
    assert len(c) == 3 and len(list(iter(c))) == 3
    c = DistributedGraBSampler(range(5), num_replicas=2, rank=1, drop_last=True)
    assert len(c) == 2
    c = DistributedGraBSampler(range(4), num_replicas=2, rank=0)
    list(iter(c))
    with pytest.raises(RuntimeError, match="process group"):
        c.step(torch.zeros(2, 3))
