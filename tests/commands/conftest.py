"""A tiny pretrained checkpoint (one synthetic step) for the command tests; one thread."""

import pytest
import torch

from metalm_fast.training.command import main as train_main


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    argv = [
        "--data",
        "synthetic",
        "--steps",
        "1",
        "--micro-batch-tokens",
        "256",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert train_main(argv) == 0
    return out
