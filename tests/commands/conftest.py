"""Tiny checkpoints for the command tests: one pretrained (one synthetic step), two
untrained ones lacking an encoder; one thread."""

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


def _saved(out, **changes):
    """A freshly initialised tiny MetaLM with ``changes`` to its config, saved untrained
    (no step: the commands only need a checkpoint of that shape)."""
    import dataclasses

    from metalm_fast.models.metalm import PRESETS, MetaLM
    from metalm_fast.training.checkpoint import save_checkpoint

    config = dataclasses.replace(PRESETS["tiny"], **changes)
    model = MetaLM(config)
    save_checkpoint(out, 0, model, torch.optim.AdamW(model.parameters()), model_config=config)
    return out


@pytest.fixture(scope="session")
def text_only_checkpoint(tmp_path_factory):
    """The tiny preset without its vision encoder: it cannot read an image."""
    return _saved(tmp_path_factory.mktemp("text_only") / "run", vision_layers=0)


@pytest.fixture(scope="session")
def no_text_encoder_checkpoint(tmp_path_factory):
    """The tiny preset without its text encoder: it cannot read encoder demonstrations."""
    return _saved(tmp_path_factory.mktemp("no_text_encoder") / "run", encoder_layers=0)
