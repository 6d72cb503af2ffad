"""The examples run end to end (a few epochs each, about 40 s in all)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["functional_digits.py", "hooks_sgd.py"])
def test_example_runs(name):
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    assert "epoch 4" in out.stdout


@pytest.mark.distributed
def test_torchrun_example_runs():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(EXAMPLES / "distributed_torchrun.py"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "epoch 4" in out.stdout
