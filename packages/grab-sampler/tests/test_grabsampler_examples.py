"""The examples run end to end (a few epochs each, about 40 s in all)."""

from __future__ import annotations

import pathlib

import pytest

from optcore.testing import run_script

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["functional_digits.py", "hooks_sgd.py"])
def test_example_runs(name):
    assert "epoch 4" in run_script(EXAMPLES / name)


@pytest.mark.distributed
def test_torchrun_example_runs():
    out = run_script(
        EXAMPLES / "distributed_torchrun.py",
        "--nproc_per_node",
        "2",
        module="torch.distributed.run",
    )
    assert "epoch 4" in out
