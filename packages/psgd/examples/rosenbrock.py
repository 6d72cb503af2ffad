"""Minimise the Rosenbrock function with DenseNewton (exact Hessian-vector products)."""

import torch

import psgd
from psgd.problems import rosenbrock

torch.manual_seed(0)  # the optimizer's probe vectors are drawn from torch's RNG
xy = torch.nn.Parameter(torch.tensor([-1.0, 1.0], dtype=torch.float64))
opt = psgd.DenseNewton([xy], lr=0.5, preconditioner_init_scale=0.01)
for it in range(1, 1001):
    loss = opt.step(lambda: rosenbrock(xy))
    if it % 100 == 0 or loss < 1e-8:
        print(f"iteration {it}: loss {float(loss):.3e}, x = {xy.detach().tolist()}")
    if loss < 1e-8:
        break
