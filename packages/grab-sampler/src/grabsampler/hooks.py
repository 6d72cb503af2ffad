"""Hooks mode: balance from layer activations and output gradients.

For a linear layer ``y = W a + b`` the per-example weight gradient is
``G_i = sum_t g_{i,t} a_{i,t}^T`` (``t`` runs over sequence positions, or over
the output pixels of an unfolded convolution). Inner products of two such
gradients never need ``G_i`` itself::

    <G_i, G_j> = sum_{t,u} <a_{i,t}, a_{j,u}> <g_{i,t}, g_{j,u}>

(for ``t`` of length one simply ``<a_i, a_j> <g_i, g_j>``), and the inner
product with a stored vector ``S`` is ``sum_t g_{i,t}^T S a_{i,t}``. Embedding
gradients are handled the same way with index matches in place of
activation inner products. :class:`GraB` registers forward hooks on
``nn.Linear``, ``nn.Conv1d/2d/3d`` (any groups and padding mode),
``nn.Embedding`` and normalization (LayerNorm, GroupNorm, BatchNorm) layers, keeps
their inputs and (through a tensor hook) the gradients of their outputs
during an ordinary ``loss.backward()``, and hands the result to a
:class:`~grabsampler.GraBSampler` as rows that only answer inner-product
questions. The affine parameters of normalization layers are as small as a
channel count: their per-example gradients (sums of ``g * x_hat`` and ``g``)
are formed directly. Parameters of other layers are not part of the balanced
vector; Dropout in the model is fine. When a
sequence/convolution layer's ``B^2 T^2`` position-pair tensor would exceed
``_PAIR_BUDGET`` entries, that layer's per-example gradients are formed after
all (one layer at a time).
"""

from __future__ import annotations

import math
from collections.abc import Sized
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grabsampler import _rows
from grabsampler._rows import DenseRows, Rows, onednn_mm
from grabsampler._sketch import KronSketch
from grabsampler.sampler import GraBSampler

__all__ = ["EmbeddingRows", "FactoredRows", "GraB", "GroupedRows"]

_PAIR_BUDGET = 1 << 24  # largest B*B*T*T tensor formed for sequence/conv layers


class FactoredRows:
    """Rows ``x_i = vec(sum_t g_{i,t} a_{i,t}^T)`` from ``a`` (B, T, I) and ``g`` (B, T, O)."""

    def __init__(self, a: Tensor, g: Tensor) -> None:
        self.a = a
        self.g = g
        #: ``(S, c)`` with ``c sum(S)`` the sum of the rows as an ``(O, I)`` matrix, when
        #: known already (hooks mode: the layer's own weight gradients); None: not known
        self.row_sum: tuple[list[Tensor], float] | None = None
        self.batch_size = int(a.shape[0])
        self.numel = int(g.shape[2] * a.shape[2])
        self._out, self._in = int(g.shape[2]), int(a.shape[2])

    def gram(self) -> Tensor:
        a, g = self.a, self.g
        b, t = a.shape[0], a.shape[1]
        if t == 1:
            return (a[:, 0] @ a[:, 0].T) * (g[:, 0] @ g[:, 0].T)
        if b * b * t * t <= _PAIR_BUDGET:
            aa = torch.einsum("bti,cui->bctu", a, a)
            gg = torch.einsum("bto,cuo->bctu", g, g)
            return (aa * gg).sum(dim=(2, 3))
        x = torch.einsum("bto,bti->boi", g, a).reshape(b, -1)
        return x @ x.T

    def cross(self, aux: Tensor) -> Tensor:
        # <x_b, V_k> = sum_t g_bt^T V_k a_bt: one (kO, I) @ (I, BT) product (the stored
        # vectors stacked as one (k*O, I) matrix), then a contraction with g
        b, t = self.a.shape[0], self.a.shape[1]
        k = aux.shape[0]
        v = aux.to(self.a.dtype).reshape(k * self._out, self._in)
        if t == 1:
            a0 = self.a[:, 0]
            if v.numel() >= _rows.ONEDNN_COLS:
                # oneDNN's linear operator reads the stored vectors faster than MKL's
                # (k*O, I) @ (I, B) product (measured 1.16 against 1.50 ms at 2048 x
                # 1024, B = 16, cold caches, one thread)
                q = onednn_mm(a0, v)  # (B, k*O)
                if q is not None:
                    return (q.view(b, k, self._out) * self.g[:, 0, None, :]).sum(dim=2)
            p = torch.mm(v, a0.T).view(k, self._out, b)  # (k, O, B)
            return (p * self.g[:, 0].T).sum(dim=1).T
        p = (self.a.reshape(b * t, self._in) @ v.T).reshape(b, t, k, self._out)
        return (p * self.g[:, :, None, :]).sum(dim=(1, 3))

    def _weighted(self, weights: Tensor) -> Tensor:
        """``(k*O, B*T)`` matrix of output gradients scaled by the example weights."""
        w = weights.to(self.a.dtype)
        b, t = self.a.shape[0], self.a.shape[1]
        gt = self.g.reshape(b * t, self._out).T  # (O, BT)
        wt = w.repeat_interleave(t, dim=1) if t > 1 else w  # (k, BT)
        return (gt[None] * wt[:, None, :]).reshape(-1, b * t)

    def combine(self, weights: Tensor) -> Tensor:
        b, t = self.a.shape[0], self.a.shape[1]
        out = self._weighted(weights) @ self.a.reshape(b * t, self._in)
        return out.reshape(weights.shape[0], -1)

    def add_sum_into(self, out: Tensor) -> bool:
        """``out += sum_i x_i`` from :attr:`row_sum` (one memory pass); False if unknown."""
        if self.row_sum is None:
            return False
        parts, scale = self.row_sum
        view = out.view(self._out, self._in)
        for p in parts:
            view.add_(p, alpha=scale)
        return True

    def combine_into(self, out: Tensor, weights: Tensor) -> None:
        """``out += combine(weights)`` without a temporary of the output's size."""
        b, t = self.a.shape[0], self.a.shape[1]
        view = out.view(-1, self._in)
        view.addmm_(
            self._weighted(weights).to(out.dtype), self.a.reshape(b * t, self._in).to(out.dtype)
        )


class EmbeddingRows:
    """Rows of an embedding table's gradient from indices (B, T) and output grads (B, T, D)."""

    def __init__(self, idx: Tensor, g: Tensor, num: int) -> None:
        self.idx = idx
        self.g = g
        self.num = num
        self.batch_size = int(idx.shape[0])
        self.dim = int(g.shape[2])
        self.numel = num * self.dim

    def gram(self) -> Tensor:
        b, t = self.idx.shape
        if b * b * t * t <= _PAIR_BUDGET:
            same = (self.idx[:, None, :, None] == self.idx[None, :, None, :]).to(self.g.dtype)
            gg = torch.einsum("btd,cud->bctu", self.g, self.g)
            return (same * gg).sum(dim=(2, 3))
        x = self.combine(torch.eye(b, dtype=self.g.dtype, device=self.g.device))
        return x @ x.T

    def cross(self, aux: Tensor) -> Tensor:
        v = aux.to(self.g.dtype).reshape(-1, self.num, self.dim)
        picked = v[:, self.idx]  # (k, B, T, D)
        return torch.einsum("kbtd,btd->bk", picked, self.g)

    def combine(self, weights: Tensor) -> Tensor:
        w = weights.to(self.g.dtype)
        flat_idx = self.idx.reshape(-1)
        out = torch.zeros(w.shape[0], self.num, self.dim, dtype=self.g.dtype, device=self.g.device)
        for k, row in enumerate(w):
            out[k].index_add_(0, flat_idx, (self.g * row[:, None, None]).reshape(-1, self.dim))
        return out.reshape(w.shape[0], -1)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _unfold(module: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: Tensor) -> Tensor:
    """Conv input ``x`` as patches ``(B, T, C*prod(kernel))`` (columns ordered as the weight).

    Padding modes other than zeros and string padding (``"same"``/``"valid"``) pad
    the input the way the layer does before unfolding; 3-d convolutions are
    unfolded through a strided view.
    """
    nd = x.dim() - 2
    k: tuple[int, ...] = tuple(module.kernel_size)
    st: tuple[int, ...] = tuple(module.stride)
    dl: tuple[int, ...] = tuple(module.dilation)
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, list(module._reversed_padding_repeated_twice), mode=mode)
        pd: tuple[int, ...] = (0,) * nd
    else:
        pd = tuple(module.padding)  # type: ignore[arg-type]
    if nd == 1:
        x = x.unsqueeze(2)
        k, st, pd, dl = (1, *k), (1, *st), (0, *pd), (1, *dl)
        nd = 2
    if nd == 2:
        return F.unfold(x, kernel_size=k, dilation=dl, padding=pd, stride=st).transpose(1, 2)
    if any(pd):
        x = F.pad(x, [p for q in reversed(pd) for p in (q, q)])
    x = x.contiguous()
    b, c = int(x.shape[0]), int(x.shape[1])
    size = [int(v) for v in x.shape[2:]]
    out = [(size[i] - dl[i] * (k[i] - 1) - 1) // st[i] + 1 for i in range(nd)]
    sd = x.stride()
    view = x.as_strided(
        (b, c, *out, *k),
        (
            sd[0],
            sd[1],
            *[sd[2 + i] * st[i] for i in range(nd)],
            *[sd[2 + i] * dl[i] for i in range(nd)],
        ),
    )
    perm = (0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    return view.permute(perm).reshape(b, math.prod(out), c * math.prod(k))


class GroupedRows:
    """Rows of a grouped convolution's weight: one :class:`FactoredRows` per group.

    Group ``j`` connects input channels ``j*C/G..`` to output channels ``j*O/G..``;
    its part of the flattened weight is a contiguous range, and inner products
    add up over the groups.
    """

    def __init__(self, parts: list[FactoredRows]) -> None:
        self.parts = parts
        self.batch_size = parts[0].batch_size
        self.numel = sum(p.numel for p in parts)
        self._ranges: list[tuple[int, int]] = []
        off = 0
        for p in parts:
            self._ranges.append((off, off + p.numel))
            off += p.numel

    def gram(self) -> Tensor:
        return torch.stack([p.gram() for p in self.parts]).sum(0)

    def cross(self, aux: Tensor) -> Tensor:
        return torch.stack(
            [p.cross(aux[:, lo:hi]) for p, (lo, hi) in zip(self.parts, self._ranges)]
        ).sum(0)

    def combine(self, weights: Tensor) -> Tensor:
        return torch.cat([p.combine(weights) for p in self.parts], dim=1)

    def combine_into(self, out: Tensor, weights: Tensor) -> None:
        """``out += combine(weights)`` one group at a time."""
        for p, (lo, hi) in zip(self.parts, self._ranges):
            out[:, lo:hi].add_(p.combine(weights).to(out.dtype))


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def _trainable(m: nn.Module, names: tuple[str, ...] = ("weight", "bias")) -> list[str]:
    """Names of ``m``'s own parameters among ``names`` that require gradients."""
    out = []
    for n in names:
        p = getattr(m, n, None)
        if isinstance(p, Tensor) and p.requires_grad:
            out.append(n)
    return out


def _normalized(m: nn.Module, x: Tensor) -> Tensor:
    """The normalized input ``x_hat`` of a LayerNorm / GroupNorm / BatchNorm layer.

    The layer's output is ``weight * x_hat + bias`` (per element, per group or
    per channel), so the per-example gradients of ``weight`` and ``bias`` are
    the sums of ``g * x_hat`` and ``g`` over the positions the parameter is
    shared by. BatchNorm uses the batch statistics in training mode and the
    running ones otherwise, as its forward pass does.
    """
    if isinstance(m, nn.LayerNorm):
        dims = tuple(range(x.dim() - len(m.normalized_shape), x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + m.eps)
    if isinstance(m, nn.GroupNorm):
        xg = x.reshape(x.shape[0], m.num_groups, -1)
        mean = xg.mean(dim=2, keepdim=True)
        var = xg.var(dim=2, unbiased=False, keepdim=True)
        return ((xg - mean) * torch.rsqrt(var + m.eps)).reshape(x.shape)
    assert isinstance(m, nn.modules.batchnorm._BatchNorm)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if m.training or m.running_mean is None or m.running_var is None:
        dims = (0, *range(2, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, unbiased=False, keepdim=True)
    else:
        mean, var = m.running_mean.reshape(shape), m.running_var.reshape(shape)
    return (x - mean) * torch.rsqrt(var + m.eps)


def _join(parts: list[Tensor]) -> Tensor:
    """Concatenates along positions (dim 1); a single part is used as it is."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _in_functorch() -> bool:
    """True inside ``torch.func`` transforms (vmap/grad), whose tensors must not escape."""
    level = getattr(torch._C._functorch, "maybe_current_level", None)
    return level is not None and level() is not None


class GraB:
    """GraB for ordinary training loops: no per-sample gradients are ever formed.

    Args:
        model: the network; the trainable parameters of its ``nn.Linear``,
            ``nn.Conv1d/2d/3d``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.GroupNorm``
            and ``nn.BatchNorm*d`` layers are balanced.
        data_source: the training set (only ``len`` is used).
        balance_type: see :class:`~grabsampler.GraBSampler`.
        loss_reduction: ``"mean"`` if the loss averages over the batch (output
            gradients are scaled by ``B`` to recover per-example gradients) or
            ``"sum"``.
        sketch_dim: None (default: exact balancing, the same orders as the
            per-sample-gradient route) or ``k``: *approximate* balancing of a
            seeded Kronecker sketch of each Linear / Conv / Embedding weight
            gradient, ``S_out G_i S_in^T`` with Gaussian ``k x O`` and ``k x I``
            matrices (sides of at most ``k`` entries stay exact), whose inner
            products are unbiased estimates of the exact ones; balancing then
            costs ``O(k^2)`` per layer instead of ``O(O I)``. Biases and
            normalization parameters stay exact.
        sketch_seed: seed of the sketch matrices (same seed, same orders).
        **sampler_kwargs: passed to :class:`~grabsampler.GraBSampler`.

    Example::

        grab = GraB(model, train_set)
        loader = DataLoader(train_set, batch_size=16, sampler=grab.sampler)
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); grab.step(); opt.step()
    """

    def __init__(
        self,
        model: nn.Module,
        data_source: Sized,
        balance_type: str = "mean",
        *,
        loss_reduction: str = "mean",
        sketch_dim: int | None = None,
        sketch_seed: int = 0,
        **sampler_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        self.sketch = None if sketch_dim is None else KronSketch(sketch_dim, sketch_seed)
        self.layers: list[tuple[str, nn.Module]] = []
        params: dict[str, Tensor] = {}
        kinds = (nn.Linear, *_CONVS, nn.Embedding)
        for name, m in model.named_modules():
            if isinstance(m, kinds) and m.weight.requires_grad:
                own = ["weight", *_trainable(m, ("bias",))]
            elif isinstance(m, _NORMS):
                own = _trainable(m)
            else:
                continue
            if own:
                self.layers.append((name, m))
                params.update({f"{name}.{n}": getattr(m, n) for n in own})
        if not params:
            raise ValueError(
                "model has no trainable Linear, Conv1d/2d/3d, Embedding or normalization layer"
            )
        self.params = params
        balanced = params if self.sketch is None else self._sketched_params()
        self.sampler = GraBSampler(data_source, balanced, balance_type, **sampler_kwargs)
        self._inputs: dict[int, list[Tensor]] = {}
        self._grads: dict[int, list[Tensor]] = {}
        #: per Linear layer and forward call: its own weight gradient and that
        #: tensor's version when backward produced it (see ``_hook_weight_sum``)
        self._wgrads: dict[int, list[tuple[Tensor | None, int] | None]] = {}
        self._handles = [
            m.register_forward_hook(self._make_hook(i)) for i, (_, m) in enumerate(self.layers)
        ]

    def _make_hook(self, i: int) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
            if not torch.is_grad_enabled() or not output.requires_grad or _in_functorch():
                return
            x = inputs[0].detach()
            if isinstance(module, _NORMS):
                with torch.no_grad():
                    x = _normalized(module, x)  # with the statistics of this very pass
            self._inputs.setdefault(i, []).append(x)
            slot = len(self._inputs[i]) - 1

            def grad_hook(g: Tensor) -> None:
                lst = self._grads.setdefault(i, [])
                while len(lst) <= slot:
                    lst.append(torch.empty(0))
                lst[slot] = g.detach()

            output.register_hook(grad_hook)
            if self.sketch is None and isinstance(module, nn.Linear) and x.dim() == 2:
                self._hook_weight_sum(i, slot, module, output)

        return hook

    def _hook_weight_sum(self, i: int, slot: int, module: nn.Linear, output: Tensor) -> None:
        """Keeps this call's own weight gradient ``g^T a`` as backward computes it.

        The sum of a batch's per-example weight gradients (what mean balance
        adds to its epoch sum) is, up to the loss scaling, the weight gradient of
        this call, which backward already computes in its ``AddmmBackward0`` /
        ``MmBackward0`` node. A post-hook on that node keeps a reference to it and
        its version counter, so that :meth:`step` adds it to the epoch sum (one
        memory pass instead of an ``(O, B) @ (B, I)`` product). Only this call's
        own contribution is taken (not other uses of the weight). If the tensor is
        changed in place before :meth:`step` (autograd may hand it on as
        ``.grad``, which gradient accumulation, clipping or an optimizer may
        modify), its version moves and the product is used instead. The node is
        recognised by its type and by its weight input leading (through the
        transpose) to ``module.weight``; anything else is left to the product.
        """
        fn = output.grad_fn
        if fn is None or type(fn).__name__ not in ("AddmmBackward0", "MmBackward0"):
            return
        pos = len(fn.next_functions) - 1  # mat2 = weight.T: the last input of both
        t_node = fn.next_functions[pos][0]
        if t_node is None or type(t_node).__name__ != "TBackward0":
            return
        acc = t_node.next_functions[0][0]
        if getattr(acc, "variable", None) is not module.weight:
            return
        shape = tuple(module.weight.shape)

        def sum_hook(grad_inputs: tuple[Any, ...], grad_outputs: tuple[Any, ...]) -> None:
            lst = self._wgrads.setdefault(i, [])
            while len(lst) <= slot:
                lst.append(None)
            gw = grad_inputs[pos]
            # a second backward through the same call, or an unexpected shape: unusable
            ok = lst[slot] is None and isinstance(gw, Tensor) and tuple(gw.shape) == shape[::-1]
            lst[slot] = (gw.detach().T, gw._version) if ok else (None, -1)

        fn.register_hook(sum_hook)

    def _weight_sum(
        self, layer: int, calls: int, scale: float
    ) -> tuple[list[Tensor], float] | None:
        """The captured weight gradients of all ``calls`` of a layer, if all are intact."""
        got = self._wgrads.get(layer, [])
        if len(got) != calls:
            return None
        out = []
        for entry in got:
            if entry is None or entry[0] is None or entry[0]._version != entry[1]:
                return None
            out.append(entry[0])
        return out, scale

    def _sketched_params(self) -> dict[str, Tensor]:
        """Placeholders with the sketched weights' sizes (other parameters as they are)."""
        sk = self.sketch
        assert sk is not None
        out: dict[str, Tensor] = {}
        for name, m in self.layers:
            for n in _trainable(m):
                p = getattr(m, n)
                if n == "weight" and isinstance(m, nn.Embedding):
                    shape = (sk.size(m.num_embeddings), sk.size(m.embedding_dim))
                elif n == "weight" and isinstance(m, nn.Linear):
                    shape = (sk.size(m.out_features), sk.size(m.in_features))
                elif n == "weight" and isinstance(m, _CONVS):
                    groups = int(m.groups)
                    co = int(m.out_channels) // groups
                    ci = p[0].numel()  # in_channels / groups * prod(kernel)
                    shape = (groups * sk.size(co), sk.size(ci))
                else:
                    shape = tuple(p.shape)
                out[f"{name}.{n}"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
        return out

    def clear(self) -> None:
        """Drops the captured activations and gradients (e.g. after an eval pass)."""
        self._inputs.clear()
        self._grads.clear()
        self._wgrads.clear()

    def remove(self) -> None:
        """Detaches the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _layer_rows(
        self, m: nn.Module, xs: list[Tensor], gs: list[Tensor], layer: int = 0
    ) -> list[Rows]:
        b = int(xs[0].shape[0])
        scale = float(b) if self.loss_reduction == "mean" else 1.0
        if isinstance(m, _NORMS):
            # per-example gradients of the affine parameters are as small as the
            # parameters: formed directly, summed over the positions they are shared by
            own = _trainable(m)
            per = (b, -1, math.prod(m.normalized_shape)) if isinstance(m, nn.LayerNorm) else None
            total: dict[str, Tensor] = {}
            for xh, gi in zip(xs, gs):
                for n in own:
                    v = gi * xh if n == "weight" else gi
                    v = v.reshape(per).sum(1) if per else v.reshape(b, v.shape[1], -1).sum(2)
                    total[n] = total[n] + v if n in total else v
            return [DenseRows(total[n] * scale) for n in own]
        if isinstance(m, nn.Embedding):
            idx = torch.cat([x.reshape(b, -1) for x in xs], dim=1)
            g = torch.cat([gi.reshape(b, -1, m.embedding_dim) for gi in gs], dim=1) * scale
            if m.padding_idx is not None:
                g = g * (idx != m.padding_idx).unsqueeze(-1).to(g.dtype)
            if self.sketch is not None:
                return [DenseRows(self.sketch.embedding_rows(layer, idx, g, m.num_embeddings))]
            return [EmbeddingRows(idx, g, m.num_embeddings)]
        if isinstance(m, nn.Linear):
            a = _join([x.reshape(b, -1, m.in_features) for x in xs])
            g = _join([gi.reshape(b, -1, m.out_features) for gi in gs]) * scale
        else:
            assert isinstance(m, _CONVS)
            a = _join([_unfold(m, x) for x in xs])
            out_ch = int(m.out_channels)
            g = _join([gi.reshape(b, out_ch, -1).transpose(1, 2) for gi in gs]) * scale
        a = a.to(g.dtype)
        rows: list[Rows]
        groups = int(getattr(m, "groups", 1))
        if self.sketch is not None:
            rows = [DenseRows(self.sketch.rows(layer, a, g, groups))]
        elif groups == 1:
            fr = FactoredRows(a, g)
            if isinstance(m, nn.Linear):
                fr.row_sum = self._weight_sum(layer, len(xs), scale)
            rows = [fr]
        else:
            ci, co = int(a.shape[2]) // groups, int(g.shape[2]) // groups
            parts = [
                FactoredRows(a[:, :, j * ci : (j + 1) * ci], g[:, :, j * co : (j + 1) * co])
                for j in range(groups)
            ]
            rows = [GroupedRows(parts)]
        bias = getattr(m, "bias", None)
        if isinstance(bias, Tensor) and bias.requires_grad:
            rows.append(DenseRows(g.sum(dim=1)))
        return rows

    @torch.no_grad()
    def step(self) -> None:
        """Balances the batch of the last ``forward`` + ``backward`` and clears the capture.

        Raises:
            RuntimeError: no gradients were captured for some layer (no backward yet).
            ValueError: as :meth:`GraBSampler.step` (the sampler state is unchanged).
        """
        rows: list[Rows] = []
        try:
            for i, (name, m) in enumerate(self.layers):
                xs, gs = self._inputs.get(i, []), self._grads.get(i, [])
                if not xs or len(gs) != len(xs) or any(g.numel() == 0 for g in gs):
                    raise RuntimeError(
                        f"no captured output gradient for layer {name!r}: call step() after "
                        "loss.backward() of a training-mode forward pass"
                    )
                rows.extend(self._layer_rows(m, xs, gs, i))
        finally:
            self.clear()
        self.sampler._step_rows(rows)
