"""Training tests run tiny models: one intra-op thread.

With several processes sharing few cores, OpenMP threads of a tiny model spin
waiting for each other; one thread made a 3-step run ~7x faster here. The
torchrun subprocesses get OMP_NUM_THREADS=1 from torchrun itself.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
