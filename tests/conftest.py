"""Fixtures shared by several test files."""

import pytest
import torch


# Tiny networks at batch 64: one torch thread is as fast as two on an idle 2-core machine and
# several times faster on a busy one (measured), and subprocess workers set their own threads.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny networks on one CPU thread: with two cores (CI, or a busy machine)
    one thread is several times faster than two that contend. Use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
