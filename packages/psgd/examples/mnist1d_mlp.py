"""An MLP on MNIST-1D-style data (generated): psgd.Kron against AdamW at equal steps."""

import torch

import psgd
from optcore.data import make_mnist1d

torch.set_num_threads(1)
split = make_mnist1d(n_train=4000, n_test=1000)
for name in ("psgd.Kron", "AdamW"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(40, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )
    if name == "psgd.Kron":
        opt = psgd.Kron(model.parameters(), lr=1e-3, weight_decay=1e-2)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(600):
        idx = torch.randint(0, 4000, (128,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = model(split.x_test)
        test = torch.nn.functional.cross_entropy(logits, split.y_test)
        acc = (logits.argmax(1) == split.y_test).float().mean()
    print(f"{name}: test loss {float(test):.4f}, accuracy {float(acc):.3f}")
