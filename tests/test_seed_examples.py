"""The seed documents' own usage examples, run as written (data line aside).

Each test is the example a user of the original system would paste in, with
only the import line (and, where the seed reads a downloaded data set, the
data line) changed; it must run and make progress.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optcore import load_sklearn


@pytest.fixture(scope="module")
def digits():
    return load_sklearn("digits", seed=0)


def test_kron_torch_basic_usage(digits):
    from psgd import Kron  # was: from kron_torch import Kron

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    optimizer = Kron(model.parameters(), lr=3e-3)  # Adam-like settings, as the seed advises
    x, y = digits.x_train[:256], digits.y_train[:256]
    first = F.cross_entropy(model(x), y).item()
    for _ in range(60):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert F.cross_entropy(model(x), y).item() < 0.5 * first


def test_grab_sampler_functional_loop(digits):
    import torchopt
    from torch.func import functional_call, grad_and_value, vmap

    from grabsampler import GraBSampler

    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    loss_fn = nn.CrossEntropyLoss()
    dataset = torch.utils.data.TensorDataset(digits.x_train[:320], digits.y_train[:320])

    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    optimizer = torchopt.sgd(lr=0.1)
    opt_state = optimizer.init(params)

    sampler = GraBSampler(dataset, params)
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=16, sampler=sampler)

    def compute_loss(model, loss_fn, params, buffers, inputs, targets):
        prediction = functional_call(model, (params, buffers), (inputs,))
        return loss_fn(prediction, targets)

    ft_compute_sample_grad_and_loss = vmap(
        grad_and_value(partial(compute_loss, model, loss_fn)), in_dims=(None, None, 0, 0)
    )
    orders = []
    for _epoch in range(3):
        order = list(iter(sampler))
        orders.append(order)
        for _, (x, y) in enumerate(dataloader):
            ft_per_sample_grads, _batch_loss = ft_compute_sample_grad_and_loss(
                params, buffers, x, y
            )
            sampler.step(ft_per_sample_grads)
            grads = {k: g.mean(dim=0) for k, g in ft_per_sample_grads.items()}
            updates, opt_state = optimizer.update(grads, opt_state, params=params)
            params = torchopt.apply_updates(params, updates)
    assert all(sorted(o) == list(range(320)) for o in orders)
    assert orders[1] != orders[2]  # GraB reorders from the gradients it saw
    logits = functional_call(model, (params, buffers), (digits.x_test,))
    assert logits.argmax(1).eq(digits.y_test).float().mean() > 0.85


def test_eigenpro3_readme_example(digits):
    from eigenpro3.datasets import CustomDataset
    from eigenpro3.kernels import laplacian
    from eigenpro3.models import KernelModel
    from eigenpro3.utils import accuracy

    torch.manual_seed(0)
    p = 300  # model size
    DEVICES = [torch.device("cpu")]
    kernel_fn = lambda x, z: laplacian(x, z, bandwidth=20.0)  # noqa: E731

    # data line changed: digits instead of cifar10, one-hot targets as load_dataset returns
    n_classes = 10
    X_train, X_test = digits.x_train, digits.x_test
    y_train = F.one_hot(digits.y_train, n_classes).float()
    y_test = F.one_hot(digits.y_test, n_classes).float()

    centers = X_train[torch.randperm(X_train.shape[0])[:p]]
    testloader = torch.utils.data.DataLoader(
        CustomDataset(X_test, y_test.argmax(-1)), batch_size=512, shuffle=False
    )
    model = KernelModel(n_classes, centers, kernel_fn, X=X_train, y=y_train, devices=DEVICES)
    model.fit(model.train_loaders, testloader, score_fn=accuracy, epochs=2)
    acc = (model.predict(X_test).argmax(-1) == digits.y_test).float().mean().item()
    assert acc > 0.9


def test_torchsso_second_order_optimizer(digits):
    import torchsso

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torchsso.optim.SecondOrderOptimizer(
        model, "Fisher", {"Linear": "Kron"}, lr=0.1, momentum=0.9, curv_kwargs={"damping": 1e-2}
    )
    x, y = digits.x_train[:256], digits.y_train[:256]
    first = F.cross_entropy(model(x), y).item()
    for _ in range(20):

        def closure():
            optimizer.zero_grad()
            output = model(x)
            loss = F.cross_entropy(output, y)
            loss.backward()
            return loss, output

        optimizer.step(closure)
    assert F.cross_entropy(model(x), y).item() < 0.3 * first
