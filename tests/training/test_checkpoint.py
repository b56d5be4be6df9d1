"""Checkpoints: an exact round trip (weights, optimizer state, tied weights), the latest pointer."""

import dataclasses

import pytest
import torch

from metalm_fast.models import PRESETS, MetaLM
from metalm_fast.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_model,
    load_optimizer_state,
    save_checkpoint,
)
from metalm_fast.training.command import synthetic_micro_batches
from metalm_fast.training.trainer import TrainConfig


def _trained(seed=0):
    """A tiny model and its AdamW after one step, so every optimizer state is populated."""
    torch.manual_seed(seed)
    config = PRESETS["tiny"]
    model = MetaLM(config)
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    batch = next(synthetic_micro_batches(config.vocab_size, 256, seed=seed))
    model(batch).backward()
    optimizer.step()
    return model, optimizer


def _assert_same_optimizer_state(expected, actual):
    assert expected["param_groups"] == actual["param_groups"]
    assert expected["state"].keys() == actual["state"].keys()
    for index, entries in expected["state"].items():
        for key, value in entries.items():
            other = actual["state"][index][key]
            assert value.dtype == other.dtype and torch.equal(value, other), (index, key)


def test_round_trip_is_exact_and_keeps_tied_weights(tmp_path):
    model, optimizer = _trained()
    train_config = TrainConfig(steps=7, out_dir=str(tmp_path))
    path = save_checkpoint(
        tmp_path,
        3,
        model,
        optimizer,
        model_config=model.config,
        train_config=train_config,
        data_position=12,
    )
    assert path == tmp_path / "step-3"

    loaded, optimizer_state, meta = load_checkpoint(tmp_path)
    assert loaded.lm_head.weight is loaded.embedding.weight
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert meta["step"] == 3 and meta["data_position"] == 12
    assert meta["model_config"] == dataclasses.asdict(model.config)
    assert meta["train_config"]["steps"] == 7

    restored = torch.optim.AdamW(
        [
            {"params": [p for p in loaded.parameters() if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in loaded.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    load_optimizer_state(loaded, restored, optimizer_state)
    _assert_same_optimizer_state(optimizer.state_dict(), restored.state_dict())


def test_load_model_builds_from_config(tmp_path):
    model, optimizer = _trained(seed=1)
    save_checkpoint(tmp_path, 1, model, optimizer, model_config=model.config)
    loaded = load_model(tmp_path / "step-1")
    assert not loaded.training and loaded.config == model.config
    assert loaded.lm_head.weight is loaded.embedding.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_latest_points_at_the_last_complete_save(tmp_path):
    model, optimizer = _trained()
    for step in (2, 4):
        save_checkpoint(tmp_path, step, model, optimizer, model_config=model.config)
    # An interrupted later save leaves only its staging directory: latest is untouched.
    (tmp_path / ".step-6.tmp").mkdir()
    assert (tmp_path / "latest").read_text().strip() == "step-4"
    assert latest_checkpoint(tmp_path) == tmp_path / "step-4"
    assert latest_checkpoint(tmp_path / "step-2") == tmp_path / "step-2"
    # Saving the same step again replaces it whole.
    save_checkpoint(tmp_path, 4, model, optimizer, model_config=model.config)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".step-6.tmp",
        "latest",
        "step-2",
        "step-4",
    ]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="step must be >= 0"):
        model, optimizer = _trained()
        save_checkpoint(tmp_path, -1, model, optimizer, model_config=model.config)
