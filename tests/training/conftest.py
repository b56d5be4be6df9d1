"""Training tests run tiny models: one intra-op thread.

With several processes sharing few cores, OpenMP threads of a tiny model spin
waiting for each other; one thread made a 3-step run ~7x faster here. The
torchrun subprocesses get OMP_NUM_THREADS=1 from torchrun itself.
"""

import socket

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _outside_torchrun(monkeypatch):
    """A test run from inside torchrun must not make the tests think they are ranks."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def free_port() -> int:
    """A TCP port free on loopback now, for a torchrun rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
