import pytest
import torch
from torch import nn

from optcore.tree import flatten, group_by_dtype_device, named_parameters, numel, unflatten


def test_named_parameters_order_and_shared_once():
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.ReLU(), lin, nn.Linear(3, 2))
    model[3].bias.requires_grad_(False)
    names = list(named_parameters(model))
    assert names == ["0.weight", "0.bias", "3.weight"]
    assert list(named_parameters(model, trainable_only=False))[-1] == "3.bias"


def test_named_parameters_rejects_non_module():
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        named_parameters([torch.zeros(2)])  # type: ignore[arg-type]


def test_flatten_unflatten_roundtrip_dict_and_list():
    tree = {"a": torch.randn(2, 3), "b": torch.randn(4), "c": torch.randn(())}
    flat = flatten(tree)
    assert flat.shape == (2 * 3 + 4 + 1,)
    assert numel(tree) == 11
    back = unflatten(flat, tree)
    assert list(back) == ["a", "b", "c"]
    for k in tree:
        assert torch.equal(back[k], tree[k])
    as_list = unflatten(flat, list(tree.values()))
    assert isinstance(as_list, list) and torch.equal(as_list[1], tree["b"])
    # views: writing into the vector changes the pieces
    flat.zero_()
    assert back["a"].abs().sum() == 0


def test_flatten_bad_input():
    with pytest.raises(ValueError, match="empty"):
        flatten([])
    with pytest.raises(ValueError, match="mixes dtypes"):
        flatten([torch.zeros(2), torch.zeros(2, dtype=torch.float64)])
    with pytest.raises(TypeError, match=r"tree\[1\]"):
        flatten([torch.zeros(2), 3.0])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="elements but like holds"):
        unflatten(torch.zeros(5), [torch.zeros(2), torch.zeros(2)])
    with pytest.raises(ValueError, match="1-D"):
        unflatten(torch.zeros(2, 2), [torch.zeros(4)])


def test_group_by_dtype_device():
    ts = [
        torch.zeros(1),
        torch.zeros(1, dtype=torch.float64),
        torch.zeros(2),
        torch.zeros(1, dtype=torch.bfloat16),
    ]
    groups = group_by_dtype_device(ts)
    assert groups == {
        (torch.float32, torch.device("cpu")): [0, 2],
        (torch.float64, torch.device("cpu")): [1],
        (torch.bfloat16, torch.device("cpu")): [3],
    }
