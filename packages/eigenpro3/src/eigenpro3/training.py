"""Training loops of :class:`~eigenpro3.models.KernelModel`: epochs, ``fit``, evaluation.

The step itself (:meth:`KernelModel.fit_batch`) lives in :mod:`eigenpro3.models`;
this mixin runs it over loaders (with a tqdm bar and, under
``torch.distributed``, the same number of steps on every process), projects
at the end of every epoch and records a per-epoch history.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from eigenpro3._checks import targets_2d
from eigenpro3.blocks import CenterSet

__all__ = ["ScoreFn", "TrainingLoops"]

ScoreFn = Callable[[Tensor, Tensor], Any]


class TrainingLoops:
    """Epoch, fit and evaluation loops over a model's ``fit_batch`` / ``predict``."""

    centers: CenterSet
    n_outputs: int
    dtype: torch.dtype
    verbose: bool
    rank: int
    world_size: int
    fit_batch: Callable[[Tensor, Tensor], float]
    predict: Callable[[Tensor], Tensor]
    flush: Callable[[], None]
    correct: Callable[[Any], Any]
    _begin_epoch: Callable[[list[Any]], None]
    _end_epoch: Callable[[], None]

    @property
    def train_loaders(self) -> list[Any]:  # pragma: no cover - provided by the model
        raise NotImplementedError

    def _steps(self, loaders: list[Any]) -> int:
        n = sum(len(loader) for loader in loaders)
        if self.world_size > 1:
            t = torch.tensor([n], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            n = int(t)
        return n

    def fit_epoch(self, train_loaders: Any, *, epoch: int | None = None) -> float:
        """One pass over ``train_loaders`` (a loader or a list), projecting at the end.

        When the model's ``correction`` is on, a second pass computes the full
        gradient for the model-space correction step (:meth:`KernelModel.correct`).

        Returns:
            The mean squared training error met during the epoch (before each step).
        """
        loaders = (
            list(train_loaders) if isinstance(train_loaders, (list, tuple)) else [train_loaders]
        )
        steps = self._steps(loaders)
        it = iter(chain.from_iterable(loaders))
        desc = "EigenPro3" if epoch is None else f"EigenPro3 epoch {epoch}"
        show = self.verbose and self.rank == 0
        bar = tqdm(total=steps, desc=desc, disable=not show, leave=False)
        total, count = 0.0, 0
        self._begin_epoch(loaders)
        for _ in range(steps):
            batch = next(it, None)
            if batch is None:
                xb = torch.zeros(0, self.centers.d)
                yb = torch.zeros(0, self.n_outputs)
            else:
                xb, yb = batch[0], batch[1]
            loss = self.fit_batch(xb, yb)
            if not math.isnan(loss):
                total += loss
                count += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}")
        bar.close()
        self._end_epoch()
        self.flush()
        self.correct(loaders)
        return total / max(count, 1)

    def fit(
        self,
        train_loaders: Any = None,
        val_loader: Iterable[Any] | None = None,
        score_fn: ScoreFn | None = None,
        epochs: int = 1,
    ) -> list[dict[str, float | int | None]]:
        """Train for ``epochs`` epochs; evaluate ``score_fn`` on ``val_loader`` after each.

        Args:
            train_loaders: a loader or list of loaders of ``(x, y)`` batches
                (default ``self.train_loaders``).
            val_loader: optional loader of ``(x, target)`` batches.
            score_fn: ``score_fn(predictions, target)`` (e.g. :func:`eigenpro3.utils.accuracy`);
                default: mean squared error against ``target``.
            epochs: number of epochs.

        Returns:
            One dict per epoch: ``epoch``, ``train_loss``, ``val_score``, ``seconds``.
        """
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        loaders = self.train_loaders if train_loaders is None else train_loaders
        history: list[dict[str, float | int | None]] = []
        for e in range(1, epochs + 1):
            t0 = time.perf_counter()
            loss = self.fit_epoch(loaders, epoch=e)
            seconds = time.perf_counter() - t0
            score = self.evaluate(val_loader, score_fn) if val_loader is not None else None
            history.append({"epoch": e, "train_loss": loss, "val_score": score, "seconds": seconds})
            if self.verbose and self.rank == 0:
                tail = "" if score is None else f" val_score={score:.4f}"
                tqdm.write(f"epoch {e}: train_loss={loss:.4g}{tail} ({seconds:.2f}s)")
        return history

    @torch.no_grad()
    def evaluate(self, loader: Iterable[Any], score_fn: ScoreFn | None = None) -> float:
        """Batch-size weighted mean of ``score_fn(predict(x), target)`` over ``loader``."""
        total, n = 0.0, 0
        for batch in loader:
            xb, tb = batch[0], batch[1]
            pred = self.predict(xb)
            if score_fn is None:
                t2 = targets_2d(tb, len(xb), "target", dtype=self.dtype, n_outputs=self.n_outputs)
                value = float((pred - t2.to(pred.device)).pow(2).mean())
            else:
                value = float(score_fn(pred, tb.to(pred.device) if isinstance(tb, Tensor) else tb))
            total += value * len(xb)
            n += len(xb)
        if n == 0:
            raise ValueError("val_loader yielded no samples")
        return total / n
