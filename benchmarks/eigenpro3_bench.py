"""eigenpro3 benchmark: EigenPro3 against the exact p-center solve and KernelRidge.

Parts (default run ~10 minutes on a 2-core CPU):

1. synthetic classification, n = 40k train / 10k test, d = 100, 10 classes,
   Laplacian bandwidth 5, p = 4000: seconds per epoch and test accuracy per
   epoch (3 epochs) vs the exact p-center least-squares solve (normal
   equations accumulated in blocks, Cholesky in float64) and scikit-learn's
   KernelRidge (precomputed Laplacian kernel) on an 8k subsample;
2. n scaling on the same data (n = 10k, 40k, 200k; one epoch each);
3. digits, p = 1000: test MSE / accuracy after 5 epochs vs the exact solve;
4. kernel-block throughput (GFLOP/s of the ``x z^T`` product inside a Laplacian
   block) vs the measured float32 matmul throughput;
5. the original EigenPro3, only when ``EIGENPRO3_ORIGINAL=/path/to/checkout``
   is set (run in a subprocess; it is not a dependency);
6. ``--scale``: n = 1,000,000, d = 100, p = 20,000, one epoch, peak memory.

Writes ``benchmarks/results/eigenpro3_bench.json``, the figure
``packages/eigenpro3/docs/eigenpro3_bench.png`` and the table into
``packages/eigenpro3/README.md`` (between the ``bench`` markers).

Usage::

    .venv/bin/python benchmarks/eigenpro3_bench.py [--quick] [--scale]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from eigenpro3 import KernelModel, accuracy, load_dataset
from eigenpro3.kernels import laplacian
from eigenpro3.preconditioner import single_thread

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PKG = ROOT / "packages" / "eigenpro3"
FIG = PKG / "docs" / "eigenpro3_bench.png"
BW = 5.0


def synthetic(
    n: int, d: int = 100, c: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian mixture: 3 clusters per class, means 0.35 N(0, I), unit noise."""
    g = torch.Generator().manual_seed(seed)
    means = 0.35 * torch.randn(3 * c, d, generator=g)
    comp = torch.randint(0, 3 * c, (n,), generator=g)
    X = means[comp] + torch.randn(n, d, generator=g)
    return X, comp % c


def one_hot(labels: torch.Tensor, c: int = 10) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, c).float()


def exact_solve(X, Y, Z, bw, *, rows=4096):
    """Exact p-center least squares via normal equations accumulated in blocks."""
    p = len(Z)
    A = torch.zeros(p, p, dtype=torch.float64)
    B = torch.zeros(p, Y.shape[1], dtype=torch.float64)
    for s in range(0, len(X), rows):
        k = laplacian(X[s : s + rows], Z, bw)
        A += (k.T @ k).double()
        B += (k.T @ Y[s : s + rows]).double()
    jitter = 1e-9 * float(A.diagonal().mean())
    with single_thread():
        L = torch.linalg.cholesky(A + jitter * torch.eye(p, dtype=torch.float64))
        return torch.cholesky_solve(B, L).float()


def predict_exact(Xt, Z, alpha, bw, rows=4096):
    return torch.cat([laplacian(Xt[s : s + rows], Z, bw) @ alpha for s in range(0, len(Xt), rows)])


def run_eigenpro3(X, Y, Xt, lt, Z, epochs, bw=BW, **kw):
    t0 = time.perf_counter()
    model = KernelModel(10, Z, "laplacian", X=X, y=Y, bandwidth=bw, verbose=False, **kw)
    setup = time.perf_counter() - t0
    curve, per_epoch = [], []
    elapsed = setup
    for e in range(1, epochs + 1):
        t = time.perf_counter()
        model.fit_epoch(model.train_loaders)
        dt = time.perf_counter() - t
        per_epoch.append(dt)
        elapsed += dt
        pred = model.predict(Xt)
        curve.append({"epoch": e, "seconds": elapsed, "accuracy": accuracy(pred, lt)})
    return model, setup, per_epoch, curve


def throughput() -> dict:
    """GFLOP/s of float32 matmul and of the product inside a Laplacian block."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2048, 2048, generator=g), torch.randn(2048, 2048, generator=g)
    x, z = torch.randn(4096, 100, generator=g), torch.randn(4000, 100, generator=g)

    def best(fn, flops, reps=5):
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return flops / statistics.median(times) / 1e9

    mm = best(lambda: a @ b, 2 * 2048**3)
    same = best(lambda: x @ z.T, 2 * 4096 * 4000 * 100)
    block = best(lambda: laplacian(x, z, BW), 2 * 4096 * 4000 * 100)
    return {
        "matmul_gflops": mm,
        "same_shape_matmul_gflops": same,
        "laplacian_block_gflops": block,
        "block_vs_matmul": block / mm,
    }


def original(X, Y, Xt, lt, Z) -> dict | None:
    path = os.environ.get("EIGENPRO3_ORIGINAL")
    if not path:
        return None
    tmp = RESULTS / "eigenpro3_original_input.pt"
    torch.save({"X": X, "Y": Y, "Xt": Xt, "lt": lt, "Z": Z}, tmp)
    code = f"""
import time, json, torch
from eigenpro3.models import KernelModel
from eigenpro3.kernels import laplacian
d = torch.load({str(tmp)!r})
kfn = lambda x, z: laplacian(x, z, bandwidth={BW})
m = KernelModel(10, d["Z"], kfn, X=d["X"], y=d["Y"], devices=[torch.device("cpu")])
t = time.perf_counter(); m.fit(m.train_loaders, [], epochs=1); dt = time.perf_counter() - t
print(json.dumps({{"seconds_per_epoch": dt}}))
"""
    env = dict(os.environ, PYTHONPATH=path)
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900
        )
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as err:  # the original often fails to import / run
        return {"error": repr(err)}


def scale_run() -> dict:
    n, p = 1_000_000, 20_000
    X, labels = synthetic(n, seed=7)
    Y = one_hot(labels)
    Z = X[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:p]]
    t0 = time.perf_counter()
    model = KernelModel(10, Z, "laplacian", X=X, y=Y, bandwidth=BW, verbose=True, memory_gb=8)
    setup = time.perf_counter() - t0
    t = time.perf_counter()
    model.fit_epoch(model.train_loaders)
    epoch = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"n": n, "p": p, "setup_s": setup, "epoch_s": epoch, "peak_rss_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--scale", action="store_true", help="also n=1M, p=20k one epoch")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for every method (default 1: on a shared, loaded 2-core "
        "machine one thread is several times faster than two contended ones)",
    )
    ap.add_argument("--from-json", action="store_true", help="only re-render the README")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.from_json:
        write_readme(json.loads((RESULTS / "eigenpro3_bench.json").read_text()), figure=True)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "note": "shared 2-core machine (other jobs running): absolute times are noisy",
    }
    n_tr, p = (8000, 1000) if args.quick else (40_000, 4000)
    Xa, la = synthetic(n_tr + n_tr // 4)
    X, lab, Xt, lt = Xa[:n_tr], la[:n_tr], Xa[n_tr:], la[n_tr:]
    Y = one_hot(lab)
    Z = X[torch.randperm(n_tr, generator=torch.Generator().manual_seed(1))[:p]]

    print("[1] throughput", flush=True)
    res["throughput"] = throughput()
    print(res["throughput"], flush=True)

    print(f"[2] synthetic n={n_tr} p={p}: EigenPro3", flush=True)
    model, setup, per_epoch, curve = run_eigenpro3(X, Y, Xt, lt, Z, 3)
    res["synthetic"] = {
        "n": n_tr,
        "p": p,
        "setup_s": setup,
        "epoch_s": per_epoch,
        "curve": curve,
        "batch_size": model.batch_size,
        "projection_interval": model._interval(model.batch_size),
    }
    print(res["synthetic"], flush=True)
    print("[2] EigenPro3 with the exact Cholesky projection", flush=True)
    _, setup_c, per_epoch_c, curve_c = run_eigenpro3(X, Y, Xt, lt, Z, 3, inner_solver="cholesky")
    res["synthetic"]["cholesky"] = {"setup_s": setup_c, "epoch_s": per_epoch_c, "curve": curve_c}
    print(res["synthetic"]["cholesky"], flush=True)
    print("[2] exact p-center solve", flush=True)
    t = time.perf_counter()
    alpha = exact_solve(X, Y, Z, BW)
    exact_s = time.perf_counter() - t
    exact_acc = accuracy(predict_exact(Xt, Z, alpha, BW), lt)
    res["synthetic"]["exact"] = {"seconds": exact_s, "accuracy": exact_acc}
    print(res["synthetic"]["exact"], flush=True)

    print("[2] scikit-learn KernelRidge on a subsample", flush=True)
    try:
        from sklearn.kernel_ridge import KernelRidge

        n_sub = min(8000, n_tr)
        t = time.perf_counter()
        k = laplacian(X[:n_sub].double(), X[:n_sub].double(), BW).numpy()
        kr = KernelRidge(alpha=1e-3, kernel="precomputed").fit(k, Y[:n_sub].numpy())
        kt = laplacian(Xt.double(), X[:n_sub].double(), BW).numpy()
        kr_acc = accuracy(torch.as_tensor(kr.predict(kt)), lt)
        res["synthetic"]["kernel_ridge"] = {
            "n": n_sub,
            "seconds": time.perf_counter() - t,
            "accuracy": kr_acc,
            "memory_gib": n_sub * n_sub * 8 / 2**30,
        }
    except ImportError:
        res["synthetic"]["kernel_ridge"] = None
    print(res["synthetic"]["kernel_ridge"], flush=True)
    res["synthetic"]["original"] = original(X, Y, Xt, lt, Z)

    print("[3] n scaling", flush=True)
    sizes = [2000, 8000] if args.quick else [10_000, 40_000, 200_000]
    res["scaling"] = []
    for n in sizes:
        Xs, ls = synthetic(n, seed=3)
        Zs = Z
        m = KernelModel(10, Zs, "laplacian", X=Xs, y=one_hot(ls), bandwidth=BW, verbose=False)
        m.batch_size = model.batch_size  # same batch size for every n
        m._train_loaders = None
        t = time.perf_counter()
        m.fit_epoch(m.train_loaders)
        dt = time.perf_counter() - t
        res["scaling"].append({"n": n, "epoch_s": dt, "us_per_sample": 1e6 * dt / n})
        print(res["scaling"][-1], flush=True)

    print("[4] digits p=1000", flush=True)
    _, (Xd, Yd), (Xdt, Ydt) = load_dataset("digits")
    Zd = Xd[torch.randperm(len(Xd), generator=torch.Generator().manual_seed(0))[:1000]]
    t = time.perf_counter()
    md = KernelModel(10, Zd, "laplacian", X=Xd, y=Yd, bandwidth=2.0, verbose=False)
    hist = md.fit(epochs=5)
    dig_s = time.perf_counter() - t
    pd = md.predict(Xdt)
    ad = exact_solve(Xd, Yd, Zd, 2.0)
    pe = predict_exact(Xdt, Zd, ad, 2.0)
    res["digits"] = {
        "eigenpro3": {
            "seconds": dig_s,
            "mse": float((pd - Ydt).pow(2).mean()),
            "accuracy": accuracy(pd, Ydt),
            "train_loss": [h["train_loss"] for h in hist],
        },
        "exact": {"mse": float((pe - Ydt).pow(2).mean()), "accuracy": accuracy(pe, Ydt)},
    }
    print(res["digits"], flush=True)

    if args.scale:
        print("[5] scale run n=1M p=20k", flush=True)
        res["scale"] = scale_run()
        print(res["scale"], flush=True)

    (RESULTS / "eigenpro3_bench.json").write_text(json.dumps(res, indent=2))
    write_readme(res, figure=not args.quick)


def table(res: dict) -> str:
    s = res["synthetic"]
    ex, kr = s["exact"], s["kernel_ridge"]
    lines = [
        f"Synthetic, n = {s['n']} train, d = 100, 10 classes, Laplacian bw 5, p = {s['p']} "
        f"(batch {s['batch_size']}, projection every {s['projection_interval']} batch(es)):",
        "",
        "| method | seconds | test accuracy |",
        "|---|---|---|",
    ]
    for c in s["curve"]:
        ep = s["epoch_s"][c["epoch"] - 1]
        lines.append(
            f"| EigenPro3 epoch {c['epoch']} ({ep:.1f} s/epoch) | {c['seconds']:.1f} | "
            f"{100 * c['accuracy']:.2f}% |"
        )
    ch = s.get("cholesky")
    if ch:
        for c in ch["curve"]:
            ep = ch["epoch_s"][c["epoch"] - 1]
            lines.append(
                f"| EigenPro3, Cholesky projection, epoch {c['epoch']} ({ep:.1f} s/epoch) | "
                f"{c['seconds']:.1f} | {100 * c['accuracy']:.2f}% |"
            )
    lines.append(
        f"| exact p-center solve (normal eq.) | {ex['seconds']:.1f} | {100 * ex['accuracy']:.2f}% |"
    )
    if kr:
        lines.append(
            f"| scikit-learn KernelRidge, n = {kr['n']} subsample ({kr['memory_gib']:.2f} GiB kernel) "
            f"| {kr['seconds']:.1f} | {100 * kr['accuracy']:.2f}% |"
        )
    orig = s.get("original")
    lines.append(
        "| original EigenPro3 | "
        + ("not run (set EIGENPRO3_ORIGINAL to a checkout) | |" if orig is None else f"{orig} | |")
    )
    lines += [
        "",
        "n scaling (one epoch, same p and batch size):",
        "",
        "| n | s/epoch | us/sample |",
        "|---|---|---|",
    ]
    for r in res["scaling"]:
        lines.append(f"| {r['n']} | {r['epoch_s']:.1f} | {r['us_per_sample']:.0f} |")
    d = res["digits"]
    lines += [
        "",
        "digits, p = 1000, Laplacian bw 2, 5 epochs:",
        "",
        "| method | test MSE | test accuracy |",
        "|---|---|---|",
        f"| EigenPro3 ({d['eigenpro3']['seconds']:.1f} s) | {d['eigenpro3']['mse']:.5f} | "
        f"{100 * d['eigenpro3']['accuracy']:.2f}% |",
        f"| exact p-center solve | {d['exact']['mse']:.5f} | {100 * d['exact']['accuracy']:.2f}% |",
    ]
    t = res["throughput"]
    lines += [
        "",
        f"Throughput: float32 matmul {t['matmul_gflops']:.1f} GFLOP/s (2048^3), same-shape "
        f"x z^T {t['same_shape_matmul_gflops']:.1f} GFLOP/s, Laplacian block "
        f"{t['laplacian_block_gflops']:.1f} GFLOP/s counting the product's 2 m p d flops "
        f"(ratio to matmul {t['block_vs_matmul']:.2f}).",
    ]
    if "scale" in res:
        sc = res["scale"]
        lines.append(
            f"Scale: n = {sc['n']}, p = {sc['p']}: setup {sc['setup_s']:.0f} s, one epoch "
            f"{sc['epoch_s']:.0f} s, peak RSS {sc['peak_rss_gib']:.1f} GiB."
        )
    lines += ["", f"Machine: {res['machine']}; {res['note']}."]
    return "\n".join(lines)


def write_readme(res: dict, *, figure: bool) -> None:
    text = table(res)
    print(text)
    if figure:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            s = res["synthetic"]
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(
                [c["seconds"] for c in s["curve"]],
                [100 * c["accuracy"] for c in s["curve"]],
                "o-",
                label="EigenPro3 (per epoch)",
            )
            if s.get("cholesky"):
                ch = s["cholesky"]["curve"]
                ax.plot(
                    [c["seconds"] for c in ch],
                    [100 * c["accuracy"] for c in ch],
                    "o--",
                    label="EigenPro3, Cholesky projection",
                )
            ax.plot(
                [s["exact"]["seconds"]],
                [100 * s["exact"]["accuracy"]],
                "s",
                label="exact p-center solve",
            )
            if s["kernel_ridge"]:
                kr = s["kernel_ridge"]
                ax.plot(
                    [kr["seconds"]], [100 * kr["accuracy"]], "^", label=f"KernelRidge (n={kr['n']})"
                )
            ax.set_xlabel("seconds (shared 2-core CPU)")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"synthetic n={s['n']}, p={s['p']}")
            ax.legend()
            FIG.parent.mkdir(exist_ok=True)
            fig.tight_layout()
            fig.savefig(FIG, dpi=110)
            text += "\n\n![test accuracy vs time](docs/eigenpro3_bench.png)"
        except ImportError:
            pass
    readme = PKG / "README.md"
    body = readme.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start in body and end in body:
        head, rest = body.split(start, 1)
        _, tail = rest.split(end, 1)
        readme.write_text(f"{head}{start}\n{text}\n{end}{tail}")


if __name__ == "__main__":
    main()
