"""Checkpoints of :class:`~eigenpro3.models.KernelModel`: ``state_dict``, ``save``, ``load``.

The state holds tensors and plain numbers only (weights, the projection's
values ``u``, the preconditioner's spectrum), so ``torch.load(...,
weights_only=True)`` reads it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from eigenpro3.blocks import CenterSet
from eigenpro3.preconditioner import Nystrom
from eigenpro3.projection import Projector

__all__ = ["Checkpointing"]


class Checkpointing:
    """``state_dict`` / ``load_state_dict`` / ``save`` / ``load`` of a kernel model."""

    n_outputs: int
    ridge: float
    centers: CenterSet
    theta: Tensor
    u: Tensor
    d_s: Tensor
    nystrom: Nystrom
    projector: Projector
    main: torch.device
    dtype: torch.dtype
    _temps_x: list[Tensor]
    _temps_a: list[Tensor]
    _since_solve: int

    def flush(self) -> None:  # pragma: no cover - provided by the model
        raise NotImplementedError

    def _refresh_nystrom_blocks(self) -> None:  # pragma: no cover - provided by the model
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Weights, projection state and preconditioner (tensors and numbers only).

        Pending temporary centers are projected first.
        """
        self.flush()
        return {
            "n_outputs": self.n_outputs,
            "ridge": self.ridge,
            "centers": self.centers.centers.clone(),
            "theta": self.theta.clone(),
            "u": self.u.clone(),
            "d_s": self.d_s.clone(),
            "nystrom_idx": self.nystrom.idx.clone(),
            "nystrom_F": self.nystrom.F.clone(),
            "nystrom_eigvals": self.nystrom.eigvals.clone(),
            "beta": self.nystrom.beta,
            "beta_p": self.nystrom.beta_p,
            "lam_data": self.nystrom.lam_data,
            "inner_epochs": self.projector.inner_epochs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` of a model with the same centers and outputs."""
        required = {"centers", "theta", "u", "d_s", "nystrom_idx", "nystrom_F", "nystrom_eigvals"}
        missing = required - set(state)
        if missing:
            raise ValueError(f"state_dict is missing keys {sorted(missing)}")
        z = self.centers.centers
        if state["centers"].shape != z.shape or not torch.equal(state["centers"].to(z), z):
            raise ValueError("state_dict['centers'] differ from this model's centers")
        if state["theta"].shape != self.theta.shape:
            raise ValueError(
                f"state_dict['theta'] has shape {tuple(state['theta'].shape)}, "
                f"expected {tuple(self.theta.shape)}"
            )
        dev, dt = self.main, self.dtype
        self.nystrom = Nystrom(
            idx=state["nystrom_idx"].to(dev),
            F=state["nystrom_F"].to(dev, dt),
            eigvals=state["nystrom_eigvals"].to(dev, torch.float64),
            beta=float(state["beta"]),
            beta_p=float(state["beta_p"]),
            lam_data=float(state.get("lam_data", 0.0)),
        )
        self.ridge = float(state.get("ridge", self.ridge))
        pr = self.projector
        pr.inner_epochs = float(state.get("inner_epochs", pr.inner_epochs))
        self._refresh_nystrom_blocks()
        self.theta = state["theta"].to(dev, dt).clone()
        self.u = state["u"].to(dev, dt).clone()
        self.d_s = state["d_s"].to(dev, dt).clone()
        self._temps_x.clear()
        self._temps_a.clear()
        self._since_solve = 0

    def save(self, path: str | Path) -> None:
        """Write :meth:`state_dict` to ``path`` with ``torch.save``."""
        torch.save(self.state_dict(), path)

    def load(self, path: str | Path) -> Any:
        """Load weights saved by :meth:`save` into this model; returns ``self``."""
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return self

    @classmethod
    def from_file(cls, path: str | Path, kernel_fn: Any, **kwargs: Any) -> Any:
        """Rebuild a model from a file written by :meth:`save` and the same ``kernel_fn``."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        make: Any = cls  # the model class: KernelModel(n_outputs, centers, kernel_fn, ...)
        model = make(int(state["n_outputs"]), state["centers"], kernel_fn, **kwargs)
        model.load_state_dict(state)
        return model
