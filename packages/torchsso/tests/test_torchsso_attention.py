"""K-FAC for the projections of nn.MultiheadAttention against brute force."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchsso import SecondOrderOptimizer, VIOptimizer
from torchsso._testing import ce_closure
from torchsso.curvature.attention import AttentionKron

pytestmark = pytest.mark.usefixtures("float64")


class Net(nn.Module):
    """Cross-attention: query from one projection of x, key and value from others."""

    def __init__(self, batch_first=True, bias=True, d=6, heads=2):
        super().__init__()
        self.batch_first = batch_first
        self.q_src = nn.Linear(3, d)
        self.kv_src = nn.Linear(3, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first, bias=bias)
        self.head = nn.Linear(d, 3)

    def sources(self, x):
        h = self.q_src(x)
        m = self.kv_src(x)
        return h, torch.tanh(m), m  # query, key, value inputs: (B, T, d)

    def forward(self, x, kpm=None):
        q, k, v = self.sources(x)
        if not self.batch_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        a = self.attn(q, k, v, key_padding_mask=kpm, need_weights=False)[0]
        if not self.batch_first:
            a = a.transpose(0, 1)
        return self.head(a.mean(1))


def _aug(x, bias):
    a = x.reshape(-1, x.shape[-1])
    return torch.cat([a, torch.ones(a.shape[0], 1)], 1) if bias else a


def _brute_force(net, x, y, kpm, bias):
    """Factors from an independent attention (explicit softmax), one example at a time."""
    at = net.attn
    E, H = at.embed_dim, at.num_heads
    d = E // H
    W, b = at.in_proj_weight, at.in_proj_bias
    Wo, bo = at.out_proj.weight, at.out_proj.bias
    B, T = x.shape[:2]
    A = {p: torch.zeros(E + bias, E + bias) for p in "qkvo"}
    G = {p: torch.zeros(E, E) for p in "qkvo"}
    for i in range(B):
        xin = [t[i : i + 1].detach() for t in net.sources(x)]
        proj = []
        for j, t in enumerate(xin):
            out = t @ W[j * E : (j + 1) * E].T
            if bias:
                out = out + b[j * E : (j + 1) * E]
            proj.append(out.detach().requires_grad_(True))
        q, k, v = (t.reshape(1, T, H, d).transpose(1, 2) for t in proj)
        s = q @ k.transpose(-1, -2) / math.sqrt(d)
        if kpm is not None:
            s = s.masked_fill(kpm[i].reshape(1, 1, 1, T), float("-inf"))
        o_in = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(1, T, E)
        o_in.retain_grad()
        a = o_in @ Wo.T + (bo if bias else 0)
        a.retain_grad()
        loss = F.cross_entropy(net.head(a.mean(1)), y[i : i + 1])  # per-example loss
        gs = torch.autograd.grad(loss, [*proj, a])
        for p, t, g in zip("qkvo", [*xin, o_in], gs):
            r = _aug(t.detach(), bias)
            A[p] += r.T @ r / (B * T)
            gr = g.reshape(-1, E)
            G[p] += gr.T @ gr / B
    return A, G


@pytest.mark.parametrize(
    "batch_first,bias,masked",
    [(True, True, False), (False, True, True), (True, False, True)],
)
def test_attention_kron_factors_equal_brute_force(batch_first, bias, masked):
    torch.manual_seed(0)
    net = Net(batch_first=batch_first, bias=bias)
    B, T = 5, 4
    x, y = torch.randn(B, T, 3), torch.randint(0, 3, (B,))
    kpm = None
    if masked:
        kpm = torch.zeros(B, T, dtype=torch.bool)
        kpm[1, -1] = kpm[3, -2:] = True
    opt = SecondOrderOptimizer(net, "Cov", {"MultiheadAttention": "Kron", "Linear": "Kron"}, lr=0.0)
    blk = opt.blocks[2]
    assert isinstance(blk, AttentionKron) and blk.name == "attn"

    def closure():
        opt.zero_grad()
        out = net(x, kpm)
        loss = F.cross_entropy(out, y)
        loss.backward()
        return loss, out

    opt.step(closure)
    st = opt.state[blk.params[0]]
    A, G = _brute_force(net, x, y, kpm, bias)
    for p in "qkvo":
        torch.testing.assert_close(st["curv_A" + p], A[p])
        torch.testing.assert_close(st["curv_G" + p], G[p])
    # the gradient assembled from the per-projection matrices is the parameter gradient
    grads = [q.grad for q in blk.params]
    back = blk._unmatrix(blk._matrices(grads))
    for g, h in zip(grads, back):
        torch.testing.assert_close(g, h)


def test_attention_kron_preconditions_each_projection():
    torch.manual_seed(1)
    net = Net()
    x, y = torch.randn(6, 4, 3), torch.randint(0, 3, (6,))
    opt = SecondOrderOptimizer(
        net, "Fisher", {"MultiheadAttention": "Kron"}, {"damping": 1e-2, "damping_split": "sqrt"},
        lr=0.0, kl_clip=None,
    )  # fmt: skip

    closure = ce_closure(opt, net, x, y)

    opt.step(closure)
    blk = opt.blocks[2]
    st = opt.state[blk.params[0]]
    inv = {k[4:]: v for k, v in st.items() if k.startswith("inv_")}
    grads = [p.grad for p in blk.params]
    u, dot = blk.precondition_dot(inv, grads)
    E = 6
    # dense check for the key projection: vec(U) = (A^-1 (x) G^-1) vec(V), damped as Kron
    r = math.sqrt(1e-2)
    A, G = st["curv_Ak"], st["curv_Gk"]
    pi = math.sqrt(float(torch.trace(A)) / A.shape[0] / (float(torch.trace(G)) / G.shape[0]))
    Ad = A + pi * r * torch.eye(A.shape[0])
    Gd = G + r / pi * torch.eye(E)
    V = torch.cat([grads[0][E : 2 * E], grads[1][E : 2 * E, None]], 1)
    dense = torch.kron(torch.linalg.inv(Gd), torch.linalg.inv(Ad))  # row-major vec
    Uk = (dense @ V.reshape(-1)).reshape(E, E + 1)
    torch.testing.assert_close(u[0][E : 2 * E], Uk[:, :-1])
    torch.testing.assert_close(u[1][E : 2 * E], Uk[:, -1])
    assert float(dot) == pytest.approx(float(sum((a * b).sum() for a, b in zip(u, grads))))


def test_attention_kron_trains_and_vi_samples():
    torch.manual_seed(2)
    net = Net()
    x = torch.randn(32, 4, 3)
    y = (x[:, 0, 0] > 0).long() + (x[:, -1, 1] > 0).long()
    # the previous defaults' split and a constant damping: without KL clipping the default
    # "tikhonov" split (less damping) diverges here at lr 0.05 / damping 1e-2, and the
    # damping adaptation raises the damping (0.01 -> 0.02) and is slower over 20 steps
    opt = SecondOrderOptimizer(
        net, "Fisher", {"MultiheadAttention": "Kron", "Linear": "Kron"},
        {"damping": 1e-2, "damping_split": "sqrt", "damping_adaptation": False},
        lr=0.05, momentum=0.9, kl_clip=None,
    )  # fmt: skip

    closure = ce_closure(opt, net, x, y)

    l0 = float(opt.step(closure))
    for _ in range(20):
        last = float(opt.step(closure))
    assert last < 0.6 * l0
    torch.manual_seed(3)
    net2 = Net()
    vi = VIOptimizer(net2, 32, "Cov", {"MultiheadAttention": "Kron"}, lr=1e-3, init_precision=1.0)
    eps = vi.sample_params()[2]
    assert [e.shape for e in eps] == [p.shape for p in vi.blocks[2].params]
    assert all(torch.isfinite(e).all() for e in eps)


def test_attention_with_dropout_or_frozen_projection_falls_back_to_diag():
    net = Net()
    net.attn.dropout = 0.1
    with pytest.warns(UserWarning, match="not available"):
        opt = SecondOrderOptimizer(net, "Cov", {"MultiheadAttention": "Kron"}, lr=0.0)
    assert opt.blocks[2].shape == "Diag"
    net = Net()
    net.attn.out_proj.bias.requires_grad_(False)
    with pytest.warns(UserWarning, match="frozen"):
        opt = SecondOrderOptimizer(net, "Cov", {"MultiheadAttention": "Kron"}, lr=0.0)
    assert opt.blocks[2].shape == "Diag"


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_rerun_reproduces_the_module_with_masks(batch_first):
    from torchsso.curvature.attention import attention_parts
    from torchsso.curvature.capture import Record

    torch.manual_seed(4)
    m = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    B, T, S = 3, 4, 5
    q, k, v = torch.randn(B, T, 8), torch.randn(B, S, 8), torch.randn(B, S, 8)
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    bmask = torch.rand(T, S) > 0.7
    bmask[:, 0] = False
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, -1] = True
    cases = [
        ((q, k, v), {}),
        ((q, k, v), {"attn_mask": bmask, "key_padding_mask": kpm}),
        ((q, k, v), {"attn_mask": torch.randn(B * 2, T, S)}),
        ((q, k, v, kpm), {"need_weights": True}),
    ]
    for args, kw in cases:
        ref = m(*args, **kw)[0]
        out = attention_parts(m, Record(args, kw, True))[2]
        if not batch_first:
            out = out.transpose(0, 1)
        torch.testing.assert_close(out, ref)
