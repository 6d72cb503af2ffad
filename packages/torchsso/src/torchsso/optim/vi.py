"""``VIOptimizer``: variational inference by noisy natural gradient (VOGN, noisy K-FAC).

The posterior ``q(w) = N(mu, Sigma)`` has, block by block, precision
``(N / tau) (C + delta)`` where ``C`` is the curvature (``Diag``: VOGN, ``Kron``:
noisy K-FAC, ``Full``), ``N`` the data-set size, ``tau`` the KL weighting
(temperature) and ``delta = tau / (N * prior_variance)`` the scaled prior precision.
One step

1. draws ``num_mc_samples`` weights ``w = mu + eps``, ``eps ~ N(0, Sigma)`` (Cholesky
   factors of the damped Kronecker factors from ``torch.linalg`` for Kron),
2. runs the closure at each, averaging gradients and curvature over the samples,
3. updates ``mu <- mu - lr * (C + delta)^-1 (g + delta * mu)`` (with momentum).

References: K. Osawa et al., "Practical Deep Learning with Bayesian Principles",
NeurIPS 2019 (VOGN); G. Zhang et al., "Noisy Natural Gradient as Variational
Inference", ICML 2018 (noisy K-FAC).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from optcore.distributed import get_rank

from ..curvature.shapes import LayerCurvature
from .second_order import SecondOrderOptimizer

__all__ = ["VIOptimizer", "prediction"]

# model -> weak reference to its VIOptimizer (weak both ways: the optimizer holds the model)
_REGISTRY: weakref.WeakKeyDictionary[nn.Module, weakref.ref[VIOptimizer]] = (
    weakref.WeakKeyDictionary()
)


class VIOptimizer(SecondOrderOptimizer):
    """Variational inference with a Gaussian posterior preconditioned by the curvature.

    Args:
        model: the network.
        dataset_size: number of training examples ``N``.
        curv_type: as in :class:`SecondOrderOptimizer` (``"Cov"`` with ``"Diag"`` is VOGN).
        curv_shapes: as in :class:`SecondOrderOptimizer`.
        curv_kwargs: as in :class:`SecondOrderOptimizer`; ``damping`` (default 0) is
            added to the prior precision ``delta``; ``ema_decay`` is the weight of the
            new estimate (default 0.1).
        lr: learning rate of the mean.
        momentum: momentum of the mean update.
        momentum_type: ``"preconditioned"`` or ``"raw"``.
        num_mc_samples: weight samples per step (each runs the closure once).
        val_num_mc_samples: default number of samples of :meth:`prediction`.
        kl_weighting: KL weighting ``tau`` (1: the Bayesian posterior).
        warmup_kl_weighting_init: the weighting starts at this fraction of
            ``kl_weighting`` ...
        warmup_kl_weighting_steps: ... and grows linearly to it over these steps
            (``None``: no warm-up).
        prior_variance: variance of the zero-mean Gaussian prior.
        init_precision: curvature before the first estimate (``None``: the first
            step runs at the mean and estimates it).
        seed: seed of the noise generator (offset by the rank in distributed runs so
            that ranks draw distinct samples).
        **kwargs: ``acc_steps``, ``curv_interval``, ``inv_interval``, ``kl_clip`` (default
            ``None`` here) of
            :class:`SecondOrderOptimizer`.
    """

    def __init__(
        self,
        model: nn.Module,
        dataset_size: int,
        curv_type: str,
        curv_shapes: dict[str, str] | str,
        curv_kwargs: dict[str, Any] | None = None,
        *,
        lr: float = 0.01,
        momentum: float = 0.0,
        momentum_type: str = "preconditioned",
        num_mc_samples: int = 1,
        val_num_mc_samples: int = 10,
        kl_weighting: float = 1.0,
        warmup_kl_weighting_init: float = 0.01,
        warmup_kl_weighting_steps: int | None = None,
        prior_variance: float = 1.0,
        init_precision: float | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(dataset_size, int) or dataset_size < 1:
            raise ValueError(f"dataset_size must be a positive int, got {dataset_size!r}")
        if not isinstance(num_mc_samples, int) or num_mc_samples < 1:
            raise ValueError(f"num_mc_samples must be a positive int, got {num_mc_samples!r}")
        if not isinstance(val_num_mc_samples, int) or val_num_mc_samples < 0:
            raise ValueError(f"val_num_mc_samples must be an int >= 0, got {val_num_mc_samples!r}")
        if kl_weighting <= 0:
            raise ValueError(f"kl_weighting must be > 0, got {kl_weighting}")
        if not 0 < warmup_kl_weighting_init <= 1:
            raise ValueError("warmup_kl_weighting_init must be in (0, 1]")
        if warmup_kl_weighting_steps is not None and warmup_kl_weighting_steps < 1:
            raise ValueError("warmup_kl_weighting_steps must be >= 1 or None")
        if prior_variance <= 0:
            raise ValueError(f"prior_variance must be > 0, got {prior_variance}")
        if init_precision is not None and init_precision <= 0:
            raise ValueError(f"init_precision must be > 0 or None, got {init_precision}")
        if curv_type == "Hessian":
            raise ValueError("curv_type='Hessian' is not available for VIOptimizer")
        # the split and damping rule of the previous SecondOrderOptimizer defaults: the
        # damping here is the prior precision's companion, not a trust-region parameter
        ck = {"damping": 0.0, "ema_decay": 0.1, "damping_split": "sqrt", **(curv_kwargs or {})}
        if ck.setdefault("damping_adaptation", False):
            raise ValueError(
                "curv_kwargs['damping_adaptation'] is not available for VIOptimizer (the "
                "damping is part of the posterior precision)"
            )
        kwargs.setdefault("kl_clip", None)
        super().__init__(
            model, curv_type, curv_shapes, ck, lr=lr, momentum=momentum,
            momentum_type=momentum_type, seed=seed + 7919 * get_rank(), **kwargs,
        )  # fmt: skip
        # the gradient gets the prior term added: never the product of the recorded rows
        self._lowrank_enabled = False
        self.capture.loss_grad_modules = {}
        self.dataset_size = dataset_size
        self.num_mc_samples = num_mc_samples
        self.val_num_mc_samples = val_num_mc_samples
        self.kl_weighting = kl_weighting
        self.warmup_kl_weighting_init = warmup_kl_weighting_init
        self.warmup_kl_weighting_steps = warmup_kl_weighting_steps
        self.prior_variance = prior_variance
        self.init_precision = init_precision
        inner = getattr(model, "module", model)
        _REGISTRY[inner] = weakref.ref(self)
        _REGISTRY[model] = weakref.ref(self)

    # ---------------------------------------------------------------- schedule
    def tau(self, step: int | None = None) -> float:
        """KL weighting at ``step`` (after warm-up)."""
        s = self.global_step if step is None else step
        if self.warmup_kl_weighting_steps is None:
            return self.kl_weighting
        w0 = self.warmup_kl_weighting_init
        frac = min(1.0, s / self.warmup_kl_weighting_steps)
        return self.kl_weighting * (w0 + (1.0 - w0) * frac)

    def prior_precision(self, step: int | None = None) -> float:
        """``delta = tau / (N * prior_variance)``: the prior's share of the damping."""
        return self.tau(step) / (self.dataset_size * self.prior_variance)

    def _prior_l2(self) -> float:
        return self.prior_precision()

    def _block_damping(self, block: LayerCurvature, base: float) -> float:
        return base + self.prior_precision()

    def _inv_opts(self) -> dict[str, Any]:
        return {**self.curv_opts, "inverse_method": "cholesky", "chol": True}

    # ---------------------------------------------------------------- sampling
    def _ensure_posterior(self) -> bool:
        """Make sure every block has a covariance; False if the first step must run at the mean."""
        ready = True
        for b in self.blocks:
            if self._inverse(b) is not None:
                continue
            if self.init_precision is None:
                ready = False
                continue
            st = self._anchor(b)
            for k, v in b.init_factors(self.init_precision).items():
                st["curv_" + k] = v
            self._invert(b, self.current_damping())
        return ready

    @torch.no_grad()
    def sample_params(self, generator: torch.Generator | None = None) -> list[list[Tensor]]:
        """One draw ``eps ~ N(0, Sigma)`` per block (not applied).

        Args:
            generator: random generator of the draw; None: the optimizer's own (the
                training noise stream, saved by ``state_dict``).
        """
        gen = self.generator if generator is None else generator
        scale = self.tau() / self.dataset_size
        out = []
        for b in self.blocks:
            inv = self._inverse(b)
            if inv is None:
                out.append([torch.zeros_like(p) for p in b.params])
            else:
                out.append(b.sample(inv, scale, gen))
        return out

    def _forward_backward(self, closure: Callable[[], Any]) -> Tensor:
        params = self.blocks_params()
        ready = self._ensure_posterior()
        means = [p.detach().clone() for p in params]
        grads: list[Tensor | None] = [None] * len(params)
        total: Tensor | None = None
        n = self.num_mc_samples if ready else 1
        try:
            for _ in range(n):
                if ready:
                    noise = [e for es in self.sample_params() for e in es]
                    with torch.no_grad():
                        for p, m, e in zip(params, means, noise):
                            p.copy_(m + e)
                loss = self._run_closure(closure)
                total = loss if total is None else total + loss
                for i, p in enumerate(params):
                    if p.grad is not None:
                        g = p.grad.detach()
                        grads[i] = g.clone() if grads[i] is None else grads[i] + g  # type: ignore[operator]
        finally:
            with torch.no_grad():
                for p, m in zip(params, means):
                    p.copy_(m)
        for p, gsum in zip(params, grads):
            p.grad = None if gsum is None else gsum / n
        assert total is not None
        return total / n

    @torch.no_grad()
    def prediction(
        self,
        x: Tensor,
        mc_samples: int | None = None,
        *,
        linearized: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Predictive distribution averaged over ``mc_samples`` posterior samples.

        Args:
            x: a batch of inputs.
            mc_samples: number of weight samples (default ``val_num_mc_samples``);
                0 uses the mean.
            linearized: sample the network linearised at the posterior mean,
                ``f(x; mu) + J(x) eps`` (one forward-mode product per sample), instead of
                the network itself at ``mu + eps`` (the "GLM predictive" of a
                Gauss-Newton posterior: the curvature it was fitted with describes the
                linearised network). Default False.
            generator: random generator of the posterior draws; None: PyTorch's global
                (host) generator, so ``torch.manual_seed`` makes predictions repeatable.
                Never the optimizer's own generator: predicting during training does not
                change the training run.

        Returns:
            Class probabilities (``loss="cross_entropy"``) or mean outputs (``"mse"``).
        """
        K = self.val_num_mc_samples if mc_samples is None else mc_samples
        if not isinstance(K, int) or K < 0:
            raise ValueError(f"mc_samples must be an int >= 0, got {K!r}")
        if not isinstance(linearized, bool):
            raise TypeError(f"linearized must be a bool, got {type(linearized).__name__}")
        model = self.model
        probs = self.capture.loss == "cross_entropy"

        def link(o: Tensor) -> Tensor:
            return torch.softmax(o, dim=-1) if probs else o

        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        if K == 0 or all(self._inverse(b) is None for b in self.blocks):
            return link(model(x))
        gen = torch.default_generator if generator is None else generator
        params = self.blocks_params()
        if linearized:
            return self._linearized(x, params, K, link, gen)
        means = [p.detach().clone() for p in params]
        acc: Tensor | None = None
        try:
            for _ in range(K):
                noise = [e for es in self.sample_params(gen) for e in es]
                for p, m, e in zip(params, means, noise):
                    p.copy_(m + e)
                o = link(model(x))
                acc = o if acc is None else acc + o
        finally:
            for p, m in zip(params, means):
                p.copy_(m)
        assert acc is not None
        return acc / K

    def _linearized(
        self,
        x: Tensor,
        params: list[Tensor],
        k: int,
        link: Callable[[Tensor], Tensor],
        gen: torch.Generator,
    ) -> Tensor:
        """``mean_s link(f(x; mu) + J(x) eps_s)`` by ``torch.func.jvp`` at the mean."""
        from torch.func import functional_call, jvp

        model = self.model
        names = {id(p): n for n, p in model.named_parameters()}
        missing = [i for i, p in enumerate(params) if id(p) not in names]
        if missing:
            raise ValueError("linearized prediction needs the posterior's parameters in the model")
        keys = [names[id(p)] for p in params]
        primals = {n: p.detach() for n, p in zip(keys, params)}

        def f(ps: dict[str, Tensor]) -> Tensor:
            return functional_call(model, ps, (x,), strict=False)

        acc: Tensor | None = None
        for _ in range(k):
            noise = [e for es in self.sample_params(gen) for e in es]
            tangents = {n: e.to(p.dtype) for n, p, e in zip(keys, params, noise)}
            res = jvp(f, (primals,), (tangents,))
            o = link(res[0] + res[1])
            acc = o if acc is None else acc + o
        assert acc is not None
        return acc / k


def prediction(
    model: nn.Module,
    x: Tensor,
    mc_samples: int | None = None,
    *,
    linearized: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Bayesian model average of ``model`` on ``x`` under its :class:`VIOptimizer` posterior.

    Args:
        model: a model that a :class:`VIOptimizer` was built for.
        x: a batch of inputs.
        mc_samples: number of weight samples; 0 uses the posterior mean.
        linearized: average over the network linearised at the posterior mean
            (see :meth:`VIOptimizer.prediction`).
        generator: random generator of the posterior draws (None: PyTorch's global one;
            see :meth:`VIOptimizer.prediction`).

    Raises:
        ValueError: if no :class:`VIOptimizer` was created for ``model``.
    """
    ref = _REGISTRY.get(model)
    opt = None if ref is None else ref()
    if opt is None:
        raise ValueError("model: no VIOptimizer was created for this model")
    return opt.prediction(x, mc_samples, linearized=linearized, generator=generator)
