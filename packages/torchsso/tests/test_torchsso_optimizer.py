"""SecondOrderOptimizer as a torch.optim.Optimizer: state, schedulers, options, bad input."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchsso import SecondOrderOptimizer
from torchsso._testing import ce_closure, preconditioned_gradient

CONFIGS = [
    ("Fisher", {"Linear": "Kron"}, {}),
    ("Cov", {"Linear": "Kron"}, {"ema_decay": 0.5}),
    ("GaussNewton", {"Linear": "Kron"}, {"inverse_method": "eigh"}),
    ("Fisher", {"Linear": "Diag"}, {"num_mc": 2}),
    ("Cov", {"Linear": "Full"}, {}),
    ("Fisher", {"Conv2d": "Kron", "Linear": "Kron", "BatchNorm2d": "Unit"}, {}),
    ("Cov", {"Conv2d": "Diag", "Linear": "Diag", "BatchNorm2d": "Diag"}, {}),
]
IDS = [f"{c}-{'-'.join(s.values())}-{i}" for i, (c, s, _) in enumerate(CONFIGS)]


def _mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


def _cnn():
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 4),
    )


def _data(conv, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g) if conv else torch.randn(n, 6, generator=g)
    return x, torch.randint(0, 4, (n,), generator=g)


def _make(cfg, **kw):
    ct, shapes, ck = cfg
    conv = "Conv2d" in shapes
    torch.manual_seed(0)
    model = _cnn() if conv else _mlp()
    opt = SecondOrderOptimizer(
        model, ct, shapes, {"damping": 1e-2, **ck}, lr=0.05, momentum=0.9, **kw
    )
    return model, opt, conv


def _train(model, opt, conv, steps, start=0):
    losses = []
    for s in range(start, start + steps):
        x, y = _data(conv, seed=s)

        closure = ce_closure(opt, model, x, y)

        losses.append(float(opt.step(closure)))
    return losses


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_state_dict_round_trip_bit_identical(cfg):
    m1, o1, conv = _make(cfg, curv_interval=3)
    _train(m1, o1, conv, 20)
    m2, o2, _ = _make(cfg, curv_interval=3)
    _train(m2, o2, conv, 10)
    sd_model = copy.deepcopy(m2.state_dict())
    sd_opt = copy.deepcopy(o2.state_dict())
    for v in sd_opt["state"].values():
        for val in v.values():
            assert isinstance(val, (torch.Tensor, int, float))
    m3, o3, _ = _make(cfg, curv_interval=3)
    m3.load_state_dict(sd_model)
    o3.load_state_dict(sd_opt)
    _train(m3, o3, conv, 10, start=10)
    for p1, p3 in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(p1, p3)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_training_reduces_loss(cfg):
    model, opt, conv = _make(cfg)
    x, y = _data(conv, n=64)
    before = float(F.cross_entropy(model(x), y).detach())

    closure = ce_closure(opt, model, x, y)

    for _ in range(15):
        opt.step(closure)
    after = float(F.cross_entropy(model(x), y).detach())
    assert after < 0.8 * before
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_lr_scheduler_and_param_groups():
    model, opt, conv = _make(CONFIGS[0])
    assert len(opt.param_groups) == 2  # one group per layer block
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(4):
        _train(model, opt, conv, 1)
        sched.step()
    assert all(g["lr"] == pytest.approx(0.05 * 0.25) for g in opt.param_groups)


def test_lr_zero_leaves_parameters_and_per_group_lr():
    model, opt, conv = _make(CONFIGS[0])
    opt.param_groups[0]["lr"] = 0.0
    w0 = model[0].weight.clone()
    w2 = model[2].weight.clone()
    _train(model, opt, conv, 2)
    assert torch.equal(model[0].weight, w0)
    assert not torch.equal(model[2].weight, w2)


def test_acc_steps_equals_one_big_batch():
    x, y = _data(False, n=16)
    ms, os_ = [], []
    for acc in (1, 2):
        torch.manual_seed(0)
        m = _mlp()
        ms.append(m)
        os_.append(SecondOrderOptimizer(m, "Cov", "Kron", {"damping": 1e-2}, lr=0.1, acc_steps=acc))
    for _ in range(3):
        calls = iter([(x[:8], y[:8]), (x[8:], y[8:])] * 10)

        def c_full():
            os_[0].zero_grad()
            out = ms[0](x)
            loss = F.cross_entropy(out, y)
            loss.backward()
            return loss, out

        def c_half(calls=calls):
            xb, yb = next(calls)
            os_[1].zero_grad()
            out = ms[1](xb)
            loss = F.cross_entropy(out, yb)
            loss.backward()
            return loss, out

        l1 = os_[0].step(c_full)
        l2 = os_[1].step(c_half)
        torch.testing.assert_close(l1, l2)
    for p1, p2 in zip(ms[0].parameters(), ms[1].parameters()):
        torch.testing.assert_close(p1, p2)


def test_curvature_and_inverse_intervals():
    model, opt, conv = _make(CONFIGS[1], curv_interval=3, inv_interval=lambda s: s % 6 == 0)
    st = opt.state[opt.blocks[0].params[0]]
    seen_curv, seen_inv = [], []
    for i in range(7):
        _train(model, opt, conv, 1, start=i)
        seen_curv.append(st["curv_G"].clone())
        seen_inv.append(st["inv_A_inv"].clone())
    changed = [not torch.equal(seen_curv[i], seen_curv[i - 1]) for i in range(1, 7)]
    assert changed == [False, False, True, False, False, True]
    changed_inv = [not torch.equal(seen_inv[i], seen_inv[i - 1]) for i in range(1, 7)]
    assert changed_inv == [False, False, False, False, False, True]


def test_damping_schedule_and_kl_clip():
    torch.manual_seed(0)
    m = _mlp()
    x, y = _data(False)
    lr, clip = 10.0, 1e-4
    opt = SecondOrderOptimizer(
        m, "Cov", "Kron", {"damping": lambda s: 1.0 / (s + 1)}, lr=lr, kl_clip=clip
    )
    assert opt.current_damping(3) == pytest.approx(0.25)
    before = [p.detach().clone() for p in m.parameters()]

    closure = ce_closure(opt, m, x, y)

    opt.step(closure)
    us, ug = preconditioned_gradient(opt)
    assert lr**2 * ug > clip  # the clip is active
    nu = (clip / (lr**2 * ug)) ** 0.5
    for b0, p, u in zip(before, m.parameters(), us):
        torch.testing.assert_close(p.detach(), b0 - lr * nu * u, rtol=1e-4, atol=1e-6)


def test_kl_clip_scales_the_preconditioned_gradient_before_momentum():
    torch.manual_seed(0)
    m = _mlp()
    lr, clip, mom, wd = 10.0, 1e-4, 0.9, 1e-2
    opt = SecondOrderOptimizer(
        m, "Cov", "Kron", {"damping": 1e-2}, lr=lr, kl_clip=clip, momentum=mom, weight_decay=wd
    )
    bufs = [torch.zeros_like(p) for p in m.parameters()]
    for s in range(3):
        x, y = _data(False, seed=s)
        before = [p.detach().clone() for p in m.parameters()]

        closure = ce_closure(opt, m, x, y)

        opt.step(closure)
        us, ug = preconditioned_gradient(opt)
        assert lr**2 * ug > clip  # the clip is active on every step
        nu = (clip / (lr**2 * ug)) ** 0.5
        for i, (b0, p, u) in enumerate(zip(before, m.parameters(), us)):
            bufs[i] = mom * bufs[i] + nu * u  # momentum accumulates the clipped direction
            torch.testing.assert_close(
                p.detach(), b0 - lr * (bufs[i] + wd * b0), rtol=1e-4, atol=1e-6
            )


def test_modules_with_relu_maxpool_nesting_and_weight_sharing():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 6), nn.ReLU(inplace=True))
            self.head = nn.Linear(6, 4)

        def forward(self, x):
            return self.head(self.body(self.body(x)))  # body used twice (shared weights)

    torch.manual_seed(0)
    m = Net()
    opt = SecondOrderOptimizer(m, "Fisher", "Kron", {"damping": 1e-2}, lr=0.1)
    x, y = _data(False, n=32)

    closure = ce_closure(opt, m, x, y)

    l0 = float(opt.step(closure).detach())
    for _ in range(10):
        opt.step(closure)
    with torch.no_grad():
        assert float(F.cross_entropy(m(x), y)) < l0


def test_unsupported_layer_warns_once_and_trains():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(6))

        def forward(self, x):
            return x * self.scale

    torch.manual_seed(0)
    m = nn.Sequential(Odd(), nn.Linear(6, 4))
    with pytest.warns(UserWarning, match="Odd"):
        SecondOrderOptimizer(m, "Cov", "Kron", lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = SecondOrderOptimizer(m, "Cov", "Kron", {"damping": 1e-2}, lr=0.1)
    assert opt.blocks[0].shape == "Diag"
    x, y = _data(False)

    closure = ce_closure(opt, m, x, y)

    for _ in range(3):
        opt.step(closure)
    assert opt.state[opt.blocks[0].params[0]]["curv_diag"].shape == (6,)


# ---------------------------------------------------------------- bad input
def test_bad_arguments():
    m = _mlp()
    with pytest.raises(ValueError, match="curv_type"):
        SecondOrderOptimizer(m, "Newton", "Kron")
    with pytest.raises(ValueError, match="curv_shapes"):
        SecondOrderOptimizer(m, "Fisher", {"Linear": "Block"})
    with pytest.raises(TypeError, match="curv_shapes"):
        SecondOrderOptimizer(m, "Fisher", ["Kron"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="curv_shapes"):
        SecondOrderOptimizer(m, "Hessian", "Kron")
    with pytest.raises(ValueError, match="no trainable parameters"):
        SecondOrderOptimizer(nn.ReLU(), "Fisher", "Kron")
    with pytest.raises(TypeError, match="model"):
        SecondOrderOptimizer([torch.zeros(2)], "Fisher", "Kron")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="learning rate"):
        SecondOrderOptimizer(m, "Fisher", "Kron", lr=-1)
    with pytest.raises(ValueError, match="damping"):
        SecondOrderOptimizer(m, "Fisher", "Kron", {"damping": -1.0})
    with pytest.raises(ValueError, match="ema_decay"):
        SecondOrderOptimizer(m, "Fisher", "Kron", {"ema_decay": 0.0})
    with pytest.raises(ValueError, match="unknown keys"):
        SecondOrderOptimizer(m, "Fisher", "Kron", {"dampnig": 1.0})
    with pytest.raises(ValueError, match="momentum_type"):
        SecondOrderOptimizer(m, "Fisher", "Kron", momentum_type="nesterov")
    with pytest.raises(ValueError, match="curv_interval"):
        SecondOrderOptimizer(m, "Fisher", "Kron", curv_interval=0)
    with pytest.raises(ValueError, match="acc_steps"):
        SecondOrderOptimizer(m, "Fisher", "Kron", acc_steps=0)
    with pytest.raises(ValueError, match="loss"):
        SecondOrderOptimizer(m, "Fisher", "Kron", {"loss": "hinge"})


def _opt():
    torch.manual_seed(0)
    m = _mlp()
    return m, SecondOrderOptimizer(m, "Fisher", "Kron", {"damping": 1e-2}, lr=0.1)


def test_bad_closures():
    m, opt = _opt()
    x, y = _data(False)
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    with pytest.raises(TypeError, match="None"):
        opt.step(lambda: None)

    def unreduced():
        opt.zero_grad()
        out = m(x)
        loss = F.cross_entropy(out, y, reduction="none")
        loss.sum().backward()
        return loss, out

    with pytest.raises(ValueError, match="reduce"):
        opt.step(unreduced)

    def nan_loss():
        opt.zero_grad()
        out = m(x)
        loss = F.cross_entropy(out, y) * float("nan")
        loss.backward()
        return loss, out

    with pytest.raises(FloatingPointError, match="non-finite loss"):
        opt.step(nan_loss)
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_hessian_needs_create_graph():
    torch.manual_seed(0)
    m = _mlp()
    opt = SecondOrderOptimizer(m, "Hessian", "Diag", lr=0.1)
    x, y = _data(False)

    closure = ce_closure(opt, m, x, y)

    with pytest.raises(ValueError, match="create_graph"):
        opt.step(closure)


def test_non_finite_curvature_is_an_error_not_nan_parameters():
    m, opt = _opt()
    x, y = _data(False)
    x = x.clone()
    x[0, 0] = float("inf")

    def closure():
        opt.zero_grad()
        out = m(x).nan_to_num(0.0)
        loss = F.cross_entropy(out, y)
        loss.backward()
        return loss, out

    before = [p.clone() for p in m.parameters()]
    with pytest.raises(FloatingPointError, match="non-finite curvature"):
        opt.step(closure)
    for b, p in zip(before, m.parameters()):
        assert torch.equal(b, p)


def test_singular_factor_is_recovered():
    """Zero damping on a rank-deficient factor: float64 / eigh fallback, finite update."""
    torch.manual_seed(0)
    m = nn.Linear(6, 3)
    opt = SecondOrderOptimizer(m, "Cov", "Kron", {"damping": 0.0}, lr=0.01)
    x = torch.zeros(4, 6)
    x[:, 0] = 1.0  # A has rank 1
    y = torch.tensor([0, 1, 2, 0])

    closure = ce_closure(opt, m, x, y)

    opt.step(closure)
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_max_update_ratio_bounds_each_layer_step():
    torch.manual_seed(0)
    m = _mlp()
    x, y = _data(False)
    opt = SecondOrderOptimizer(m, "Cov", "Kron", {"damping": 1e-4}, lr=100.0, max_update_ratio=1e-3)
    before = [p.detach().clone() for p in m.parameters()]

    closure = ce_closure(opt, m, x, y)

    opt.step(closure)
    for b in opt.blocks:
        idx = [i for i, p in enumerate(m.parameters()) if any(p is q for q in b.params)]
        step = sum(float(((list(m.parameters())[i] - before[i]) ** 2).sum()) for i in idx) ** 0.5
        wn = sum(float((before[i] ** 2).sum()) for i in idx) ** 0.5
        assert 0 < step <= 1e-3 * wn * (1 + 1e-5)
    with pytest.raises(ValueError, match="max_update_ratio"):
        SecondOrderOptimizer(m, "Cov", "Kron", max_update_ratio=0.0)


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_cuda_steps_match_cpu_steps(cfg):
    """Every configuration trains on CUDA; sampled Fisher labels come from the host
    generator, so four float64 steps agree with the CPU's to rounding."""
    curv, shapes, kw = cfg
    conv = "Conv2d" in shapes
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 4, 4, generator=g) if conv else torch.randn(16, 6, generator=g)
    y = torch.randint(0, 4, (16,), generator=g)
    finals = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(1)
        model = (_cnn() if conv else _mlp()).double().to(device)
        opt = SecondOrderOptimizer(model, curv, shapes, {"damping": 1e-2, **kw}, lr=0.1)
        xd, yd = x.double().to(device), y.to(device)
        for _ in range(4):
            opt.step(ce_closure(opt, model, xd, yd))
        finals.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
