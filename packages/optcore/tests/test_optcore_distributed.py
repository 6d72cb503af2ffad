import pytest
import torch

from optcore import distributed as D
from optcore.testing import spawn


def test_single_process_defaults():
    assert not D.is_distributed()
    assert D.get_rank() == 0 and D.get_world_size() == 1
    t = torch.tensor([1.0, 2.0])
    D.all_reduce_mean([t])
    assert torch.equal(t, torch.tensor([1.0, 2.0]))
    assert D.broadcast_seed(1234) == 1234
    assert isinstance(D.broadcast_seed(), int)


def test_assign_by_cost_balances_and_is_deterministic():
    costs = [n**3 for n in (512, 10, 512, 256, 256, 64, 8)]
    owner = D.assign_by_cost(costs, 2)
    assert owner == D.assign_by_cost(costs, 2)
    loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(2)]
    # the two 512^3 items go to different ranks, and the split is near even
    assert owner[0] != owner[2]
    assert max(loads) / sum(loads) < 0.55
    assert D.assign_by_cost([1.0, 2.0], 1) == [0, 0]
    with pytest.raises(ValueError, match=r"costs\[1\]"):
        D.assign_by_cost([1.0, -1.0], 2)
    with pytest.raises(ValueError, match="world_size"):
        D.assign_by_cost([1.0], 0)


def _reduce_worker(rank: int, world_size: int, base: float):
    a = torch.full((3,), base * (rank + 1))
    b = torch.arange(4, dtype=torch.float64) * (rank + 1)
    D.all_reduce_mean([a, b])
    seed = D.broadcast_seed(100 + rank)
    t = torch.full((2,), float(rank))
    D.broadcast_tensors([t], src=1)
    owner = D.assign_by_cost([5.0, 3.0, 2.0])
    return a, b.tolist(), seed, t.tolist(), D.get_rank(), D.get_world_size(), owner


@pytest.mark.distributed
def test_all_reduce_mean_two_gloo_processes():
    results = spawn(2, _reduce_worker, 2.0)
    for rank, (a, b, seed, t, r, w, owner) in enumerate(results):
        assert torch.equal(a, torch.full((3,), 3.0))  # mean of 2 and 4; tensors come back
        assert b == [0.0, 1.5, 3.0, 4.5]
        assert seed == 100  # rank 0's
        assert t == [1.0, 1.0]
        assert (r, w) == (rank, 2)
        assert owner == [0, 1, 1]


def _same_worker(rank: int, world_size: int):
    return [
        D.same_on_all_ranks(((3, 4), True)),  # equal everywhere
        D.same_on_all_ranks(("shape", (3, 4 + rank))),  # differs on rank 1
        D.same_on_all_ranks(7 if rank == 0 else 7.0),  # equal values, different repr
    ]


@pytest.mark.distributed
def test_same_on_all_ranks_agrees_on_every_rank():
    assert D.same_on_all_ranks(object())  # no process group: a world of one
    assert spawn(2, _same_worker) == [[True, False, False], [True, False, False]]


def _failing_worker(rank: int, world_size: int):
    if rank == 1:
        raise KeyError("boom on rank 1")
    return rank


@pytest.mark.distributed
def test_spawn_reports_child_failure():
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        spawn(2, _failing_worker, timeout=60)


def test_spawn_rejects_local_function():
    def local(rank, world):
        return rank

    with pytest.raises(ValueError, match="top-level"):
        spawn(2, local)


def test_run_script_returns_stdout_and_reports_failure(tmp_path, monkeypatch):
    from optcore.testing import run_script

    ok = tmp_path / "ok.py"
    ok.write_text(
        "import os, sys\n"
        "print(sys.argv[1:], os.environ.get('OMP_NUM_THREADS'), os.environ.get('GONE'))\n"
    )
    monkeypatch.setenv("GONE", "here")
    assert run_script(ok, "a", "b").strip() == "['a', 'b'] 1 here"
    assert run_script(ok, unset=("GONE",)).strip() == "[] 1 None"
    # a module run: python -m <module> <args> <path>
    (tmp_path / "echo_args.py").write_text("import sys\nprint(sys.argv[1:])\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert run_script(ok, "-x", module="echo_args").strip() == str(["-x", str(ok)])
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nprint('oops', file=sys.stderr)\nsys.exit(3)\n")
    with pytest.raises(AssertionError, match="exited 3:\noops"):
        run_script(bad)
