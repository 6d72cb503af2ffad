"""Helpers for torchsso's tests: worker functions for multi-process tests (importable by
module path for spawn), the cross-entropy closure and the preconditioned gradient."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .optim import SecondOrderOptimizer

__all__ = [
    "ce_closure",
    "data_parallel_run",
    "data_parallel_runs",
    "make_problem",
    "preconditioned_gradient",
]


def make_problem(n: int = 32, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small MLP and a fixed classification batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    return model.double(), x, y


def data_parallel_run(
    rank: int, world_size: int, curv_type: str, shapes: str, steps: int, ddp: bool = False
) -> list[list]:
    """Train on this rank's share of the batch; return the final parameters (as lists:
    tensors sent back through a multiprocessing queue can outlive their process)."""
    model, x, y = make_problem()
    n = x.shape[0] // world_size
    xs, ys = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
    net: nn.Module = model
    if ddp and world_size > 1:
        net = nn.parallel.DistributedDataParallel(model)
    opt = SecondOrderOptimizer(net, curv_type, shapes, {"damping": 1e-2}, lr=0.1, momentum=0.9)

    def closure():
        opt.zero_grad()
        out = net(xs)
        loss = F.cross_entropy(out, ys)
        loss.backward()
        return loss, out

    for _ in range(steps):
        opt.step(closure)
    return [p.detach().tolist() for p in model.parameters()]


def data_parallel_runs(rank: int, world_size: int, configs: list[tuple]) -> list[list[list]]:
    """:func:`data_parallel_run` for several ``(curv_type, shapes, steps, ddp)`` configs."""
    return [data_parallel_run(rank, world_size, *cfg) for cfg in configs]


def ce_closure(
    opt: torch.optim.Optimizer,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """The seed's closure convention for a step on ``(x, y)`` (cross-entropy unless
    ``loss_fn`` says otherwise): zero the gradients, forward, backward, return
    ``(loss, output)``."""

    def closure() -> tuple[torch.Tensor, torch.Tensor]:
        opt.zero_grad()
        out = model(x)
        loss = loss_fn(out, y)
        loss.backward()
        return loss, out

    return closure


def preconditioned_gradient(opt: SecondOrderOptimizer) -> tuple[list[torch.Tensor], float]:
    """The preconditioned gradient ``u`` of every block (from the inverses in the optimizer
    state and the current ``.grad``), concatenated in block order, and ``sum(u * g)``."""
    us: list[torch.Tensor] = []
    ug = 0.0
    for b in opt.blocks:
        st = opt.state[b.params[0]]
        inv = {k[4:]: v for k, v in st.items() if k.startswith("inv_")}
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in b.params]
        u = b.precondition(inv, grads)
        ug += sum(float((ui * g).sum()) for ui, g in zip(u, grads))
        us += u
    return us, ug
