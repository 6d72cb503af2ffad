"""Two gloo processes on half batches == one process on the whole batch."""

from __future__ import annotations

import pytest
import torch

from optcore.testing import spawn
from torchsso._testing import data_parallel_run, data_parallel_runs

CONFIGS = [("GaussNewton", "Kron", 5, False), ("Cov", "Kron", 5, True), ("Cov", "Diag", 5, False)]


@pytest.mark.distributed
def test_two_processes_equal_single_process():
    ranks = spawn(2, data_parallel_runs, CONFIGS)
    for i, cfg in enumerate(CONFIGS):
        single = data_parallel_run(0, 1, *cfg)
        for r in ranks:
            for a, b in zip(single, r[i]):
                torch.testing.assert_close(
                    torch.tensor(a, dtype=torch.float64),
                    torch.tensor(b, dtype=torch.float64),
                    atol=1e-5,
                    rtol=1e-5,
                    msg=str(cfg),
                )
