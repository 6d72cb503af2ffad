"""Sign rules, the two-ended placement of examples, and the balancer interface.

Vectors handled by a balancer are written in *row coordinates*: a
coefficient vector over the rows of the matrix returned by
:meth:`grabsampler._bank.AuxBank.batch_gram` (the ``B`` examples of the batch,
then the ``k`` stored vectors). A centered gradient ``x_i - m`` is
``e_i - e_m``, a pair difference is ``e_a - e_b``. Inner products are then
``c^T R c'`` with the small float64 matrix ``R``.

Balancing (Lu et al., 2022, Alg. 4) keeps a running sum ``s`` and picks for
each incoming vector ``c`` a sign ``eps``:

* deterministic: ``eps = +1`` if ``<s, c> < 0`` else ``-1``
  (``||s + eps c||`` is the smaller of the two);
* probabilistic (self-balancing walk, Alweiss, Liu and Sawhney, 2021):
  ``eps = +1`` with probability ``clip(1/2 - <s, c> / (2 C), 0, 1)``; the
  walk's guarantee needs ``||c|| <= 1``, so vectors are normalized to unit
  norm by default in this mode.

Signs decided one after another within a batch use ``<s_t, c_k> = <s_0, c_k>
+ sum_{j<k} eps_j <c_j, c_k>`` (the within-batch Gram matrix), which is the
same recursion as one-at-a-time balancing, without touching ``d``-sized data.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["Balancer", "Decider", "Gram", "TwoEnded", "Update", "gram_tensor", "split_delta"]

#: change of the stored vectors: (indices ``changed`` of the vectors that change,
#: weights ``(len(changed), B)`` of the batch rows, terms ``(j, i, c)`` adding
#: ``c`` times stored vector ``i`` to vector ``changed[j]``)
Update = tuple[list[int], Tensor | list[list[float]], list[tuple[int, int, float]]]

#: the inner-product matrix handed to :meth:`Balancer.step`: nested lists of floats
#: for balancers with ``host_gram = True``, else a float64 tensor
Gram = Tensor | list[list[float]]


def gram_tensor(gram: Gram) -> Tensor:
    """The inner-product matrix as a float64 tensor."""
    return gram if isinstance(gram, Tensor) else torch.tensor(gram, dtype=torch.float64)


def split_delta(delta: Tensor, b: int) -> Update:
    """Turns a ``(k, B + k)`` change matrix into an :data:`Update` (changed rows only)."""
    changed = [int(i) for i in torch.nonzero(delta.abs().sum(dim=1)).flatten().tolist()]
    wx = delta[changed, :b]
    wa = delta[changed, b:].tolist()
    terms = [(j, i, c) for j, row in enumerate(wa) for i, c in enumerate(row) if c != 0.0]
    return changed, wx, terms


class Decider:
    """Deterministic or probabilistic sign rule with optional normalization.

    Args:
        probabilistic: use the self-balancing walk instead of the greedy sign.
        c: the walk's scale ``C`` (larger is closer to a fair coin).
        normalize: scale every balanced vector to unit norm first.
        generator: source of the walk's uniforms.
    """

    def __init__(
        self, probabilistic: bool, c: float, normalize: bool, generator: torch.Generator
    ) -> None:
        self.probabilistic = probabilistic
        self.c = float(c)
        self.normalize = normalize
        self.generator = generator

    def uniforms(self, count: int) -> list[float]:
        """Draws ``count`` uniforms (none in deterministic mode)."""
        if not self.probabilistic or count == 0:
            return []
        return torch.rand(count, generator=self.generator, dtype=torch.float64).tolist()

    def sign(self, dot: float, u: float | None) -> int:
        """The sign for a vector whose inner product with the running sum is ``dot``."""
        if not self.probabilistic:
            return 1 if dot < 0 else -1
        p = min(1.0, max(0.0, 0.5 - dot / (2.0 * self.c)))
        assert u is not None
        return 1 if u < p else -1

    def scales(self, sq_norms: Tensor) -> Tensor:
        """Per-vector factors ``1/||c||`` (0 for a zero vector); used when normalizing."""
        nrm = sq_norms.clamp_min(0).sqrt()
        return torch.where(nrm > 0, 1.0 / torch.where(nrm > 0, nrm, 1.0), 0.0)

    def walk(
        self, coef: Tensor, gram: Tensor, s: Tensor, *, sequential: bool = True
    ) -> tuple[list[int], Tensor]:
        """Balances the vectors ``coef`` (rows, in row coordinates) against the sum ``s``.

        Args:
            coef: ``(K, R)`` vectors to balance, in order.
            gram: ``(R, R)`` inner products of the row basis.
            s: ``(R,)`` running sum at the start.
            sequential: update the running sum after every vector (False: all
                signs against ``s``, as in batch balance).

        Returns:
            The signs and the (normalized) vectors, so that the new running sum
            is ``s + sum_k eps_k coef_k``.
        """
        k = int(coef.shape[0])
        if k == 0:
            return [], coef
        cr = coef @ gram
        a = cr @ s
        v = cr @ coef.T
        if self.normalize:
            sc = self.scales(torch.diagonal(v))
            coef = coef * sc[:, None]
            a = a * sc
            v = v * sc[:, None] * sc[None, :]
        us = self.uniforms(k)
        al = a.tolist()
        eps: list[int] = []
        if sequential:
            vl = v.tolist()
            for i in range(k):
                e = self.sign(al[i], us[i] if us else None)
                eps.append(e)
                row = vl[i]
                for j in range(i + 1, k):
                    al[j] += e * row[j]
        else:
            eps = [self.sign(al[i], us[i] if us else None) for i in range(k)]
        return eps, coef


class TwoEnded:
    """Next-epoch order filled from both ends: ``+1`` at the front, ``-1`` at the back.

    Reading the result front to back gives the positives in arrival order
    followed by the negatives in reverse arrival order (Lu et al., 2022, Alg. 2).
    """

    def __init__(self, n: int) -> None:
        self.slots = [-1] * n
        self.left = 0
        self.right = n - 1

    def put(self, index: int, sign: int) -> None:
        if sign > 0:
            self.slots[self.left] = index
            self.left += 1
        else:
            self.slots[self.right] = index
            self.right -= 1

    def put_many(self, indices: list[int], signs: list[int]) -> None:
        """``put`` for several examples in order."""
        front = [i for i, e in zip(indices, signs) if e > 0]
        back = [i for i, e in zip(indices, signs) if e <= 0]
        self.put_split(front, back)

    def put_split(self, front: list[int], back: list[int]) -> None:
        """``put`` for several examples: ``front`` signed ``+1``, ``back`` ``-1`` (each in order)."""
        if self.left + len(front) > self.right + 1 - len(back):
            raise RuntimeError("internal error: more examples placed than the epoch holds")
        self.slots[self.left : self.left + len(front)] = front
        self.left += len(front)
        if back:
            self.slots[self.right - len(back) + 1 : self.right + 1] = back[::-1]
            self.right -= len(back)

    def finish(self, middle: list[int]) -> list[int]:
        """Fills the unplaced middle with ``middle`` (examples not balanced) and returns."""
        if len(middle) != self.right - self.left + 1:
            raise RuntimeError("internal error: placement does not cover the epoch")
        self.slots[self.left : self.right + 1] = middle
        return list(self.slots)

    def state(self) -> dict[str, Any]:
        return {
            "slots": torch.tensor(self.slots, dtype=torch.int64),
            "left": self.left,
            "right": self.right,
        }

    def load(self, st: dict[str, Any]) -> None:
        self.slots = [int(v) for v in st["slots"].tolist()]
        self.left = int(st["left"])
        self.right = int(st["right"])


class Balancer:
    """Interface of one balance type.

    A balancer sees an epoch as ``start_epoch(order)``, a sequence of
    ``step(gram, indices)`` calls and ``end_epoch(unvisited)``; the stored
    vectors live in an :class:`~grabsampler._bank.AuxBank` owned by the sampler.

    Args:
        n: number of examples.
        decider: the sign rule.
    """

    name = "base"
    uses_gradients = True
    #: trailing stored vectors that never enter inner products
    passive = 0
    #: ``step`` takes the inner-product matrix as nested lists of floats (else a tensor)
    host_gram = False
    #: the entries ``(p, q)`` of the stored vectors' own inner products that ``step``
    #: reads (None: all of them); the one-block fast path tracks only these on the host
    stored_reads: tuple[tuple[int, int], ...] | None = None

    def __init__(self, n: int, decider: Decider) -> None:
        self.n = n
        self.decider = decider

    def aux_rows(self, batch_size: int) -> int:
        """Number of stored vectors needed before a batch of ``batch_size`` arrives."""
        return 0

    def start_epoch(self, order: list[int]) -> None:
        raise NotImplementedError

    def step(self, gram: Gram, indices: list[int]) -> Update | None:
        """Balances one batch; returns the change of the stored vectors."""
        raise NotImplementedError

    def end_epoch(self, unvisited: list[int]) -> tuple[list[int], Tensor | None]:
        """Returns the next order and the map applied to the stored vectors (or None)."""
        raise NotImplementedError

    def initial_order(self, generator: torch.Generator, shuffle: bool) -> list[int]:
        """The first epoch's order."""
        if shuffle:
            return torch.randperm(self.n, generator=generator).tolist()
        return list(range(self.n))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
