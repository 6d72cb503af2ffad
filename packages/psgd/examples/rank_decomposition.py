"""Rank-3 CP decomposition of a 6x7x8 tensor with LRANewton and KronNewton (to 1e-7)."""

import torch

import psgd
from psgd.problems import rank_decomposition_loss

gen = torch.Generator().manual_seed(0)
true = [torch.randn(n, 3, generator=gen, dtype=torch.float64) for n in (6, 7, 8)]
target = torch.einsum("ir,jr,kr->ijk", *true)
for name in ("LRANewton", "KronNewton"):
    torch.manual_seed(1)
    factors = [torch.nn.Parameter(torch.randn(n, 3, dtype=torch.float64)) for n in (6, 7, 8)]
    if name == "LRANewton":
        opt = psgd.LRANewton(factors, lr=0.3, rank=10, lr_preconditioner=0.2)
    else:
        opt = psgd.KronNewton(
            factors, lr=0.3, lr_preconditioner=0.2, preconditioner_max_skew=float("inf")
        )
    it, loss = 0, torch.tensor(float("inf"))
    while it < 2000 and loss >= 1e-7:
        it += 1
        loss = opt.step(lambda fs=factors: rank_decomposition_loss(target, fs))
    print(f"{name}: loss {float(loss):.2e} after {it} iterations")
