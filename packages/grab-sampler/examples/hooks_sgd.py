"""Hooks mode: GraB in an ordinary ``torch.optim.SGD`` loop, no per-sample gradients.

The model has BatchNorm and Dropout; GraB balances the Linear layers' gradients,
computed from their inputs and output gradients during ``loss.backward()``.

    .venv/bin/python packages/grab-sampler/examples/hooks_sgd.py
"""

import torch
from sklearn.datasets import load_digits
from torch import nn

from grabsampler import GraB

x, y = load_digits(return_X_y=True)
x = torch.tensor(x / 16.0, dtype=torch.float32)
y = torch.tensor(y)
dataset = torch.utils.data.TensorDataset(x, y)

torch.manual_seed(0)
model = nn.Sequential(
    nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10)
)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
loss_fn = nn.CrossEntropyLoss()

grab = GraB(model, dataset, balance_type="mean")  # attaches the hooks
loader = torch.utils.data.DataLoader(dataset, batch_size=16, sampler=grab.sampler)

for epoch in range(5):
    model.train()
    total = 0.0
    for xb, yb in loader:
        opt.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        grab.step()  # balance this batch (inner products from the hooks)
        opt.step()
        total += float(loss) * len(yb)
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean()
    print(f"epoch {epoch}: train loss {total / len(dataset):.4f}, accuracy {acc:.3f}")

torch.save({"sampler": grab.sampler.state_dict()}, "/tmp/grab_hooks_state.pt")
print("sampler state saved (resumable mid-epoch with load_state_dict)")
