"""Choosing a curvature block for every parameterized module of a model."""

from __future__ import annotations

import warnings

from torch import nn

from .attention import AttentionKron, attention_kron_supported
from .layers import conv_supported
from .shapes import Diag, Full, Kron, LayerCurvature, Unit

__all__ = ["SHAPES", "build_blocks"]

SHAPES = {"Kron": Kron, "Diag": Diag, "Full": Full, "Unit": Unit}

_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)
_KNOWN = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, *_NORM)
_WARNED: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, UserWarning, stacklevel=4)


def _allowed(m: nn.Module) -> tuple[str, ...]:
    if isinstance(m, nn.Linear):
        return ("Kron", "Diag", "Full")
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return ("Kron", "Diag", "Full") if conv_supported(m) else ("Diag", "Full")
    if isinstance(m, nn.Embedding):
        return ("Kron", "Diag", "Full")
    if isinstance(m, _NORM):
        return ("Diag", "Unit", "Full")
    if attention_kron_supported(m):
        return ("Kron", "Diag", "Full")
    return ("Diag", "Full")


def _shape_for(m: nn.Module, curv_shapes: dict[str, str] | str, names: list[str]) -> str:
    tname = type(m).__name__
    if isinstance(curv_shapes, str):
        wanted = curv_shapes
    else:
        wanted = curv_shapes.get(tname, "")
        if not wanted:
            for base in type(m).__mro__[1:]:
                if base.__name__ in curv_shapes:
                    wanted = curv_shapes[base.__name__]
                    break
    allowed = _allowed(m)
    if not isinstance(m, _KNOWN) and not isinstance(m, nn.MultiheadAttention):
        _warn_once(
            tname,
            f"torchsso: no closed-form curvature for {tname}; it gets diagonal curvature from "
            "per-example gradients (torch.func)",
        )
    if wanted == "Unit" and (names != ["weight", "bias"]):
        wanted = "Diag"
    if not wanted:
        return "Diag"
    if wanted not in allowed:
        _warn_once(
            tname + wanted,
            f"torchsso: curv_shapes[{tname!r}]={wanted!r} is not available for this layer "
            f"(available: {allowed}); using 'Diag'",
        )
        return "Diag"
    return wanted


def build_blocks(
    model: nn.Module, curv_shapes: dict[str, str] | str, curv_type: str
) -> list[LayerCurvature]:
    """One curvature block per module that owns trainable parameters.

    ``nn.MultiheadAttention`` is one block holding its projections (including
    ``out_proj``, which it calls functionally); with ``"Kron"`` it gets one pair of
    Kronecker factors per projection (:class:`~torchsso.curvature.attention.AttentionKron`). A parameter shared by several
    modules belongs to the first one.

    Raises:
        ValueError: on an unknown shape name, ``Kron`` with ``"Hessian"``, or a model
            without trainable parameters.
    """
    if not isinstance(curv_shapes, (dict, str)):
        raise TypeError(f"curv_shapes must be a dict or a str, got {type(curv_shapes).__name__}")
    values = [curv_shapes] if isinstance(curv_shapes, str) else list(curv_shapes.values())
    for v in values:
        if v not in SHAPES:
            raise ValueError(f"curv_shapes: unknown shape {v!r}; expected one of {sorted(SHAPES)}")
    if curv_type == "Hessian" and "Kron" in values:
        raise ValueError("curv_shapes: 'Kron' is not available with curv_type='Hessian'")
    seen: set[int] = set()
    skip: set[str] = set()
    blocks: list[LayerCurvature] = []
    for mname, m in model.named_modules():
        if any(mname == s or mname.startswith(s + ".") for s in skip):
            continue
        recurse = isinstance(m, nn.MultiheadAttention)
        if recurse:
            skip.add(mname)
        named = [
            (n, p)
            for n, p in m.named_parameters(recurse=recurse)
            if p.requires_grad and id(p) not in seen
        ]
        if not named:
            continue
        names = [n for n, _ in named]
        params = [p for _, p in named]
        for p in params:
            seen.add(id(p))
        shape = _shape_for(m, curv_shapes, names)
        if curv_type == "Hessian" and shape == "Unit":
            shape = "Diag"
        if (
            isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
            and names[0] != "weight"
            and shape == "Kron"
        ):
            shape = "Diag"
        bdim = 1 if isinstance(m, nn.MultiheadAttention) and not m.batch_first else 0
        if isinstance(m, nn.MultiheadAttention) and shape == "Kron":
            if names != AttentionKron.expected_names(m):
                _warn_once(
                    mname + "frozen",
                    f"torchsso: attention {mname!r} has frozen projection parameters; using 'Diag'",
                )
                blocks.append(Diag(mname, m, names, params, bdim))
                continue
            blocks.append(AttentionKron(mname, m, names, params, bdim))
            continue
        blocks.append(SHAPES[shape](mname, m, names, params, bdim))
    if not blocks:
        raise ValueError("model has no trainable parameters")
    return blocks
