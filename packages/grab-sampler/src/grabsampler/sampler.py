"""``GraBSampler``: example ordering by online gradient balancing.

Usage (the per-sample-gradient route)::

    sampler = GraBSampler(dataset, params)           # params: dict of tensors
    loader = DataLoader(dataset, batch_size=16, sampler=sampler)
    for epoch in range(E):
        for x, y in loader:                           # iter() starts an epoch
            g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
            sampler.step(g)                           # balance this batch
            ...                                       # optimizer update

The order balanced during epoch ``e`` is the order of epoch ``e + 1``: it
takes effect when the next iterator is created.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Sampler

from grabsampler._bank import AuxBank
from grabsampler._rows import Rows, rows_from_grads
from grabsampler.balance import BALANCERS, Balancer, Decider
from grabsampler.balance.recursive import RecursiveBalance

__all__ = ["BALANCE_TYPES", "GraBSampler"]

BALANCE_TYPES = tuple(BALANCERS)
_ALIASES = {"recursive-pair": "recursive_pair", "random": "rr", "shuffle_once": "so"}


def _param_list(
    trainable_params: Mapping[str, Tensor] | Iterable[Tensor],
) -> tuple[list[str], list[Tensor]]:
    if isinstance(trainable_params, Mapping):
        names = [str(k) for k in trainable_params]
        tensors = list(trainable_params.values())
    elif isinstance(trainable_params, Tensor):
        names, tensors = ["0"], [trainable_params]
    elif isinstance(trainable_params, Iterable):
        tensors = list(trainable_params)
        names = [str(i) for i in range(len(tensors))]
    else:
        raise TypeError(
            "trainable_params must be a dict of tensors or an iterable of tensors, got "
            f"{type(trainable_params).__name__}"
        )
    if not tensors:
        raise ValueError("trainable_params is empty")
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"trainable_params: expected tensors, got {type(t).__name__}")
    return names, tensors


def make_balancer(balance_type: str, n: int, decider: Decider, depth: int) -> tuple[str, Balancer]:
    """Builds the balancer named ``balance_type`` (``ValueError`` if unknown)."""
    if not isinstance(balance_type, str):
        balance_type = str(getattr(balance_type, "value", balance_type))
    key = _ALIASES.get(balance_type, balance_type)
    if key not in BALANCERS:
        raise ValueError(f"balance_type must be one of {BALANCE_TYPES}, got {balance_type!r}")
    if key == "recursive":
        return key, RecursiveBalance(n, decider, depth=depth)
    return key, BALANCERS[key](n, decider)


class GraBSampler(Sampler[int]):
    """Sampler whose next-epoch order balances this epoch's per-example gradients.

    Args:
        data_source: the data set (only ``len`` is used).
        trainable_params: the parameters the gradients belong to (dict or iterable
            of tensors); fixes ``d`` and the split of a ``(B, d)`` input.
        balance_type: ``"mean"`` (vanilla GraB), ``"pair"``, ``"recursive"``,
            ``"recursive_pair"``, ``"batch"``, ``"rr"`` (random reshuffling) or
            ``"so"`` (shuffle once).
        probabilistic: self-balancing walk instead of greedy signs.
        prob_c: the walk's constant ``C``.
        normalize: balance unit-norm vectors (default: ``probabilistic``).
        depth: tree depth of ``"recursive"``.
        random_first_epoch: shuffle the first epoch (else ``0..n-1``).
        seed: seed of the sampler's own ``torch.Generator``.
        dtype: dtype of the stored vectors (default: the parameters').
        device: device of the stored vectors (default: the parameters').
        **compat: the original release's ``prob_balance``, ``prob_balance_c`` and
            ``normalize_grads`` (mapped to the arguments above); ``timer``,
            ``record_orders``, ``batch_size``, ``record_herding`` (accepted, no effect).

    Raises:
        ValueError: unknown balance type, empty data or parameters, bad ``prob_c``.
    """

    def __init__(
        self,
        data_source: Sized,
        trainable_params: Mapping[str, Tensor] | Iterable[Tensor],
        balance_type: str = "mean",
        *,
        probabilistic: bool = False,
        prob_c: float = 30.0,
        normalize: bool | None = None,
        depth: int = 4,
        random_first_epoch: bool = True,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **compat: Any,
    ) -> None:
        # keyword names of the original release, mapped or accepted without effect
        probabilistic = bool(compat.pop("prob_balance", probabilistic))
        prob_c = float(compat.pop("prob_balance_c", prob_c))
        normalize = compat.pop("normalize_grads", normalize)
        for name in ("timer", "record_orders", "batch_size", "record_herding"):
            compat.pop(name, None)
        if compat:
            raise TypeError(f"GraBSampler got unexpected keyword arguments {sorted(compat)}")
        try:
            n = len(data_source)
        except TypeError as err:
            raise TypeError("data_source must have a length") from err
        if n <= 0:
            raise ValueError("data_source is empty")
        if not prob_c > 0:
            raise ValueError(f"prob_c must be positive, got {prob_c}")
        self.n = int(n)
        self.names, tensors = _param_list(trainable_params)
        self.sizes = [int(t.numel()) for t in tensors]
        self.d = int(sum(self.sizes))
        floats = [t for t in tensors if t.is_floating_point()]
        self.dtype = dtype or (floats[0].dtype if floats else torch.float32)
        self.device = torch.device(device) if device is not None else tensors[0].device
        self.generator = torch.Generator().manual_seed(int(seed))
        self.decider = Decider(
            probabilistic, prob_c, probabilistic if normalize is None else normalize, self.generator
        )
        self.balance_type, self.balancer = make_balancer(balance_type, self.n, self.decider, depth)
        self.random_first_epoch = random_first_epoch
        self.bank = AuxBank(
            self.sizes,
            self.balancer.aux_rows(1),
            self.dtype,
            self.device,
            passive=self.balancer.passive,
            reads=self.balancer.stored_reads,
        )
        #: the fast path of :meth:`_flat_step` applies (one small block, list-based balancer)
        self._flat_ok = (
            self.bank.has_small
            and len(self.bank.groups) == 1
            and self.balancer.host_gram
            and self.balancer.uses_gradients
        )
        self._pshapes = [tuple(t.shape) for t in tensors]
        self.epoch = -1
        self.in_epoch = False
        self.position = 0
        self.order: list[int] = []
        self._resume = False

    # ------------------------------------------------------------------ epochs
    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        if self._resume:
            self._resume = False
            return iter(self.order[self.position :])
        self._start_epoch()
        return iter(list(self.order))

    def _start_epoch(self) -> None:
        if self.epoch < 0:
            order = self.balancer.initial_order(self.generator, self.random_first_epoch)
        else:
            order, mat = self.balancer.end_epoch(self.order[self.position :])
            if mat is not None:
                self.bank.transform(mat)
        self.order = order
        self.position = 0
        self.epoch += 1
        self.in_epoch = True
        self.balancer.start_epoch(order)

    # -------------------------------------------------------------------- step
    def step(
        self, per_sample_grads: Mapping[str, Tensor] | Sequence[Tensor] | Tensor, *_: Any
    ) -> None:
        """Balances one batch of per-example gradients (in the order they were drawn).

        Args:
            per_sample_grads: dict ``name -> (B, *shape)`` from
                ``vmap(grad(...))``, a list of such tensors, or one ``(B, d)`` tensor.

        Raises:
            RuntimeError: no epoch has been started (iterate the sampler first).
            TypeError / ValueError: malformed input, size mismatch with
                ``trainable_params``, a batch larger than the data or than what is
                left of the epoch, non-finite gradients. The sampler is unchanged.
        """
        if type(per_sample_grads) is dict and self._flat_ok and self._flat_step(per_sample_grads):
            return
        with torch.no_grad():
            self._step_rows(rows_from_grads(per_sample_grads, self.names, self.sizes))

    def _flat_step(self, grads: dict[str, Tensor]) -> bool:
        """Fast path for small models: a dict of well-formed gradients, one small block.

        Returns False, with nothing changed, when the input needs the general
        path (which also produces the error messages). The checks here are
        cheap ones (names, exact shapes, dtype, device, no autograd history,
        room left in the epoch); the views of the bank's workspace that the
        gradients are copied into are cached per batch size.
        """
        if len(grads) != len(self.names) or not self.in_epoch:
            return False
        ts = [grads.get(name) for name in self.names]
        t0 = ts[0]
        if t0 is None or not t0.dim():
            return False
        b = t0.shape[0]
        bank = self.bank
        plan = bank._plans.get(b)
        if plan is None:
            if b <= 0 or self.balancer.aux_rows(b) > bank.k:
                return False
            plan = bank.flat_plan(b, self._pshapes)
        if self.position + b > self.n:
            return False
        dtype, device = self.dtype, self.device
        for t, shape in zip(ts, plan.shapes):
            if (
                t is None
                or t.shape != shape
                or t.dtype != dtype
                or t.device != device
                or t.requires_grad
            ):
                return False
        # nothing below records autograd history: the inputs do not require
        # gradients and the workspace and stored vectors never do
        g = bank.flat_gram(ts, b)  # type: ignore[arg-type]
        if not math.isfinite(sum(map(sum, g[:b]))):
            raise ValueError(
                "per_sample_grads contain non-finite values (inf or nan, or too large to square)"
            )
        update = self.balancer.step(g, self.order[self.position : self.position + b])
        if update is not None:
            bank.flat_apply(*update)
        self.position += b
        return True

    def _check_batch(self, b: int) -> None:
        if not self.in_epoch:
            raise RuntimeError("step() called before an epoch started: iterate the sampler first")
        if b <= 0:
            raise ValueError("per_sample_grads: empty batch")
        if b > self.n:
            raise ValueError(f"batch of {b} examples is larger than the data set ({self.n})")
        if self.position + b > self.n:
            raise ValueError(
                f"step() got {b} examples but only {self.n - self.position} of this epoch's "
                f"{self.n} are left: step() was called more times than the epoch has examples"
            )

    def _step_rows(self, rows: Sequence[Rows]) -> None:
        b = self.bank.check_rows(rows)
        self._check_batch(b)
        indices = self.order[self.position : self.position + b]
        if not self.balancer.uses_gradients:
            total = torch.stack([r.gram().diagonal().sum().to(torch.float64) for r in rows]).sum()
            if not bool(torch.isfinite(total)):
                raise ValueError(
                    "per_sample_grads contain non-finite values (inf or nan, or too large to square)"
                )
            self.position += b
            return
        k = self.balancer.aux_rows(b)
        if k > self.bank.k:
            self.bank.grow(k)
        if self.bank.track and self._diff_step(rows, b, indices):
            return
        g, brows = self.bank.gram_lists(rows)
        # a nan or inf entry (or a square that overflows) makes the sum non-finite
        if not math.isfinite(sum(map(sum, g[:b]))):
            raise ValueError(
                "per_sample_grads contain non-finite values (inf or nan, or too large to square)"
            )
        gram = g if self.balancer.host_gram else torch.tensor(g, dtype=torch.float64)
        update = self.balancer.step(gram, indices)
        if update is not None:
            self.bank.apply(rows, brows, *update)
        self.position += b

    def _diff_step(self, rows: Sequence[Rows], b: int, indices: list[int]) -> bool:
        """Pair balance of wide gradients from the pair differences (False: not taken).

        With greedy signs, no waiting example and an even batch, pair balance
        needs only the differences' inner products (with each other and with the
        running sum): a ``B/2 x B/2`` product over differences formed in cached
        column chunks, in place of the ``B x B`` Gram matrix.
        """
        ready = getattr(self.balancer, "diff_ready", None)
        if ready is None or not ready(b):
            return False
        got = self.bank.pair_diff_lists(rows, b)
        if got is None:
            return False
        dm, brows = got
        if not math.isfinite(sum(map(sum, dm))):
            raise ValueError(
                "per_sample_grads contain non-finite values (inf or nan, or too large to square)"
            )
        changed, wx, terms = self.balancer.diff_step(dm, indices)  # type: ignore[attr-defined]
        self.bank.apply(rows, brows, changed, wx, terms, track=False)
        self.bank.track_pair_step(dm, wx[0][0::2])
        self.position += b
        return True

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, mid-epoch included (tensors and plain values)."""
        return {
            "balance_type": self.balance_type,
            "n": self.n,
            "d": self.d,
            "epoch": self.epoch,
            "in_epoch": self.in_epoch,
            "position": self.position,
            "order": torch.tensor(self.order, dtype=torch.int64),
            "balancer": self.balancer.state_dict(),
            "aux": self.bank.state(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict`; a run stopped mid-epoch continues that epoch.

        After loading, the next ``iter(sampler)`` yields the rest of the
        interrupted epoch (the examples not yet passed to :meth:`step`).

        Raises:
            ValueError: the state belongs to another balance type, ``n`` or ``d``.
        """
        for key, mine in (("balance_type", self.balance_type), ("n", self.n), ("d", self.d)):
            if state.get(key) != mine:
                raise ValueError(
                    f"state_dict: {key} is {state.get(key)!r}, this sampler has {mine!r}"
                )
        self.bank.load(state["aux"])
        self.balancer.load_state_dict(dict(state["balancer"]))
        self.generator.set_state(state["generator"])
        self.epoch = int(state["epoch"])
        self.in_epoch = bool(state["in_epoch"])
        self.position = int(state["position"])
        self.order = [int(v) for v in state["order"].tolist()]
        self._resume = self.in_epoch and self.position < len(self.order)
