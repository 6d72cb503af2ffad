"""CD-GraB on CPU with ``torchrun``: every rank balances its shard in coordination.

    .venv/bin/torchrun --nproc_per_node 2 packages/grab-sampler/examples/distributed_torchrun.py

Each rank computes per-sample gradients of its own batch; ``sampler.step``
gathers the pair differences of all ranks and balances them in one sequence,
so every rank makes the same decisions. Gradients are averaged with
``all_reduce`` as in data-parallel training.
"""

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch.func import functional_call, grad, vmap

from grabsampler import DistributedGraBSampler

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)

x, y = load_digits(return_X_y=True)
x = torch.tensor(x / 16.0, dtype=torch.float32)
y = torch.tensor(y)
dataset = torch.utils.data.TensorDataset(x, y)

torch.manual_seed(0)  # same initial model on every rank
model = torch.nn.Linear(64, 10)
params = {k: v.detach() for k, v in model.named_parameters()}
loss_fn = torch.nn.CrossEntropyLoss()


def one(p, xi, yi):
    return loss_fn(functional_call(model, p, (xi[None],)), yi[None])


per_sample = vmap(grad(one), in_dims=(None, 0, 0))
sampler = DistributedGraBSampler(dataset, seed=0)  # num_replicas / rank from the group
loader = torch.utils.data.DataLoader(dataset, batch_size=16, sampler=sampler)

for epoch in range(5):
    sampler.set_epoch(epoch)
    for xb, yb in loader:
        g = per_sample(params, xb, yb)
        sampler.step(g)  # collective: all ranks call it with the same batch size
        mean = [g[k].mean(0) for k in params]
        for t in mean:
            dist.all_reduce(t)
            t /= world
        params = {k: v - 0.3 * t for (k, v), t in zip(params.items(), mean)}
    with torch.no_grad():
        loss = float(loss_fn(functional_call(model, params, (x,)), y))
    if rank == 0:
        print(f"epoch {epoch}: train loss {loss:.4f}, shard size {len(sampler)}")
dist.destroy_process_group()
