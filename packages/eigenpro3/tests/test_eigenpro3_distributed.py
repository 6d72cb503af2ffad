"""Data-parallel EigenPro3 over torch.distributed (gloo) equals one process."""

from __future__ import annotations

import pytest
import torch

from eigenpro3 import KernelModel
from optcore.testing import spawn


def _setup():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(120, 5, generator=g)
    Y = torch.sin(X[:, :2])
    return X, Y


def _batches(X: torch.Tensor, Y: torch.Tensor, rank: int, world: int):
    out = []
    for s in range(0, len(X), 40):
        xb, yb = X[s : s + 40], Y[s : s + 40]
        out.append((xb[rank::world], yb[rank::world]))
    return out


def _train(rank: int, world: int) -> dict:
    X, Y = _setup()
    model = KernelModel(2, X[:20], "laplacian", X=X, y=Y, bandwidth=2.0, verbose=False)
    assert model.world_size == world
    (loader,) = model.train_loaders
    seen = torch.cat([xb for xb, _ in loader])
    loaders = [_batches(X, Y, rank, world)]  # the same loaders: epoch 2 uses the snapshot
    assert model.correction is not None
    for epoch in range(2):
        if epoch == 1:
            model._begin_epoch(loaders)
            assert model._vr_loaders is not None
        model.fit_epoch(loaders)
    return {
        # plain lists: tensors would travel through shared memory of an exited child
        "weights": model.weights.tolist(),
        "pred": model.predict(X).tolist(),
        "rows": len(seen),
        "lam": model.nystrom.lam_next,
    }


def _distributed_worker(rank: int, world: int) -> dict:
    return _train(rank, world)


@pytest.mark.distributed
def test_two_gloo_processes_equal_one_process() -> None:
    torch.set_num_threads(1)
    single = _train(0, 1)
    results = spawn(2, _distributed_worker)
    assert [r["rows"] for r in results] == [60, 60]
    ref_w, ref_p = torch.tensor(single["weights"]), torch.tensor(single["pred"])
    assert ref_w.abs().max() > 0.1  # the model moved
    for r in results:
        assert r["lam"] == pytest.approx(single["lam"])
        torch.testing.assert_close(torch.tensor(r["weights"]), ref_w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(r["pred"]), ref_p, rtol=1e-5, atol=1e-5)
    assert results[0]["weights"] == results[1]["weights"]
