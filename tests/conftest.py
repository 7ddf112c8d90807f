"""What several unit-test modules share."""

from __future__ import annotations

import os

import pytest
import torch

# A split run (scripts/test.sh: one pytest-xdist worker per core): each worker's tests
# compute on one thread, beside the other worker's.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one intra-op thread is faster, and steady on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
