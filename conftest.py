"""Root pytest configuration shared by every package's tests.

Tests marked ``cuda`` are skipped when no CUDA device is present, unless the
environment sets ``REQUIRE_CUDA=1``, in which case they fail instead (so a GPU
runner that lost its GPU does not pass silently).
"""

from __future__ import annotations

import os

import pytest
import torch


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") is None or torch.cuda.is_available():
        return
    if os.environ.get("REQUIRE_CUDA", "") == "1":
        pytest.fail("REQUIRE_CUDA=1 but torch.cuda.is_available() is False", pytrace=False)
    pytest.skip("CUDA is not available")
