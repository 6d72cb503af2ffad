"""Per-layer building blocks: input matrices for K-FAC and per-example gradients.

Conventions (``B`` examples, ``L`` positions per example: sequence steps for a
``Linear`` applied to ``(B, T, d)``, output pixels for a convolution):

* ``kron_input(module, x)`` returns the rows ``a`` (``(B*L, k)``, with a trailing
  column of ones when the layer has a bias) so that the K-FAC input factor is
  ``A = a^T a / (B L)``; the output factor is ``G = sum_l g_l g_l^T / B`` over the
  per-example output gradients (the "expand" convention; for convolutions the
  product ``A (x) G`` equals the KFC factors of Grosse & Martens, 2016).
* ``per_example_grads(module, params, record, g)`` returns the per-example gradient
  of every parameter of ``module``, flattened and concatenated, ``(B, P)``. Fast
  closed forms are used for ``Linear``, ``Conv1d/2d``, ``BatchNorm`` and
  ``LayerNorm``; any other module goes through ``torch.func`` (``vmap`` of a
  ``vjp`` of ``functional_call``), which is exact when examples do not interact.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from .capture import Record

__all__ = [
    "conv_supported",
    "kron_input",
    "kron_output",
    "matrix_grad",
    "normalized_input",
    "per_example_grads",
    "split_matrix",
]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def conv_supported(m: nn.Module) -> bool:
    """Whether K-FAC / closed-form Diag handle this convolution (groups 1, zero padding)."""
    return (
        isinstance(m, (nn.Conv1d, nn.Conv2d))
        and m.groups == 1
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
    )


def _unfold(m: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """Patches ``(B, C*kh*kw, L)`` of the input of a convolution."""
    pad = tuple(int(v) for v in m.padding)
    if isinstance(m, nn.Conv1d):
        return F.unfold(
            x.unsqueeze(2),
            (1, m.kernel_size[0]),
            dilation=(1, m.dilation[0]),
            padding=(0, pad[0]),
            stride=(1, m.stride[0]),
        )
    return F.unfold(x, m.kernel_size, dilation=m.dilation, padding=pad, stride=m.stride)


def kron_input(m: nn.Module, x: Tensor) -> tuple[Tensor, int]:
    """Rows of the K-FAC input factor and the number of examples ``B``."""
    B = x.shape[0]
    if isinstance(m, nn.Linear):
        a = x.reshape(-1, x.shape[-1])
    else:
        p = _unfold(m, x)  # type: ignore[arg-type]
        a = p.transpose(1, 2).reshape(-1, p.shape[1])
    if getattr(m, "bias", None) is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    return a, B


def kron_output(m: nn.Module, g: Tensor) -> Tensor:
    """Rows ``(B*L, out)`` of per-position output gradients."""
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2).reshape(-1, g.shape[1])
    return g.reshape(-1, g.shape[-1])


def matrix_grad(m: nn.Module, grads: list[Tensor]) -> Tensor:
    """The gradients of a Linear/Conv layer as one ``(out, k[+1])`` matrix."""
    w = grads[0].reshape(grads[0].shape[0], -1)
    if len(grads) > 1:
        w = torch.cat([w, grads[1].unsqueeze(1)], dim=1)
    return w


def split_matrix(m: nn.Module, mat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Inverse of :func:`matrix_grad`."""
    if len(like) > 1:
        return [mat[:, :-1].reshape(like[0].shape), mat[:, -1].reshape(like[1].shape)]
    return [mat.reshape(like[0].shape)]


def normalized_input(m: nn.Module, x: Tensor, training: bool) -> Tensor:
    """``x_hat`` of a BatchNorm / LayerNorm layer, as the layer computed it."""
    if isinstance(m, nn.LayerNorm):
        dims = tuple(range(-len(m.normalized_shape), 0))
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + m.eps)
    assert isinstance(m, _BN)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if training or m.running_mean is None or m.running_var is None:
        bdims = [0, *range(2, x.dim())]
        mean = x.mean(dim=bdims, keepdim=True)
        var = x.var(dim=bdims, unbiased=False, keepdim=True)
    else:
        mean, var = m.running_mean.view(shape), m.running_var.view(shape)
    return (x - mean) / torch.sqrt(var + m.eps)


def _generic(m: nn.Module, names: list[str], rec: Record, g: Tensor, bdim: int) -> list[Tensor]:
    params = {n: p.detach() for n, p in m.named_parameters() if n in names}
    in_dims = tuple(bdim if isinstance(a, Tensor) and a.dim() > bdim else None for a in rec.inputs)

    def one(xs: tuple, gi: Tensor) -> dict[str, Tensor]:
        xs_b = tuple(a.unsqueeze(bdim) if d is not None else a for a, d in zip(xs, in_dims))

        def f(p: dict[str, Tensor]) -> Tensor:
            out = functional_call(m, p, xs_b, rec.kwargs)
            return out[0] if isinstance(out, tuple) else out

        pull = vjp(f, params)[1]
        return pull(gi.unsqueeze(bdim))[0]

    with warnings.catch_warnings():
        # vmap over attention (nn.MultiheadAttention's Diag/Full path) falls back to a loop
        # over fused SDPA kernels, and torch says so once per process: nothing the user
        # can act on (the math backend was measured no faster)
        warnings.filterwarnings(
            "ignore", message=r".*batching rule for aten::_scaled_dot_product", category=UserWarning
        )
        out = vmap(one, in_dims=(in_dims, bdim))(rec.inputs, g)
    return [out[n] for n in names]


def per_example_grads(
    m: nn.Module, names: list[str], rec: Record, g: Tensor, bdim: int = 0
) -> Tensor:
    """Per-example gradients ``(B, P)`` of the parameters ``names`` of module ``m``.

    Args:
        m: the module.
        names: the parameter names (as in ``m.named_parameters()``) in order.
        rec: the recorded forward call.
        g: per-example gradient of the loss with respect to the module output.
        bdim: batch dimension of the inputs and of ``g``.
    """
    x = rec.inputs[0] if rec.inputs else None
    parts: list[Tensor]
    if isinstance(m, nn.Linear) and isinstance(x, Tensor) and names[0] == "weight":
        if x.dim() == 2:
            parts = [(g.unsqueeze(2) * x.unsqueeze(1)).flatten(1)]
            gb = g
        else:
            x3 = x.reshape(x.shape[0], -1, x.shape[-1])
            g3 = g.reshape(g.shape[0], -1, g.shape[-1])
            parts = [torch.einsum("bto,bti->boi", g3, x3).flatten(1)]
            gb = g3.sum(1)
        if "bias" in names:
            parts.append(gb)
    elif conv_supported(m) and isinstance(x, Tensor) and names[0] == "weight":
        a = _unfold(m, x)  # type: ignore[arg-type]
        g3 = g.reshape(g.shape[0], g.shape[1], -1)
        parts = [torch.einsum("bol,bkl->bok", g3, a).flatten(1)]
        if "bias" in names:
            parts.append(g3.sum(2))
    elif isinstance(m, (*_BN, nn.LayerNorm)) and isinstance(x, Tensor):
        xh = normalized_input(m, x, rec.training)
        if isinstance(m, nn.LayerNorm):
            k = len(m.normalized_shape)
            red = tuple(range(1, g.dim() - k))
        else:
            red = tuple(range(2, g.dim()))
        by_name = {"weight": (g * xh).sum(red) if red else g * xh, "bias": g.sum(red) if red else g}
        parts = [by_name[n].flatten(1) for n in names]
    else:
        parts = [t.flatten(1) for t in _generic(m, names, rec, g, bdim)]
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
