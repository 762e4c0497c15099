import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """The adapter tests run tiny models, whose ops are dominated by thread start-up and, on a shared machine, by
    contention: one thread is 3x faster here. Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
