"""Rollout tests run torch on one thread."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """On 2 shared cores torch's OpenMP workers spin-wait against other processes: 1 thread runs ~8x faster."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
