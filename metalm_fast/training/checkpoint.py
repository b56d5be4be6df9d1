"""Training checkpoints: safetensors weights and optimizer state, a JSON config, a pointer.

Layout::

    <out_dir>/step-<N>/model.safetensors      full (unsharded) weights; tied weights once
    <out_dir>/step-<N>/optimizer.safetensors  AdamW state as "<param name>:<key>" tensors,
                                              param_groups in the file's metadata
    <out_dir>/step-<N>/config.json            model config, train config, step, data position
    <out_dir>/latest                          "step-<N>", written last and atomically

A save writes into a hidden temporary directory, renames it to ``step-<N>`` and
only then replaces ``latest`` (write to a temporary file + ``os.replace``), so
an interrupted save leaves ``latest`` naming the previous complete checkpoint.

safetensors refuses tensors that share memory, so the tied decoder embedding
(``lm_head.weight is embedding.weight``) is written once under its first name;
the file's metadata lists the aliases and loading restores them.

Under FSDP2 every rank takes part in gathering the full state dicts
(torch.distributed.checkpoint.state_dict with ``full_state_dict=True,
cpu_offload=True``); rank 0 alone writes. No random number generator is saved:
the training loop draws no random numbers (the data stream is a deterministic
function of its own seed, and the model has no dropout).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from metalm_fast.models.metalm import MetaLM, MetaLMConfig
from metalm_fast.training.distributed import is_sharded, unwrap_model

__all__ = [
    "latest_checkpoint",
    "load_checkpoint",
    "load_model",
    "load_optimizer_state",
    "optimizer_state_dict",
    "save_checkpoint",
]

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CONFIG_FILE = "config.json"
LATEST_FILE = "latest"
FORMAT_VERSION = 1


def _state_dict_options(model: nn.Module):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if is_sharded(model):
        # Gather every shard into full CPU tensors (on rank 0; others get {}).
        return StateDictOptions(full_state_dict=True, cpu_offload=True)
    return None


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full, unsharded weights keyed by parameter name (collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_dict_options(model))


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state keyed by parameter name, full (collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_state_dict_options(model))


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a name-keyed full optimizer state (every rank holds all of it under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True) if is_sharded(model) else None
    set_optimizer_state_dict(model, optimizer, state, options=options)


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: canonical}`` for parameters reachable under more than one name."""
    first_name: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, parameter in unwrap_model(model).named_parameters(remove_duplicate=False):
        canonical = first_name.setdefault(id(parameter), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases


def _flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}:{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    metadata = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, metadata


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], metadata: dict) -> dict:
    state: dict[str, dict[str, Any]] = {}
    for flat_key, tensor in tensors.items():
        name, key = flat_key.rsplit(":", 1)
        state.setdefault(name, {})[key] = tensor
    for name, entries in json.loads(metadata["scalars"]).items():
        state.setdefault(name, {}).update(entries)
    # JSON turned tuples (AdamW's betas) into lists; "params" is the only real list.
    param_groups = [
        {
            key: tuple(value) if isinstance(value, list) and key != "params" else value
            for key, value in group.items()
        }
        for group in json.loads(metadata["param_groups"])
    ]
    return {"state": state, "param_groups": param_groups}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        return tensors, handle.metadata() or {}


def _write_files(
    directory: Path, weights: dict, optimizer_state: dict, meta: dict, aliases: dict[str, str]
) -> None:
    directory.mkdir(parents=True)
    unique = {k: v.detach().cpu().contiguous() for k, v in weights.items() if k not in aliases}
    save_file(unique, str(directory / MODEL_FILE), metadata={"tied": json.dumps(aliases)})
    tensors, metadata = _flatten_optimizer_state(optimizer_state)
    save_file(tensors, str(directory / OPTIMIZER_FILE), metadata=metadata)
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _publish(out_dir: Path, staging: Path, name: str) -> Path:
    """Move a complete staging directory to ``out_dir/name``, then point ``latest`` at it."""
    target = out_dir / name
    previous = out_dir / f".{name}.old"
    if target.exists():  # a re-run saving the same step again: keep the old one until swapped
        shutil.rmtree(previous, ignore_errors=True)
        target.rename(previous)
    staging.rename(target)
    shutil.rmtree(previous, ignore_errors=True)
    pointer = out_dir / f".{LATEST_FILE}.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, out_dir / LATEST_FILE)
    return target


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    model_config: MetaLMConfig,
    train_config: Any = None,
    data_position: int = 0,
    is_main: bool = True,
) -> Path:
    """Write ``<out_dir>/step-<step>/`` and point ``<out_dir>/latest`` at it.

    Parameters
    ----------
    out_dir : the run's checkpoint directory (created if missing).
    step : optimizer steps completed.
    model, optimizer : the model as trained (plain, DDP or FSDP2) and its optimizer.
    model_config : written to config.json; :func:`load_model` rebuilds the model from it.
    train_config : a dataclass (TrainConfig) or None, written to config.json.
    data_position : micro-batches of the data stream consumed so far (resume skips them).
    is_main : only the process with ``is_main`` writes; under FSDP2 every rank
        must still call this (gathering the state is collective).

    Returns
    -------
    Path of the checkpoint directory.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    weights = model_state_dict(model)
    optimizer_state = optimizer_state_dict(model, optimizer)
    out_dir = Path(out_dir)
    name = f"step-{step}"
    if not is_main:
        return out_dir / name
    meta = {
        "format": FORMAT_VERSION,
        "step": step,
        "data_position": data_position,
        "model_config": dataclasses.asdict(model_config),
        "train_config": dataclasses.asdict(train_config) if train_config is not None else None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted save
    _write_files(staging, weights, optimizer_state, meta, tied_aliases(model))
    return _publish(out_dir, staging, name)


def latest_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory for ``path``: a run directory (follows ``latest``)
    or a ``step-<N>`` directory itself.

    Raises
    ------
    FileNotFoundError
        when ``path`` holds neither a ``latest`` pointer nor a config.json.
    """
    path = Path(path)
    if (path / LATEST_FILE).is_file():
        target = path / (path / LATEST_FILE).read_text().strip()
        if not (target / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"{path / LATEST_FILE} names {target}, which has no {CONFIG_FILE}"
            )
        return target
    if (path / CONFIG_FILE).is_file():
        return path
    raise FileNotFoundError(
        f"no checkpoint at {path}: expected a '{LATEST_FILE}' pointer or a {CONFIG_FILE}"
    )


def _read_meta(directory: Path) -> dict[str, Any]:
    meta = json.loads((directory / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{directory / CONFIG_FILE}: checkpoint format {meta.get('format')!r}, "
            f"this version reads {FORMAT_VERSION}"
        )
    return meta


def _load_weights(directory: Path, model: nn.Module) -> None:
    tensors, metadata = _read_safetensors(directory / MODEL_FILE)
    for alias, canonical in json.loads(metadata.get("tied", "{}")).items():
        tensors[alias] = tensors[canonical]
    model.load_state_dict(tensors, strict=True)


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module | None = None
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Read a checkpoint: the model with its weights, the optimizer state, the metadata.

    Parameters
    ----------
    path : a run directory (its ``latest`` checkpoint) or a ``step-<N>`` directory.
    model : a plain (not DDP/FSDP-wrapped) model to load into; None builds a
        :class:`MetaLM` from config.json on the CPU.

    Returns
    -------
    (model, optimizer_state, meta): ``optimizer_state`` is name-keyed
    ``{"state": {name: {key: value}}, "param_groups": [...]}`` for
    :func:`load_optimizer_state`; ``meta`` is config.json (step, data_position,
    model_config, train_config).
    """
    directory = latest_checkpoint(path)
    meta = _read_meta(directory)
    if model is None:
        model = MetaLM(MetaLMConfig(**meta["model_config"]))
    _load_weights(directory, model)
    optimizer_state = _unflatten_optimizer_state(*_read_safetensors(directory / OPTIMIZER_FILE))
    return model, optimizer_state, meta


def load_model(path: str | os.PathLike) -> MetaLM:
    """A :class:`MetaLM` built from a checkpoint's config.json with its weights, in eval mode.

    Example
    -------
    >>> model = load_model("runs/tiny")          # doctest: +SKIP
    """
    directory = latest_checkpoint(path)
    model = MetaLM(MetaLMConfig(**_read_meta(directory)["model_config"]))
    _load_weights(directory, model)
    return model.eval()
