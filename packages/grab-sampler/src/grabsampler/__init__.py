"""grabsampler: GraB example ordering by online gradient balancing.

Public API::

    GraBSampler(data_source, trainable_params, balance_type="mean", *,
                probabilistic=False, prob_c=30.0, normalize=None, depth=4,
                random_first_epoch=True, seed=0)
        .step(per_sample_grads)         # dict from vmap(grad), list, or (B, d) tensor
        .state_dict() / .load_state_dict(state)   # resumes mid-epoch
    GraB(model, data_source, balance_type="mean", *, loss_reduction="mean", ...)
        .sampler                        # give it to the DataLoader
        .step()                         # after loss.backward(): balance from hooks
    DistributedGraBSampler(dataset, num_replicas=None, rank=None, seed=0, *,
                           shuffle=True, drop_last=False)    # CD-GraB
        .set_epoch(e) / .step(per_sample_grads) / .state_dict()
    BALANCE_TYPES = ("mean", "pair", "recursive", "recursive_pair", "batch", "rr", "so")
"""

from grabsampler.distributed import DistributedGraBSampler
from grabsampler.hooks import GraB
from grabsampler.sampler import BALANCE_TYPES, GraBSampler

__all__ = ["BALANCE_TYPES", "DistributedGraBSampler", "GraB", "GraBSampler"]
__version__ = "0.1.0"
