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
    if name == "psgd.Kron(EQ)":
        return psgd.Kron(params, lr=1e-3, preconditioner_update_probability=prob, geometry="EQ")
    if name == "psgd.Kron(EQ, fast_fit)":
        return psgd.Kron(
            params, lr=1e-3, preconditioner_update_probability=prob, geometry="EQ", fast_fit=True
        )
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


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def _state_bytes(opt: torch.optim.Optimizer, n_params: int) -> float:
    """Bytes of all tensors reachable from ``opt.state`` (nested containers, shared storage once)."""
    return _tensor_bytes(list(opt.state.values()), set()) / n_params


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
    names = [
        "psgd.Kron",
        "psgd.Kron(EQ)",
        "psgd.Kron(EQ, fast_fit)",
        "kron-torch",
        "heavyball",
        "AdamW",
    ]
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
        print(
            f"  p={prob}: "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in out["step_ms"][str(prob)].items())
        )
    out["matmul_gflops"] = _matmul_gflops()
    out["precond_gflops"] = _precond_gflops(5)
    return out


class _StackRunner(_Runner):
    """``psgd.Kron`` on ``layers`` equal-shaped ``Linear(width, width)`` layers, random gradients."""

    def __init__(self, layers: int, width: int, batch: bool, prob: float) -> None:
        torch.manual_seed(0)
        mods: list[torch.nn.Module] = []
        for _ in range(layers):
            mods += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        self.model = torch.nn.Sequential(*mods)
        # fixed well-scaled gradients (a deep ReLU stack's own vanish into denormals)
        self.grads = [0.01 * torch.randn(p.shape) for p in self.model.parameters()]
        self.opt = psgd.Kron(
            self.model.parameters(),
            lr=1e-3,
            preconditioner_update_probability=prob,
            batch_same_shape=batch,
        )


def bench_batch(quick: bool) -> dict[str, Any]:
    """Same-shaped parameters batched (one bmm) vs a loop, steps without a preconditioner update."""
    out: dict[str, Any] = {}
    repeats = 5 if quick else 11
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: steadier on a shared machine; the saving is overhead
    for layers, width in ((8, 256), (8, 512)):
        runners = {}
        for batch in (True, False):
            r = _StackRunner(layers, width, batch, 1.0)
            r.steps(2)  # state and a fitted preconditioner
            r.opt.param_groups[0]["preconditioner_update_probability"] = 0.0
            r.steps(3)  # warm-up of the non-update path
            runners[batch] = r
        times: dict[bool, list[float]] = {True: [], False: []}
        n = 20
        for _ in range(repeats):
            for batch, r in runners.items():
                times[batch].append(r.steps(n) / n * 1e3)
        key = f"{layers} x Linear({width}, {width})"
        out[key] = {
            "batched": statistics.median(times[True]),
            "loop": statistics.median(times[False]),
        }
        print(f"  {key}: batched {out[key]['batched']:.2f} ms, loop {out[key]['loop']:.2f} ms")
    torch.set_num_threads(threads)
    return out


# -------------------------------------------------------------------------- quality
def _xor_iterations(kind: str, lr: float, seed: int, length: int, max_iter: int) -> int | None:
    from psgd.problems import TanhRNN, delayed_xor_batch

    torch.manual_seed(seed)
    model = TanhRNN()
    if kind.startswith("psgd.Kron"):
        # the default geometry ("QUAD"), and kron-torch's triangular "EQ"
        geometry = "EQ" if kind == "psgd.Kron(EQ)" else "QUAD"
        opt: torch.optim.Optimizer = psgd.Kron(
            model.parameters(), lr=lr, min_ndim_triangular=1, geometry=geometry
        )
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1000 + seed)
    for it in range(max_iter):
        x, y = delayed_xor_batch(128, length, generator=gen)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if float(loss.detach()) < 0.05:
            return it + 1
    return None


#: learning rates tried for every method on the delayed-XOR task (the same grid for all);
#: each method is judged at its best one (most seeds solved, then lowest median)
XOR_LRS = (1e-3, 2e-3, 3e-3)


def bench_xor(seeds: int, max_iter: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("psgd.Kron", "psgd.Kron(EQ)", "Adam"):
        runs = {}
        for lr in XOR_LRS:
            its = [_xor_iterations(kind, lr, s, 16, max_iter) for s in range(seeds)]
            solved = [i for i in its if i is not None]
            capped = [i if i is not None else max_iter for i in its]
            runs[str(lr)] = {
                "iterations": its,
                "solved": len(solved),
                "median": statistics.median(capped),
            }
            print(f"    {kind} lr {lr:g}: {its}")
        best = min(runs, key=lambda k: (-runs[k]["solved"], runs[k]["median"]))
        out[kind] = {"by_lr": runs, "best_lr": float(best), **runs[best]}
    return out


def bench_rosenbrock() -> dict[str, Any]:
    from psgd.problems import rosenbrock

    xy = torch.nn.Parameter(torch.tensor([-1.0, 1.0], dtype=torch.float64))
    opt = psgd.DenseNewton([xy], lr=0.5, preconditioner_init_scale=0.01)
    its, f = 0, math.inf
    while its < 1000 and f >= 1e-8:
        its += 1
        f = float(opt.step(lambda: rosenbrock(xy)))
    return {"DenseNewton": {"iterations": its, "loss": f}}


def bench_rank_decomposition(max_iter: int) -> dict[str, Any]:
    from psgd.problems import rank_decomposition_loss

    gen = torch.Generator().manual_seed(0)
    true = [torch.randn(n, 3, generator=gen, dtype=torch.float64) for n in (6, 7, 8)]
    target = torch.einsum("ir,jr,kr->ijk", *true)
    out: dict[str, Any] = {}
    for name in ("LRANewton", "KronNewton", "Adam"):
        torch.manual_seed(1)
        factors = [torch.nn.Parameter(torch.randn(n, 3, dtype=torch.float64)) for n in (6, 7, 8)]
        if name == "LRANewton":
            opt: Any = psgd.LRANewton(factors, lr=0.3, rank=10, lr_preconditioner=0.2)
        elif name == "KronNewton":
            opt = psgd.KronNewton(
                factors, lr=0.3, lr_preconditioner=0.2, preconditioner_max_skew=math.inf
            )
        else:
            opt = torch.optim.Adam(factors, lr=0.01)
        best, its = math.inf, max_iter
        for it in range(max_iter):
            if name == "Adam":
                opt.zero_grad()
                loss = rank_decomposition_loss(target, factors)
                loss.backward()
                opt.step()
            else:
                loss = opt.step(lambda fs=factors: rank_decomposition_loss(target, fs))
            best = min(best, float(loss))
            if best < 1e-7:
                its = it + 1
                break
        out[name] = {"iterations": its, "loss": best}
    return out


def _classify(
    split: Any, kind: str, steps: int, seed: int, hidden: int
) -> tuple[float, list[tuple[float, float]]]:
    torch.manual_seed(seed)
    d, k = split.x_train.shape[1], int(split.y_train.max()) + 1
    model = torch.nn.Sequential(
        torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, k),
    )  # fmt: skip
    if kind == "AdamW":
        opt: Any = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    else:
        opt = (
            _make(kind, model.parameters(), None)
            if kind != "psgd.Kron"
            else psgd.Kron(model.parameters(), lr=1e-3, weight_decay=1e-2)
        )
        if kind == "kron-torch" and opt is not None:
            opt.param_groups[0]["weight_decay"] = 1e-2
        if opt is None:
            return math.nan, []
    gen = torch.Generator().manual_seed(seed)
    n = split.x_train.shape[0]
    curve, t0 = [], time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, n, (128,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            curve.append((time.perf_counter() - t0, float(loss.detach())))
    with torch.no_grad():
        test = float(torch.nn.functional.cross_entropy(model(split.x_test), split.y_test))
    return test, curve


def bench_classification(seeds: int, steps: int) -> dict[str, Any]:
    from optcore.data import load_sklearn, make_mnist1d

    digits = load_sklearn("digits", standardize=False)  # constant pixels: keep the 0..16 scale
    digits = type(digits)(digits.x_train / 16, digits.y_train, digits.x_test / 16, digits.y_test)
    data = {"mnist1d": make_mnist1d(n_train=4000, n_test=1000), "digits": digits}
    out: dict[str, Any] = {"curves": {}}
    for name, split in data.items():
        res: dict[str, Any] = {}
        kinds = ["psgd.Kron", "AdamW"] + (["kron-torch", "heavyball"] if name == "mnist1d" else [])
        for kind in kinds:
            tests = []
            for seed in range(seeds if kind in ("psgd.Kron", "AdamW") else 1):
                try:
                    test, curve = _classify(split, kind, steps, seed, 128)
                except Exception as exc:
                    print(
                        f"  {kind} failed on {name}: {type(exc).__name__}: {exc}", file=sys.stderr
                    )
                    test, curve = math.nan, []
                tests.append(test)
                if seed == 0 and name == "mnist1d":
                    out["curves"][kind] = curve
            res[kind] = {"test_loss": statistics.median(tests), "per_seed": tests}
        out[name] = res
        print(f"  {name}: " + ", ".join(f"{k} {v['test_loss']:.3f}" for k, v in res.items()))
    return out


# --------------------------------------------------------------------------- report
def _table(results: dict[str, Any]) -> str:
    lines = ["| task | method | metric | value |", "|---|---|---|---|"]
    sp = results.get("speed")
    if sp:
        for prob, row in sp["step_ms"].items():
            for k, v in row.items():
                lines.append(f"| MLP step, p={prob} | {k} | ms / step | {v:.1f} |")
            for mine in ("psgd.Kron", "psgd.Kron(EQ)", "psgd.Kron(EQ, fast_fit)"):
                ours = row.get(mine)
                for peer in ("kron-torch", "heavyball"):
                    if ours and row.get(peer):
                        ratio = ours / row[peer]
                        lines.append(
                            f"| MLP step, p={prob} | {mine} / {peer} | ratio | {ratio:.2f} |"
                        )
        for k, v in sp["state_bytes_per_param"].items():
            lines.append(f"| MLP state | {k} | bytes / parameter | {v:.2f} |")
        lines.append(f"| preconditioner apply | psgd.Kron | GFLOP/s | {sp['precond_gflops']:.1f} |")
        lines.append(f"| float32 matmul (1024^3) | torch | GFLOP/s | {sp['matmul_gflops']:.1f} |")
    for key, v in results.get("batch", {}).items():
        task = f"{key}, non-update step, 1 thread"
        lines.append(f"| {task} | psgd.Kron, batched (bmm) | ms / step | {v['batched']:.2f} |")
        lines.append(f"| {task} | psgd.Kron, per-parameter loop | ms / step | {v['loop']:.2f} |")
        lines.append(f"| {task} | batched / loop | ratio | {v['batched'] / v['loop']:.2f} |")
    xor = results.get("xor")
    if xor:
        for k, v in xor.items():
            for lr, r in v.get("by_lr", {}).items():
                lines.append(
                    f"| delayed XOR (T=16), {len(r['iterations'])} seeds, lr {float(lr):g} | {k} | solved / median iters | {r['solved']} / {r['median']:.0f} |"
                )
    for k, v in results.get("rosenbrock", {}).items():
        lines.append(
            f"| Rosenbrock to 1e-8 | {k} | iterations (loss) | {v['iterations']} ({v['loss']:.1e}) |"
        )
    for k, v in results.get("rank", {}).items():
        lines.append(
            f"| rank-3 CP decomposition to 1e-7 | {k} | iterations (best loss) | {v['iterations']} ({v['loss']:.1e}) |"
        )
    cl = results.get("classification")
    if cl:
        for data in ("mnist1d", "digits"):
            for k, v in cl.get(data, {}).items():
                lines.append(
                    f"| {data} MLP, test loss | {k} | cross-entropy | {v['test_loss']:.3f} |"
                )
    return "\n".join(lines)


def _targets(results: dict[str, Any]) -> list[str]:
    """The issue's targets, judged on this run's figures."""
    out = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    for prob, limit in (("0.03", 0.5), ("1.0", 0.6)):
        row = results.get("speed", {}).get("step_ms", {}).get(prob, {})
        for peer in ("kron-torch", "heavyball"):
            if row.get("psgd.Kron") and row.get(peer):
                r = row["psgd.Kron"] / row[peer]
                out.append(
                    f"- psgd.Kron / {peer} at p={prob}: {r:.2f}, target <= {limit}: {verdict(r <= limit)}"
                )
    xor = results.get("xor", {})
    if "psgd.Kron" in xor and "Adam" in xor and "by_lr" in xor["psgd.Kron"]:
        k, a = xor["psgd.Kron"], xor["Adam"]
        n = len(k["iterations"])
        r = k["median"] / a["median"]
        ok = k["solved"] == n and r <= 0.7
        out.append(
            f"- delayed XOR: psgd.Kron (lr {k['best_lr']:g}) solves {k['solved']}/{n}, median "
            f"{k['median']:.0f} = {r:.2f}x Adam's (lr {a['best_lr']:g}, {a['median']:.0f}), "
            f"target every seed and <= 0.7x: {verdict(ok)}"
        )
    return out


def _report(results: dict[str, Any]) -> str:
    """The table, then the issue's targets judged on it."""
    targets = _targets(results)
    text = _table(results)
    if targets:
        text += "\n\nIssue targets (ratios measured side by side in this run):\n\n" + "\n".join(
            targets
        )
    return text


def _plot(results: dict[str, Any]) -> Path | None:
    curves = results.get("classification", {}).get("curves")
    if not curves:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, c in curves.items():
        if c:
            ax.plot([t for t, _ in c], [v for _, v in c], label=k)
    ax.set_xlabel("wall time (s, shared 2-core CPU)")
    ax.set_ylabel("training loss (MNIST-1D MLP)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    path = ROOT / "packages" / "psgd" / "docs" / "loss_vs_time.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _write_readme(table: str, plot: Path | None) -> None:
    text = README.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    block = start + "\n" + table + "\n"
    if plot is not None:
        block += "\n![loss vs time](docs/loss_vs_time.png)\n"
    block += end
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text += "\n" + block + "\n"
    README.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--only", choices=["speed", "quality", "xor", "batch"], default=None)
    parser.add_argument("--table-only", action="store_true", help="rebuild table from JSON")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    saved = RESULTS / "psgd_bench.json"
    results: dict[str, Any] = (
        json.loads(saved.read_text()) if saved.exists() and (args.only or args.table_only) else {}
    )
    if args.table_only:
        table = _report(results)
        print(table)
        if not args.no_readme:
            _write_readme(table, _plot(results))
        return
    if args.only in (None, "speed"):
        print("speed (MLP 784-512-512-10, batch 128, step() only):")
        results["speed"] = bench_speed(args.quick)
    if args.only == "batch":  # not part of the default run: the targets do not name it
        print("same-shaped parameters (non-update steps, batch 128):")
        results["batch"] = bench_batch(args.quick)
    if args.only in (None, "quality", "xor"):
        torch.set_num_threads(1)
        print("delayed XOR (tanh RNN, T=16):")
        results["xor"] = bench_xor(5, 1500 if args.quick else 3000)
        print("  ", results["xor"])
    if args.only in (None, "quality"):
        seeds = 5
        results["rosenbrock"] = bench_rosenbrock()
        print("  rosenbrock", results["rosenbrock"])
        results["rank"] = bench_rank_decomposition(2000)
        print("  rank decomposition", results["rank"])
        print("classification (MLP):")
        results["classification"] = bench_classification(
            3 if args.quick else seeds, 300 if args.quick else 600
        )
    (RESULTS / "psgd_bench.json").write_text(json.dumps(results, indent=2))
    table = _report(results)
    print(table)
    if not args.no_readme:
        _write_readme(table, _plot(results))


if __name__ == "__main__":
    main()
