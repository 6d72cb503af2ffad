"""K-FAC for the projections of ``nn.MultiheadAttention``.

``nn.MultiheadAttention`` applies its four projections (query, key, value through the
packed ``in_proj_weight`` / ``in_proj_bias``, and ``out_proj``) functionally, so no
hook sees their inputs and outputs. The block re-runs the attention from the recorded
call with the projections exposed (:func:`attention_parts`) and back-propagates the
recorded per-example output gradients to the projection outputs. Every projection
``p`` then gets the K-FAC factors of a ``Linear`` applied to a sequence:

* ``A_p = a^T a / (B L)`` over the rows ``a`` (one per example and position, with a
  trailing one for the bias) of the projection's input (the query / key / value inputs,
  and the concatenated heads for ``out_proj``),
* ``G_p = sum_l g_l g_l^T / B`` over the per-example gradients ``g_l`` of the loss with
  respect to the projection's output,

and is preconditioned by ``(A_p + pi sqrt(l) I)^-1 (x) (G_p + sqrt(l)/pi I)^-1`` as the
``Kron`` block does. Supported: packed projections (``kdim == vdim == embed_dim``), no
``add_bias_kv`` / ``add_zero_attn``, no attention dropout (the re-run must reproduce
the call); other configurations use ``Diag``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capture import Record
from .shapes import LayerCurvature, _kron_inverses, _pi_damping, _randn

__all__ = ["PROJECTIONS", "AttentionKron", "attention_kron_supported", "attention_parts"]

PROJECTIONS = ("q", "k", "v", "o")


def attention_kron_supported(m: nn.Module) -> bool:
    """Whether :class:`AttentionKron` handles this ``nn.MultiheadAttention``."""
    return (
        isinstance(m, nn.MultiheadAttention)
        and m._qkv_same_embed_dim
        and m.in_proj_weight is not None
        and m.bias_k is None
        and m.bias_v is None
        and not m.add_zero_attn
        and m.dropout == 0.0
        and (m.in_proj_bias is None) == (m.out_proj.bias is None)
    )


def _call_args(rec: Record) -> dict:
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
    args = dict(zip(names, rec.inputs))
    args.update(rec.kwargs)
    return args


def _float_mask(mask: Tensor | None, like: Tensor) -> Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:  # nn.MultiheadAttention: True = not allowed
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(like.dtype)


def attention_parts(
    m: nn.MultiheadAttention, rec: Record
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Re-run a recorded call of ``m`` (batch first) exposing the projections.

    Returns:
        ``inputs`` (query, key, value inputs and the concatenated heads, each
        ``(B, L, E)``), ``outputs`` (the q, k, v projection outputs, requiring grad) and
        the attention output ``(B, T, E)`` (a function of ``outputs``).
    """
    a = _call_args(rec)
    q_in, k_in, v_in = a["query"], a["key"], a["value"]
    if q_in.dim() == 2:  # unbatched call
        q_in, k_in, v_in = q_in.unsqueeze(0), k_in.unsqueeze(0), v_in.unsqueeze(0)
    elif not m.batch_first:
        q_in, k_in, v_in = q_in.transpose(0, 1), k_in.transpose(0, 1), v_in.transpose(0, 1)
    E, H = m.embed_dim, m.num_heads
    W = m.in_proj_weight.detach()
    b = None if m.in_proj_bias is None else m.in_proj_bias.detach()
    outs = []
    for i, x in enumerate((q_in, k_in, v_in)):
        bi = None if b is None else b[i * E : (i + 1) * E]
        outs.append(F.linear(x, W[i * E : (i + 1) * E], bi).detach().requires_grad_(True))
    B, T, S = q_in.shape[0], q_in.shape[1], k_in.shape[1]
    q, k, v = (t.reshape(B, -1, H, E // H).transpose(1, 2) for t in outs)
    mask = _float_mask(a.get("attn_mask"), q)
    if mask is not None:
        mask = mask.reshape(B, H, T, S) if mask.dim() == 3 else mask.reshape(1, 1, T, S)
    kpm = _float_mask(a.get("key_padding_mask"), q)
    if kpm is not None:
        kpm = kpm.reshape(-1, 1, 1, S)
        mask = kpm if mask is None else mask + kpm
    causal = bool(a.get("is_causal", False)) and mask is None
    heads = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    o_in = heads.transpose(1, 2).reshape(B, T, E)
    bo = None if m.out_proj.bias is None else m.out_proj.bias.detach()
    out = F.linear(o_in, m.out_proj.weight.detach(), bo)
    return [q_in, k_in, v_in, o_in.detach()], outs, out


def _rows(x: Tensor, bias: bool) -> Tensor:
    a = x.reshape(-1, x.shape[-1])
    if bias:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    return a


class AttentionKron(LayerCurvature):
    """K-FAC block over the four projections of an ``nn.MultiheadAttention``."""

    shape = "Kron"

    @staticmethod
    def expected_names(m: nn.MultiheadAttention) -> list[str]:
        """The parameter names the block covers (all must be trainable)."""
        if m.in_proj_bias is None:
            return ["in_proj_weight", "out_proj.weight"]
        return ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]

    def __init__(
        self,
        name: str,
        module: nn.Module,
        names: list[str],
        params: list[nn.Parameter],
        bdim: int,
    ) -> None:
        super().__init__(name, module, names, params, bdim)
        assert isinstance(module, nn.MultiheadAttention)
        self.bias = module.in_proj_bias is not None
        self.E = module.embed_dim
        expected = self.expected_names(module)
        if names != expected:
            raise ValueError(
                f"attention block {name!r}: Kron needs all projection parameters trainable "
                f"({expected}), got {names}"
            )

    # -- estimation -------------------------------------------------------------
    def estimate(self, records: list[Record]) -> dict[str, Tensor] | None:
        m = self.module
        assert isinstance(m, nn.MultiheadAttention)
        acc: dict[str, Tensor] = {}
        n = 0
        for rec in records:
            if not rec.grads:
                continue
            n += 1
            with torch.enable_grad():
                inputs, outs, out = attention_parts(m, rec)
                est: dict[str, Tensor] = {}
                for p, x in zip(PROJECTIONS, inputs):
                    a = _rows(x.detach(), self.bias)
                    est["A" + p] = a.T @ a / a.shape[0]
                for g, w in rec.grads:
                    g = g.unsqueeze(0) if g.dim() == 2 else g
                    if not m.batch_first and rec.inputs[0].dim() == 3:
                        g = g.transpose(0, 1)
                    B = g.shape[0]
                    gq = torch.autograd.grad(out, outs, g, retain_graph=True)
                    for p, gp in zip(PROJECTIONS, (*gq, g)):
                        r = gp.reshape(-1, gp.shape[-1])
                        Gp = r.T @ r * (w / B)
                        est["G" + p] = Gp if "G" + p not in est else est["G" + p] + Gp
            for k, v in est.items():
                acc[k] = v if k not in acc else acc[k] + v
        if not acc:
            return None
        return {k: v / n for k, v in acc.items()}

    def init_factors(self, precision: float) -> dict[str, Tensor]:
        w = self.params[0]
        r = math.sqrt(precision)
        k = self.E + (1 if self.bias else 0)
        out = {}
        for p in PROJECTIONS:
            out["A" + p] = r * torch.eye(k, dtype=w.dtype, device=w.device)
            out["G" + p] = r * torch.eye(self.E, dtype=w.dtype, device=w.device)
        return out

    # -- inversion / preconditioning ---------------------------------------------
    def inverse(self, f: dict[str, Tensor], damping: float, opts: dict) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for p in PROJECTIONS:
            A, G = f["A" + p], f["G" + p]
            da, dg = _pi_damping(A, G, damping, opts)
            # "A_inv" -> "Aq_inv", ... : the same factors per projection
            for k, v in _kron_inverses(A, G, da, dg, bool(opts.get("chol"))).items():
                out[k[0] + p + k[1:]] = v
        return out

    def _matrices(self, grads: list[Tensor]) -> list[Tensor]:
        """The gradient of every projection as an ``(E, E[+1])`` matrix."""
        E = self.E
        if self.bias:
            w_in, b_in, w_o, b_o = grads
            ins = [torch.cat([w_in[i * E : (i + 1) * E], b_in[i * E : (i + 1) * E, None]], 1)
                   for i in range(3)]  # fmt: skip
            return [*ins, torch.cat([w_o, b_o[:, None]], 1)]
        w_in, w_o = grads
        return [w_in[i * E : (i + 1) * E] for i in range(3)] + [w_o]

    def _unmatrix(self, mats: list[Tensor]) -> list[Tensor]:
        if self.bias:
            w_in = torch.cat([u[:, :-1] for u in mats[:3]], 0)
            b_in = torch.cat([u[:, -1] for u in mats[:3]], 0)
            return [w_in, b_in, mats[3][:, :-1].contiguous(), mats[3][:, -1].contiguous()]
        return [torch.cat(mats[:3], 0), mats[3]]

    def precondition(self, inv: dict[str, Tensor], grads: list[Tensor]) -> list[Tensor]:
        return self.precondition_dot(inv, grads)[0]

    def precondition_dot(
        self, inv: dict[str, Tensor], grads: list[Tensor]
    ) -> tuple[list[Tensor], Tensor]:
        Vs = self._matrices(grads)
        Us = [inv["G" + p + "_inv"] @ V @ inv["A" + p + "_inv"] for p, V in zip(PROJECTIONS, Vs)]
        dot = sum((U * V).sum() for U, V in zip(Us, Vs))
        return self._unmatrix(Us), dot  # type: ignore[return-value]

    def quad(self, f: dict[str, Tensor], vs: list[Tensor]) -> Tensor:
        Vs = self._matrices(vs)
        return sum(  # type: ignore[return-value]
            ((f["G" + p] @ V) * (V @ f["A" + p])).sum() for p, V in zip(PROJECTIONS, Vs)
        )

    def sample(
        self, inv: dict[str, Tensor], scale: float, gen: torch.Generator | None
    ) -> list[Tensor]:
        s = math.sqrt(scale)
        mats = []
        for p in PROJECTIONS:
            LA, LG = inv["A" + p + "_chol"], inv["G" + p + "_chol"]
            Z = _randn((LG.shape[0], LA.shape[0]), LG, gen)
            X = torch.linalg.solve_triangular(LG.T, Z, upper=True)
            mats.append(s * torch.linalg.solve_triangular(LA, X, upper=False, left=False))
        return self._unmatrix(mats)

    def cost(self) -> float:
        k = self.E + (1 if self.bias else 0)
        return 4.0 * (float(k) ** 3 + float(self.E) ** 3)
