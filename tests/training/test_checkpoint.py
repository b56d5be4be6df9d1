"""Checkpoints: an exact round trip (weights, optimizer state, tied weights), the latest
pointer, and all-or-nothing loading: damaged or foreign files are named, nothing changes."""

import copy
import dataclasses

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from metalm_fast.models import PRESETS, MetaLM
from metalm_fast.training.checkpoint import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    CheckpointError,
    _write_manifest,
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


# --- all or nothing: a damaged or foreign checkpoint names the file and changes nothing ---


def _saved(tmp_path):
    """A checkpoint of one trained model, and another trained model + optimizer to load into."""
    model, optimizer = _trained(seed=0)
    save_checkpoint(tmp_path, 1, model, optimizer, model_config=model.config)
    return tmp_path / "step-1", *_trained(seed=1)


def _snapshot(model, optimizer):
    state = optimizer.state_dict()
    return (
        {name: tensor.clone() for name, tensor in model.state_dict().items()},
        {
            index: {k: v.clone() for k, v in entry.items()}
            for index, entry in state["state"].items()
        },
        copy.deepcopy(state["param_groups"]),
    )


def _assert_unchanged(before, model, optimizer):
    weights, optimizer_state, groups = before
    now = model.state_dict()
    assert now.keys() == weights.keys()
    for name, tensor in weights.items():
        assert now[name].dtype == tensor.dtype and torch.equal(now[name], tensor), name
    _assert_same_optimizer_state(
        {"state": optimizer_state, "param_groups": groups}, optimizer.state_dict()
    )


def _refused(directory, model, optimizer, file_name, message):
    before = _snapshot(model, optimizer)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_checkpoint(directory, model, optimizer)
    assert caught.value.path == directory / file_name
    assert str(caught.value).startswith(f"{directory / file_name}: ")
    _assert_unchanged(before, model, optimizer)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_16_bytes_of_a_tensor(path):
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    middle = 8 + header + (len(data) - 8 - header) // 2  # inside the tensor data
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated": (_truncate, "bytes where manifest.json says"),
    "bit-flipped": (_flip_16_bytes_of_a_tensor, "sha256 differs"),
    "missing": (lambda path: path.unlink(), "missing"),
}


@pytest.mark.parametrize("file_name", [MODEL_FILE, OPTIMIZER_FILE])
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_file_is_named_and_nothing_changes(tmp_path, file_name, damage):
    directory, model, optimizer = _saved(tmp_path)
    apply, message = DAMAGES[damage]
    apply(directory / file_name)
    _refused(directory, model, optimizer, file_name, message)


def test_a_missing_manifest_is_named(tmp_path):
    directory, model, optimizer = _saved(tmp_path)
    (directory / "manifest.json").unlink()
    _refused(directory, model, optimizer, "manifest.json", "missing")
    with pytest.raises(CheckpointError, match="manifest.json: missing"):
        load_model(directory)


def test_a_truncated_file_the_manifest_agrees_with_still_names_the_file(tmp_path):
    directory, model, optimizer = _saved(tmp_path)
    _truncate(directory / MODEL_FILE)
    _write_manifest(directory)  # as if the damage predated the save's digests
    _refused(directory, model, optimizer, MODEL_FILE, "not a readable safetensors file")


def _rewrite_model_file(directory, change):
    """Replace model.safetensors with ``change(tensors)`` and a manifest that agrees."""
    path = directory / MODEL_FILE
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata()
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)
    _write_manifest(directory)


SCHEMA_CHANGES = {
    "missing key": (lambda t: t.pop("decoder.norm.weight"), "missing decoder.norm.weight"),
    "unexpected key": (lambda t: t.update(extra=torch.zeros(2)), "unexpected extra"),
    "wrong shape": (
        lambda t: t.update({"decoder.norm.weight": torch.ones(3)}),
        r"decoder.norm.weight is \[3\] float32, the model's \[64\] float32",
    ),
    "wrong dtype": (
        lambda t: t.update({"decoder.norm.weight": t["decoder.norm.weight"].half()}),
        r"decoder.norm.weight is \[64\] float16, the model's \[64\] float32",
    ),
}


@pytest.mark.parametrize("change", sorted(SCHEMA_CHANGES))
def test_a_model_file_that_does_not_fit_is_named_and_nothing_changes(tmp_path, change):
    directory, model, optimizer = _saved(tmp_path)
    edit, message = SCHEMA_CHANGES[change]
    _rewrite_model_file(directory, edit)
    _refused(directory, model, optimizer, MODEL_FILE, message)


def test_an_optimizer_state_of_another_shape_is_named_and_nothing_changes(tmp_path):
    directory, model, optimizer = _saved(tmp_path)
    path = directory / OPTIMIZER_FILE
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata()
    tensors["decoder.norm.weight:exp_avg"] = torch.zeros(65)
    save_file(tensors, str(path), metadata=metadata)
    _write_manifest(directory)
    _refused(directory, model, optimizer, OPTIMIZER_FILE, r"decoder.norm.weight:exp_avg is \[65\]")


def test_a_model_of_another_config_is_named_with_the_differences(tmp_path):
    directory, _, _ = _saved(tmp_path)
    other = MetaLM(dataclasses.replace(PRESETS["tiny"], decoder_layers=3))
    before = {name: tensor.clone() for name, tensor in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="decoder_layers 2 in the file, 3 in the model"):
        load_checkpoint(directory, other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_loading_into_a_model_and_its_optimizer_is_exact(tmp_path):
    directory, model, optimizer = _saved(tmp_path)
    source, source_optimizer = _trained(seed=0)
    load_checkpoint(directory, model, optimizer)
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    _assert_same_optimizer_state(source_optimizer.state_dict(), optimizer.state_dict())


def test_keep_last_deletes_the_oldest_checkpoints(tmp_path):
    model, optimizer = _trained()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, optimizer, model_config=model.config, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-3", "step-4"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-4"
