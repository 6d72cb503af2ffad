"""``psgd.Kron``: kron-torch compatibility, layouts, determinism, state round-trip, cache."""

from __future__ import annotations

import inspect
import io
import math
from typing import Any

import pytest
import torch

import psgd
from psgd import factors as F
from psgd.schedule import should_update


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _train(
    opt: torch.optim.Optimizer, model: torch.nn.Module, steps: int, seed: int = 1
) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        y = torch.sin(x[:, :2])
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_signature_matches_kron_torch_defaults() -> None:
    sig = inspect.signature(psgd.Kron)
    expected = {
        "lr": 0.0003,
        "b1": 0.9,
        "weight_decay": 0.0,
        "preconditioner_update_probability": None,
        "max_size_triangular": 8192,
        "min_ndim_triangular": 2,
        "max_skew_triangular": math.inf,
        "memory_save_mode": None,
        "momentum_into_precond_update": True,
        "precond_lr": 0.1,
        "precond_init_scale": None,
        "mu_dtype": None,
        "precond_dtype": None,
    }
    for name, value in expected.items():
        assert sig.parameters[name].default == value, name
    kron_torch = pytest.importorskip("kron_torch")
    theirs = inspect.signature(kron_torch.Kron)
    for name in (
        "lr",
        "b1",
        "weight_decay",
        "max_size_triangular",
        "min_ndim_triangular",
        "precond_lr",
    ):
        assert sig.parameters[name].default == theirs.parameters[name].default, name


def test_update_schedule_matches_kron_torch_counter() -> None:
    """Same float32 arithmetic as kron-torch: 1.0 for 500 steps, then down to 0.03."""
    sched = psgd.precond_update_prob_schedule()
    counter, updates = 0, []
    for n in range(6000):
        prob = sched(n)
        ref_counter = counter + 1
        ref = bool(torch.tensor(ref_counter, dtype=torch.int32) >= 1 / prob)
        do, counter = should_update(None, n, counter)
        assert do == ref
        updates.append(do)
    assert all(updates[:500])
    assert float(sched(0)) == 1.0 and abs(float(sched(10**6)) - 0.03) < 1e-7
    late = sum(updates[5000:6000])
    assert 30 <= late <= 35  # about 1 in 33


def test_deterministic_from_manual_seed() -> None:
    runs = []
    for _ in range(2):
        model = _model()
        torch.manual_seed(123)
        opt = psgd.Kron(model.parameters(), lr=0.01)
        _train(opt, model, 5)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("geometry", list(psgd.GEOMETRIES))
def test_loss_decreases_for_every_geometry(geometry: str) -> None:
    model = _model()
    opt = psgd.Kron(model.parameters(), lr=0.01, geometry=geometry)
    losses = _train(opt, model, 60)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


def test_zero_and_one_dim_parameters() -> None:
    scalar = torch.nn.Parameter(torch.tensor(3.0))
    vec = torch.nn.Parameter(torch.full((4,), 2.0))
    opt = psgd.Kron([scalar, vec], lr=0.05, preconditioner_update_probability=1.0)
    for _ in range(200):
        opt.zero_grad()
        loss = scalar**2 + (vec**2).sum()
        loss.backward()
        opt.step()
    assert abs(float(scalar.detach())) < 0.3 and float(vec.detach().abs().max()) < 0.3
    assert opt.state[scalar]["Q0"].shape == (1,)  # a scalar is a diagonal factor of size 1
    assert opt.state[vec]["Q0"].shape == (4,)  # 1-dim: diagonal (min_ndim_triangular=2)


@pytest.mark.parametrize(
    ("shape", "kwargs", "dense"),
    [
        ((8, 6), {}, (True, True)),
        ((8, 6), {"memory_save_mode": "one_diag"}, (False, True)),
        ((8, 6), {"memory_save_mode": "smart_one_diag"}, (False, True)),
        ((6, 6), {"memory_save_mode": "smart_one_diag"}, (True, True)),
        ((8, 6), {"memory_save_mode": "all_diag"}, (False, False)),
        ((8, 6), {"max_size_triangular": 7}, (False, True)),
        ((40, 2), {"max_skew_triangular": 10}, (False, True)),
        ((1, 6), {}, (False, True)),
        ((6,), {"min_ndim_triangular": 1}, (True,)),
    ],
)
def test_dense_or_diagonal_choice(shape, kwargs, dense) -> None:
    p = torch.nn.Parameter(torch.randn(shape))
    opt = psgd.Kron([p], **kwargs)
    p.grad = torch.randn(shape)
    opt.step()
    got = tuple(opt.state[p][f"Q{i}"].dim() == 2 for i in range(len(shape)))
    assert got == dense


def test_dimension_merging() -> None:
    assert F.merged_shape((4, 3, 5), True) == (12, 5)
    assert F.merged_shape((5, 3, 4), True) == (15, 4)  # kron-torch: first if diff <= diff
    assert F.merged_shape((2, 3, 40), True) == (6, 40)
    assert F.merged_shape((4, 3, 5), False) == (4, 3, 5)
    assert F.merged_shape((), True) == (1,)
    p = torch.nn.Parameter(torch.randn(4, 3, 5))
    opt = psgd.Kron([p], lr=0.01)
    p.grad = torch.randn(4, 3, 5)
    opt.step()
    assert opt.state[p]["Q0"].shape == (12, 12) and opt.state[p]["Q1"].shape == (5, 5)
    q = torch.nn.Parameter(torch.randn(4, 3, 5))
    opt2 = psgd.Kron([q], lr=0.01, merge_dims=False)
    q.grad = torch.randn(4, 3, 5)
    opt2.step()
    assert [opt2.state[q][f"Q{i}"].shape[0] for i in range(3)] == [4, 3, 5]


def test_state_dict_round_trip_is_bit_identical() -> None:
    model = _model()
    opt = psgd.Kron(model.parameters(), lr=0.01, preconditioner_update_probability=0.5)
    _train(opt, model, 7)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    cont = _train(opt, model, 9, seed=5)
    final = [p.detach().clone() for p in model.parameters()]

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = _model(seed=99)
    model2.load_state_dict(saved["model"])
    opt2 = psgd.Kron(model2.parameters(), lr=0.01, preconditioner_update_probability=0.5)
    opt2.load_state_dict(saved["opt"])
    cont2 = _train(opt2, model2, 9, seed=5)
    assert cont == cont2
    for a, b in zip(final, model2.parameters()):
        assert torch.equal(a, b.detach())


def test_default_schedule_state_round_trip() -> None:
    model = _model()
    opt = psgd.Kron(model.parameters(), lr=0.01)
    _train(opt, model, 3)
    sd = opt.state_dict()
    assert int(sd["psgd"]["prob_step"]) == 3
    for st in sd["state"].values():
        assert all(isinstance(v, torch.Tensor) for v in st.values())


def test_cached_preconditioner_equals_q_transpose_q() -> None:
    """The cached P_i equals Q_i^H Q_i; for EQ, Cholesky of P recovers the triangular Q."""
    for geometry in ("QEP", "QEQ", "Q0.5EQ1.5"):
        p = torch.nn.Parameter(torch.randn(5, 4))
        opt = psgd.Kron([p], lr=0.01, geometry=geometry, preconditioner_update_probability=1.0)
        for _ in range(5):
            p.grad = torch.randn(5, 4)
            opt.step()
        for i in range(2):
            q, cache = opt.state[p][f"Q{i}"], opt.state[p][f"P{i}"]
            assert torch.allclose(cache, q.mH @ q, atol=1e-6)
    p = torch.nn.Parameter(torch.randn(5, 4))
    opt = psgd.Kron(
        [p], lr=0.01, geometry="EQ", preconditioner_update_probability=1.0, fast_fit=True
    )
    for _ in range(5):
        p.grad = torch.randn(5, 4)
        opt.step()
    # after update steps the state holds the triangular Q_i (P_i is formed lazily) ...
    q = opt.state[p]["Q0"].clone()
    assert torch.equal(q, torch.triu(q)) and bool(torch.all(q.diagonal() > 0))
    # ... and the state dict (as any non-update step) holds P_i = Q_i^T Q_i
    stored = opt.state_dict()["state"][0]["Q0"]
    assert torch.allclose(stored, q.mT @ q, rtol=1e-6, atol=1e-7)
    assert torch.allclose(stored, stored.mT)  # P is symmetric
    assert bool(torch.all(torch.linalg.eigvalsh(stored) > 0))
    torch.testing.assert_close(torch.linalg.cholesky(stored, upper=True), q)


def test_non_update_step_applies_p_with_two_products() -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
    opt = psgd.Kron([p], lr=1.0, b1=0.0, preconditioner_update_probability=1.0)
    for _ in range(3):
        p.grad = torch.randn(5, 4, dtype=torch.float64)
        opt.step()
    opt.param_groups[0]["preconditioner_update_probability"] = 0.0
    p0, p1 = opt.state[p]["Q0"], opt.state[p]["Q1"]
    g = torch.randn(5, 4, dtype=torch.float64) * 1e-4  # small: the RMS clip (1.1) is inactive
    before = p.detach().clone()
    p.grad = g
    opt.step()
    expected = p0 @ g @ p1.mT
    assert torch.allclose(before - p.detach(), expected, rtol=1e-8, atol=1e-14)


def test_state_bytes_not_more_than_kron_torch() -> None:
    kron_torch = pytest.importorskip("kron_torch")
    model_a, model_b = _model(), _model()
    ours = psgd.Kron(model_a.parameters(), lr=0.01)
    theirs = kron_torch.Kron(model_b.parameters(), lr=0.01)
    _train(ours, model_a, 1)
    _train(theirs, model_b, 1)

    def nbytes(opt, skip=()):
        return sum(
            v.numel() * v.element_size()
            for st in opt.state.values()
            for k, v in st.items()
            if isinstance(v, torch.Tensor) and k not in skip
        ) + sum(
            t.numel() * t.element_size()
            for st in opt.state.values()
            for v in st.values()
            if isinstance(v, list)
            for t in v
            if isinstance(t, torch.Tensor)
        )

    # per-tensor step counters (4 bytes each) aside, the buffers are the same size
    assert nbytes(ours, skip=("step",)) <= nbytes(theirs)


def test_complex_parameters() -> None:
    torch.manual_seed(0)
    target = torch.randn(4, 3, dtype=torch.complex64)
    p = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.complex64))
    opt = psgd.Kron([p], lr=0.05, preconditioner_update_probability=1.0)
    for _ in range(150):
        opt.zero_grad()
        loss = (p - target).abs().pow(2).sum()
        loss.backward()
        opt.step()
    assert float((p.detach() - target).abs().max()) < 0.3


def test_bfloat16_preconditioner() -> None:
    model = _model()
    opt = psgd.Kron(model.parameters(), lr=0.01, precond_dtype=torch.bfloat16)
    losses = _train(opt, model, 60)
    assert opt.state[model[0].weight]["Q0"].dtype == torch.bfloat16
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


def test_lr_scheduler_and_closure() -> None:
    model = _model()
    opt = psgd.Kron(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x = torch.randn(8, 6)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)


def test_compile_switch_is_checked() -> None:
    w = torch.nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(TypeError, match="compile"):
        psgd.Kron([w], compile="yes")  # type: ignore[arg-type]


@pytest.mark.slow
def test_compiled_kron_matches_eager() -> None:
    """``compile=True`` (torch.compile of the application) gives the eager parameters."""
    results = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
        opt = psgd.Kron(model.parameters(), lr=0.01, compile=flag)
        gen = torch.Generator().manual_seed(3)
        for _ in range(6):
            x = torch.randn(16, 5, generator=gen)
            opt.zero_grad()
            (model(x) ** 2).mean().backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_constant_probability_decision_is_float32_arithmetic() -> None:
    """The host-float path for a constant probability decides as float32 tensors do."""
    gen = torch.Generator().manual_seed(0)
    probs = [0.03, 1.0, 0.5, 1 / 3, 0.1, 0.07, 1e-7, 0.999999]
    probs += torch.rand(300, generator=gen, dtype=torch.float64).tolist()
    for prob in probs:
        p32 = torch.tensor(prob, dtype=torch.float32)
        for counter in [0, 1, 2, 9, 32, 33, 34, 99, 10**6, 2**24 + 2]:
            ref = bool(torch.tensor(counter + 1, dtype=torch.float32) >= 1.0 / p32)
            assert should_update(prob, 0, counter) == (ref, 0 if ref else counter + 1)
    assert should_update(0.0, 0, 5) == (False, 6)


def _mixed_params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(3)
    shapes = [(5, 4), (3, 2, 4), (4,), (), (6, 1)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _synchronised_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every non-update step take the accelerator-style path (one host sync for all
    gradient checks, one for all norms) instead of the per-parameter CPU path."""
    build = psgd.Kron._build_plan

    def build_sync(self: psgd.Kron) -> Any:
        plan = build(self)
        self._plan_cpu = False
        return plan

    monkeypatch.setattr(psgd.Kron, "_build_plan", build_sync)


@pytest.mark.parametrize("sync", [False, True], ids=["per-parameter", "synchronised"])
def test_non_update_steps_match_the_general_path(
    sync: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cached non-update path gives bit-identical results to the general step."""
    if sync:
        _synchronised_plan(monkeypatch)
    runs = []
    for fast in (True, False):
        params = _mixed_params()
        extra = torch.nn.Parameter(torch.ones(3, 3))
        torch.manual_seed(0)
        opt = psgd.Kron(
            params[:4], lr=0.05, weight_decay=0.1, preconditioner_update_probability=0.3
        )
        if not fast:
            opt._plain_step = lambda: False  # type: ignore[method-assign]
        gen = torch.Generator().manual_seed(1)
        for t in range(40):
            if t == 15:
                opt.add_param_group({"params": [extra], "lr": 0.02, "b1": 0.5})
            if t == 25:
                opt.add_param_group({"params": [params[4]]})
            everything = params + ([extra] if t >= 15 else [])
            for k, p in enumerate(everything):
                skip = (t % 4 == 1 and k == 2) or (t < 20 and p is params[4])
                p.grad = None if skip else torch.randn(p.shape, generator=gen)
            opt.step()
        runs.append(([p.detach().clone() for p in [*params, extra]], opt.state_dict()))
    (pa, sa), (pb, sb) = runs
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
    for key, st in sa["state"].items():
        for name, value in st.items():
            assert torch.equal(value, sb["state"][key][name]), name


@pytest.mark.parametrize("sync", [False, True], ids=["per-parameter", "synchronised"])
def test_non_finite_gradient_on_a_non_update_step(
    sync: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if sync:
        _synchronised_plan(monkeypatch)
    params = _mixed_params()[:3]
    opt = psgd.Kron(params, lr=0.05, preconditioner_update_probability=1.0)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
    opt.param_groups[0]["preconditioner_update_probability"] = 0.0
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()  # a non-update step builds the cached plan
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    for p in params:
        p.grad = torch.randn(p.shape)
    params[1].grad[0, 1, 2] = math.inf
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert torch.equal(params[1].detach(), before[1])
    for k, v in state[1].items():
        assert torch.equal(opt.state[params[1]][k], v), k
    for i in (0, 2):  # the others still moved, their step counters too
        assert not torch.equal(params[i].detach(), before[i])
        assert int(opt.state[params[i]]["step"]) == int(state[i]["step"]) + 1


def test_finite_gradient_whose_sum_overflows_is_not_skipped() -> None:
    """The one-sum finiteness check falls back to the exact check when the sum overflows."""
    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt = psgd.Kron([p], lr=1e-40, preconditioner_update_probability=0.0)
    p.grad = torch.full((4, 4), 3e38)  # finite, but the sum is inf
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # initialises the state (general path)
        p.grad = torch.full((4, 4), 3e38)
        opt.step()  # non-update path
    assert int(opt.state[p]["step"]) == 2


def _stack_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for _ in range(4):
        layers += [torch.nn.Linear(12, 12), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(12, 3))


def _train_stack(opt: torch.optim.Optimizer, model: torch.nn.Module, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 12, generator=gen)
        opt.zero_grad()
        ((model(x)[:, :3] - torch.sin(x[:, :3])) ** 2).mean().backward()
        opt.step()


@pytest.mark.parametrize("geometry", ["EQ", "QEQ", "QUAD"])
def test_same_shaped_parameters_batched_match_unbatched(geometry: str) -> None:
    """Equal-shaped layers are applied with one bmm; the result matches the per-parameter loop."""
    runs = []
    for batch in (True, False):
        model = _stack_model()
        opt = psgd.Kron(
            model.parameters(),
            lr=0.02,
            weight_decay=0.01,
            preconditioner_update_probability=0.3,
            geometry=geometry,
            batch_same_shape=batch,
        )
        _train_stack(opt, model, 30, seed=3)
        if batch:  # the four 12x12 weights and the four biases form two batches
            batches = {id(e.batch) for e in opt._plan if e.batch is not None}
            assert len(batches) == 2
            weights = [opt.state[m.weight]["momentum_buffer"] for m in list(model)[:8:2]]
            assert weights[0]._base is not None and weights[0]._base.shape == (4, 12, 12)
        runs.append((model, opt))
    (ma, oa), (mb, ob) = runs
    for a, b in zip(ma.parameters(), mb.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].keys() == sb[key].keys()
        for name in sa[key]:
            assert sa[key][name].shape == sb[key][name].shape, name
            assert torch.allclose(sa[key][name], sb[key][name], rtol=1e-4, atol=1e-6), name


def test_batched_state_round_trip_is_bit_identical() -> None:
    model = _stack_model()
    kw = dict(lr=0.02, preconditioner_update_probability=0.3, batch_same_shape=True)
    opt = psgd.Kron(model.parameters(), **kw)
    _train_stack(opt, model, 12, seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train_stack(opt, model, 15, seed=2)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = _stack_model(seed=7)
    model2.load_state_dict(saved["model"])
    opt2 = psgd.Kron(model2.parameters(), **kw)
    opt2.load_state_dict(saved["opt"])
    _train_stack(opt2, model2, 15, seed=2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert any(e.batch is not None for e in opt._plan or opt._build_plan() or [])
    # one stacked buffer per batch: the state holds as many bytes as unbatched
    storages = {
        v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
        for st in opt.state.values()
        for v in st.values()
    }
    plain = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values())
    assert sum(storages.values()) == plain


def test_batch_switch_is_checked() -> None:
    with pytest.raises(TypeError, match="batch_same_shape"):
        psgd.Kron([torch.nn.Parameter(torch.ones(2))], batch_same_shape=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fast_fit"):
        psgd.Kron([torch.nn.Parameter(torch.ones(2))], fast_fit=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fast_fit"):
        psgd.Kron([torch.nn.Parameter(torch.ones(2))], geometry="QUAD", fast_fit=True)
    # default: accelerators only (on CPU torch.bmm measured slower than a loop of mm)
    model = _stack_model()
    opt = psgd.Kron(model.parameters(), lr=0.02, preconditioner_update_probability=0.3)
    _train_stack(opt, model, 8, seed=1)
    plan = opt._plan or opt._build_plan()
    assert plan and all(e.batch is None for e in plan)


@pytest.mark.parametrize("blocks", [False, True])
def test_lazy_p_refresh_matches_eager(blocks: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeping Q_i after update steps (P_i formed only when needed) == forming P_i every time."""
    if blocks:  # block products at these small sizes too
        import psgd._linalg as L

        monkeypatch.setattr(L, "_BLOCK", 3)
    runs = []
    for lazy in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(6, 17), torch.nn.Tanh(), torch.nn.Linear(17, 2)
        ).double()
        # updates (Q_i kept), an update that forms P_i (a non-update step follows), both
        # kinds of step, then updates again
        opt = psgd.Kron(
            model.parameters(),
            lr=0.02,
            preconditioner_update_probability=lambda n: 1.0 if n <= 20 or n >= 36 else 0.4,
            geometry="EQ",
            fast_fit=lazy,
        )
        gen = torch.Generator().manual_seed(4)
        for _ in range(40):
            x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
            opt.zero_grad()
            ((model(x) - torch.sin(x[:, :2])) ** 2).mean().backward()
            opt.step()
        if lazy:
            assert opt._q_form  # the last step was an update: Q_i kept
        runs.append((model, opt.state_dict()))
    (ma, sa), (mb, sb) = runs
    for a, b in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for key, st in sa["state"].items():
        for name, value in st.items():
            torch.testing.assert_close(value, sb["state"][key][name], rtol=1e-9, atol=1e-11)
