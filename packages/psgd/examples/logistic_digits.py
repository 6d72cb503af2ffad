"""Multinomial logistic regression on scikit-learn's digits: KronWhiten vs LRAWhiten vs AdamW."""

import torch

import psgd
from optcore.data import load_sklearn

split = load_sklearn("digits", standardize=False)
x_train, x_test = split.x_train / 16, split.x_test / 16
for name in ("KronWhiten", "LRAWhiten", "AdamW"):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)
    if name == "KronWhiten":
        opt = psgd.KronWhiten(
            model.parameters(), lr=0.01, momentum=0.9, preconditioner_max_skew=10.0
        )
    elif name == "LRAWhiten":
        opt = psgd.LRAWhiten(model.parameters(), lr=0.05, momentum=0.9, rank=10)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(model(x_train), split.y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == split.y_test).float().mean()
        test = torch.nn.functional.cross_entropy(model(x_test), split.y_test)
    print(
        f"{name}: train loss {float(loss.detach()):.4f}, test loss {float(test):.4f}, accuracy {float(acc):.3f}"
    )
