"""In-process A/B of torchsso's row-form K-FAC preconditioning (``Kron.precondition_dot_lowrank``).

The benchmark's every-step K-FAC (MLP 64-256-256-10, batch 128, one thread) with the row form
on (the library's behaviour) and off (``opt._lowrank_enabled = False``: every layer through the
Kronecker solves of the full gradient), and SGD, in interleaved rounds; per-step thread CPU
time, medians. Run under the shared lock:
``flock /tmp/bench.lock .venv/bin/python benchmarks/torchsso_lowrank_ab.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchsso_bench import KFAC, mlp, sso_step, torch_step

import torchsso


def _kfac(model: torch.nn.Module, row_form: bool):
    """The benchmark's every-step K-FAC (``torchsso_bench.KFAC``, library defaults)."""
    opt = torchsso.SecondOrderOptimizer(
        model, KFAC["curv_type"], {"Linear": "Kron"},
        {"damping": KFAC["damping"], "ema_decay": KFAC["ema_decay"]},
        lr=KFAC["lr"], momentum=0.9,
    )  # fmt: skip
    if not row_form:
        opt._lowrank_enabled = False
        opt.capture.loss_grad_modules = {}
    return sso_step(model, opt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--per-round", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 64, generator=g), torch.randint(0, 10, (128,), generator=g)
    m_sgd = mlp()
    steps = {
        "SGD": torch_step(m_sgd, torch.optim.SGD(m_sgd.parameters(), lr=1e-3, momentum=0.9)),
        "K-FAC every step, row form (default)": _kfac(mlp(), True),
        "K-FAC every step, row form off": _kfac(mlp(), False),
    }
    for f in steps.values():
        for _ in range(20):
            f(x, y)
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for name, f in steps.items():
            for _ in range(args.per_round):
                c = time.thread_time()
                f(x, y)
                cpu[name].append(time.thread_time() - c)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    for k, v in med.items():
        print(f"{k}: {1e3 * v:.3f} ms/step (CPU median), {v / med['SGD']:.2f}x SGD")
    on, off = med["K-FAC every step, row form (default)"], med["K-FAC every step, row form off"]
    print(f"row form on / off: {on / off:.3f}")


if __name__ == "__main__":
    main()
