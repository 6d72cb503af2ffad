"""The seed's functional training loop (torchopt + torch.func) on scikit-learn digits.

Only the model, loss, data and loop sizes are filled in; the GraB lines are the
seed's, unchanged apart from the import line.

    .venv/bin/python packages/grab-sampler/examples/functional_digits.py
"""

from functools import partial

import torch
import torchopt
from sklearn.datasets import load_digits
from torch.func import functional_call, grad_and_value, vmap

from grabsampler import GraBSampler

# Initiate model, loss function, and dataset
x, y = load_digits(return_X_y=True)
x = torch.tensor(x / 16.0, dtype=torch.float32)
y = torch.tensor(y)
dataset = torch.utils.data.TensorDataset(x, y)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
loss_fn = torch.nn.CrossEntropyLoss()

params = dict(model.named_parameters())
buffers = dict(model.named_buffers())

optimizer = torchopt.sgd(lr=0.1)
opt_state = optimizer.init(params)

sampler = GraBSampler(dataset, params)  # <- add this init of GraB sampler
dataloader = torch.utils.data.DataLoader(dataset, batch_size=16, sampler=sampler)


def compute_loss(model, loss_fn, params, buffers, inputs, targets):
    prediction = functional_call(model, (params, buffers), (inputs,))
    return loss_fn(prediction, targets)


ft_compute_sample_grad_and_loss = vmap(
    grad_and_value(partial(compute_loss, model, loss_fn)), in_dims=(None, None, 0, 0)
)

for epoch in range(5):
    total = 0.0
    for _, (x_b, y_b) in enumerate(dataloader):
        ft_per_sample_grads, batch_loss = ft_compute_sample_grad_and_loss(params, buffers, x_b, y_b)
        sampler.step(ft_per_sample_grads)  # <- step compute GraB algorithm
        grads = {k: g.mean(dim=0) for k, g in ft_per_sample_grads.items()}
        updates, opt_state = optimizer.update(grads, opt_state, params=params)
        params = torchopt.apply_updates(params, updates)
        total += float(batch_loss.sum())
    print(f"epoch {epoch}: mean training loss {total / len(dataset):.4f}")
