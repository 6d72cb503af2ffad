"""Batch balance: every sign of a batch decided against the running sum at its start.

Like mean balance (stale-mean centering, two-ended placement), but the
examples of one batch do not see each other: ``eps_i = sign rule(<s, c_i>)``
for all ``i`` at once, then ``s += sum_i eps_i c_i``. It needs only the
inner products of the batch with ``s`` and ``m`` (no within-batch Gram
matrix), and trades some balancing quality for that.
"""

from __future__ import annotations

from grabsampler.balance.mean import MeanBalance

__all__ = ["BatchBalance"]


class BatchBalance(MeanBalance):
    """Mean balance with the signs of a batch decided in parallel."""

    name = "batch"
    sequential = False
