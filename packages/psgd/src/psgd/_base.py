"""Shared optimizer mechanics: global tensor state, argument checks, seeded probes, warnings."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["PSGDBase", "check_nonneg", "check_positive", "check_unit"]

_MASK = (1 << 63) - 1


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is a finite number > 0 (or >= 0)."""
    if isinstance(value, Tensor):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"Invalid {name}: {value} (must be finite and {bound})")


def check_nonneg(name: str, value: Any) -> None:
    """``ValueError`` unless ``value`` is finite and >= 0 (``inf`` allowed for sizes)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"Invalid {name}: {value} (must be >= 0)")


def check_unit(name: str, value: Any, *, closed: bool = False) -> None:
    """``ValueError`` unless ``0 <= value < 1`` (or ``<= 1`` when ``closed``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
    if not ok:
        raise ValueError(f"Invalid {name}: {value} (must be in [0, 1{']' if closed else ')'})")


class PSGDBase(torch.optim.Optimizer):
    """Base class: optimizer-wide tensor counters kept in ``state_dict()["psgd"]``.

    Subclasses register counters in ``self._counters`` (0-dim int64 tensors). The
    probe generator is re-seeded from ``(seed, update index, parameter index)``
    so that every probe vector is reproducible from ``torch.manual_seed`` and
    independent of which rank draws it.
    """

    _counters: dict[str, Tensor]

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # from the torch RNG
        self._counters = {"seed": torch.tensor(seed, dtype=torch.int64)}
        self._warned: set[str] = set()
        self._generators: dict[torch.device, torch.Generator] = {}

    # ----------------------------------------------------------------- probes
    def _generator(self, device: torch.device, key: int, index: int) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            self._generators[device] = gen
        seed = int(self._counters["seed"])
        mixed = (seed * 6364136223846793005 + (key + 1) * 1442695040888963407 + index * 97) & _MASK
        gen.manual_seed(mixed)
        return gen

    def _randn_like(self, x: Tensor, key: int, index: int) -> Tensor:
        gen = self._generator(x.device, key, index)
        return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=gen)

    # --------------------------------------------------------------- warnings
    def _param_name(self, group: dict[str, Any], i: int, p: Tensor) -> str:
        names = group.get("param_names")
        if names is not None and i < len(names):
            return str(names[i])
        gi = next(k for k, g in enumerate(self.param_groups) if g is group)
        return f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)})"

    def _warn_nonfinite(self, name: str) -> None:
        if name in self._warned:
            return
        self._warned.add(name)
        warnings.warn(
            f"{type(self).__name__}: non-finite gradient for {name}; its update and "
            "preconditioner are skipped for this step (warned once per parameter)",
            RuntimeWarning,
            stacklevel=3,
        )

    @staticmethod
    def _check_grad(p: Tensor, g: Tensor) -> None:
        if g.is_sparse:
            raise TypeError(f"sparse gradients are not supported (parameter of shape {p.shape})")

    # ------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        for group in sd["param_groups"]:
            for key, value in list(group.items()):
                if callable(value):  # a user schedule: code, not state
                    group[key] = None
        sd["psgd"] = {k: v.clone() for k, v in self._counters.items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        counters = state_dict.pop("psgd", None)
        keep = [
            {k: v for k, v in g.items() if callable(v)} for g in self.param_groups
        ]  # schedules stay
        dtypes = {
            (idx, key): val.dtype
            for idx, st in state_dict["state"].items()
            for key, val in st.items()
            if isinstance(val, Tensor)
        }
        super().load_state_dict(state_dict)
        index = {}
        k = 0
        for group in self.param_groups:
            for p in group["params"]:
                index[k] = p
                k += 1
        for (idx, key), dtype in dtypes.items():
            st = self.state[index[idx]]
            if isinstance(st.get(key), Tensor) and st[key].dtype != dtype:
                st[key] = st[key].to(dtype)
        for group, saved in zip(self.param_groups, keep):
            for key, value in saved.items():
                if group.get(key) is None:
                    group[key] = value
        if counters is not None:
            for key, value in counters.items():
                self._counters[key] = value.clone().to(torch.int64)
        self._after_load()

    def _after_load(self) -> None:
        """Hook: refresh caches derived from the loaded state."""


def closure_loss(closure: Callable[[], Any] | None, *, required: str | None = None) -> Any:
    """Evaluate ``closure`` with grad enabled; its first item when it returns a tuple."""
    if closure is None:
        if required:
            raise ValueError(f"{required} needs a closure returning the loss (closure=None)")
        return None
    with torch.enable_grad():
        out = closure()
    if isinstance(out, (tuple, list)):
        out = out[0] if out else None
    if out is None and required:
        raise ValueError(f"{required}: the closure returned None; it must return the loss")
    return out
