"""VOGN exploration on the VALIDATION split only (the test split is never read here).

Trains VOGN (``VIOptimizer``, ``"Cov"`` / ``"Diag"``) on the benchmark's sub-training split
(80% of digits' training split, seeds 0..2, batch 128) for each setting given as
``prior_variance:kl_weighting:lr:damping`` and prints, per epoch checkpoint (every 5) and
prediction sample count K (0 = the posterior mean), the means over the seeds of: training CE
(at the mean), validation ECE, accuracy, mean confidence and NLL; then the candidate the
benchmark's rule would pick (lowest validation ECE with training CE <= 0.05). ``--adam``
prints the same for Adam (lr 1e-3) as the reference.

Run (not a timing run): ``python benchmarks/torchsso_vi_sweep.py 1:0.2:5e-3:1e-2
1:1:5e-3:1e-2 --ema 0.1`` (about 40 s per setting on one core).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torchsso_bench as B

import torchsso


def _val_rows(s, ks, pred):
    """Validation metrics per prediction sample count (the training CE is added by
    ``torchsso_bench._fit``)."""
    for k in ks:
        p = pred(k)
        yield {
            "mc_samples": k,
            "val_ece": torchsso.expected_calibration_error(p, s["yv"]),
            "val_acc": float((p.argmax(1) == s["yv"]).float().mean()),
            "val_conf": float(p.max(1).values.mean()),
            "val_nll": float(F.nll_loss(p.clamp_min(1e-12).log(), s["yv"])),
        }


class FanInVI(torchsso.VIOptimizer):
    """VOGN with a layer-wise prior: variance ``c / fan_in`` for each layer's block.

    ``c`` is passed as ``prior_variance``; the prior precision ``tau / (N c / fan_in)``
    enters each block's damping and the gradient's prior term (through the group's
    ``l2_reg``, constant: use it without KL warm-up).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for group, block in zip(self.param_groups, self.blocks):
            group["l2_reg"] = self._block_prior(block)

    def _block_prior(self, block) -> float:
        fan_in = block.params[0].shape[1] if block.params[0].dim() > 1 else 1
        return self.tau() * fan_in / (self.dataset_size * self.prior_variance)

    def _block_damping(self, block, base: float) -> float:
        return base + self._block_prior(block)

    def _prior_l2(self) -> float:
        return 0.0


def run(
    s,
    hp: dict | None,
    seed: int,
    epochs: int,
    ks,
    ema: float,
    linearized: bool = False,
    fan_in: bool = False,
) -> dict:
    """One training run; ``hp=None`` is Adam (lr 1e-3). Returns {(epoch, K): metrics}."""
    model = B.mlp(seed)
    if hp is None:
        step = B.torch_step(model, torch.optim.Adam(model.parameters(), lr=1e-3))

        def pred(k):
            return torch.softmax(model(s["xv"]), 1)

        ks = (0,)
    else:
        opt = (FanInVI if fan_in else torchsso.VIOptimizer)(
            model, len(s["x"]), "Cov", {"Linear": "Diag"},
            {"ema_decay": ema, "damping": hp["damping"]}, lr=hp["lr"], momentum=0.9,
            prior_variance=hp["prior_variance"], kl_weighting=hp["kl_weighting"], seed=seed,
        )  # fmt: skip
        step = B.sso_step(model, opt)

        def pred(k):
            torch.manual_seed(seed)
            return torchsso.prediction(model, s["xv"], mc_samples=k, linearized=linearized)

    rows = B._fit(s, model, step, epochs, seed, lambda: _val_rows(s, ks, pred))
    keys = ("epoch", "mc_samples")
    return {
        (r["epoch"], r["mc_samples"]): {k: v for k, v in r.items() if k not in keys} for r in rows
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("settings", nargs="*", help="prior_variance:kl_weighting:lr:damping")
    ap.add_argument("--adam", action="store_true")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ema", type=float, default=0.1)
    ap.add_argument("--K", type=int, nargs="+", default=[0, 20])
    ap.add_argument(
        "--linearized", action="store_true", help="predict with the network linearised at the mean"
    )
    ap.add_argument(
        "--fan-in", action="store_true",
        help="layer-wise prior: each layer's prior variance is prior_variance / fan_in",
    )  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(1)
    s = B._split_val()
    todo: list[tuple[str, dict | None]] = [("Adam lr 1e-3", None)] if args.adam else []
    for spec in args.settings:
        pv, kl, lr, dmp = (float(v) for v in spec.split(":"))
        todo.append((spec, dict(prior_variance=pv, kl_weighting=kl, lr=lr, damping=dmp)))
    for name, hp in todo:
        runs = [
            run(s, hp, seed, args.epochs, args.K, args.ema, args.linearized, args.fan_in)
            for seed in range(args.seeds)
        ]
        best = None
        for key in runs[0]:
            m = {q: statistics.fmean(r[key][q] for r in runs) for q in runs[0][key]}
            line = f"{name} epoch {key[0]} K {key[1]}: " + " ".join(
                f"{q} {v:.4f}" for q, v in m.items()
            )
            print(line, flush=True)
            if m["train_ce"] <= B.CE_MAX and (best is None or m["val_ece"] < best[0]):
                best = (m["val_ece"], line)
        print(f"{name} PICK: {best[1] if best else 'none with train CE <= 0.05'}", flush=True)


if __name__ == "__main__":
    main()
