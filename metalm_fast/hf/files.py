"""Reading a ``save_pretrained`` directory: config.json and safetensors weights.

A directory holds ``config.json`` and either ``model.safetensors`` or shards
listed by ``model.safetensors.index.json`` (``weight_map``: tensor name ->
shard file). Weights are read with safetensors alone, so loading a checkpoint
needs no transformers import.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = ["HFFormatError", "read_config", "read_tensors"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class HFFormatError(ValueError):
    """A pretrained directory that cannot be read as the model it claims to be.

    The message names the file, the config field or the tensor at fault.
    """


def _directory(path) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise HFFormatError(
            f"path must be a model directory (config.json + safetensors), got {str(path)!r}"
        )
    return directory


def read_config(path) -> dict:
    """The parsed config.json of the directory ``path``."""
    file = _directory(path) / CONFIG_FILE
    if not file.is_file():
        raise HFFormatError(f"{file}: no config.json (expected a save_pretrained directory)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise HFFormatError(f"{file}: not valid JSON ({error})") from None


def _weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise HFFormatError(f"{index}: not a safetensors index ({error})") from None
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / WEIGHTS_FILE
    if single.is_file():
        return [single]
    if any(directory.glob("*.bin")):
        raise HFFormatError(
            f"{directory}: only PyTorch .bin weights; save the model with "
            "safe_serialization=True (safetensors) first"
        )
    raise HFFormatError(f"{directory}: no {WEIGHTS_FILE} and no {INDEX_FILE}")


def read_tensors(path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors files, by name (cast to ``dtype``
    when given, floating tensors only)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(_directory(path)):
        if not file.is_file():
            raise HFFormatError(f"{file}: a shard named by {INDEX_FILE} is missing")
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                if dtype is not None and tensor.dtype.is_floating_point:
                    tensor = tensor.to(dtype)
                tensors[name] = tensor
    return tensors
