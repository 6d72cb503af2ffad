"""Shared fixtures of the grab-sampler tests; also puts this folder on ``sys.path`` so that
test modules can import ``grabsampler_testing`` (the suite runs with importlib import mode)."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

_here = str(pathlib.Path(__file__).parent)
if _here not in sys.path:
    sys.path.insert(0, _here)


@pytest.fixture
def one_thread():
    """Tiny matmuls are much faster single-threaded on a busy shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
