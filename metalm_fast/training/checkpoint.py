"""Training checkpoints: safetensors weights and optimizer state, a JSON config, a pointer.

Layout::

    <out_dir>/step-<N>/model.safetensors      full (unsharded) weights; tied weights once
    <out_dir>/step-<N>/optimizer.safetensors  AdamW state as "<param name>:<key>" tensors,
                                              param_groups in the file's metadata
    <out_dir>/step-<N>/config.json            model config, train config, step, data position
    <out_dir>/step-<N>/manifest.json          size and sha256 of each of the three files
    <out_dir>/latest                          "step-<N>", written last and atomically

A save writes into a hidden temporary directory (every file fsynced, the
manifest last), renames it to ``step-<N>`` and only then replaces ``latest``
(write to a temporary file + ``os.replace``), so an interrupted save leaves
``latest`` naming the previous complete checkpoint. ``keep_last`` then
deletes the oldest ``step-<N>`` directories, never the one ``latest`` names.

Loading is all-or-nothing: every file is checked against the manifest (a
truncated or bit-flipped file is caught before it is parsed), then every
tensor against the caller's model and optimizer (keys, shapes, dtypes), and
only then is anything in the model or optimizer changed. Every failure is a
:class:`CheckpointError` naming the file and what is wrong.

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
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from metalm_fast.models.metalm import MetaLM, MetaLMConfig
from metalm_fast.training.distributed import is_sharded, unwrap_model

__all__ = [
    "CheckpointError",
    "checkpoint_steps",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model",
    "load_optimizer_state",
    "optimizer_state_dict",
    "read_checkpoint_meta",
    "save_checkpoint",
]

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
#: 2: a manifest.json of sizes and sha256 digests (format 1 had none and is not read)
FORMAT_VERSION = 2
#: the files a manifest covers, in the order a save writes them
CHECKPOINT_FILES = (MODEL_FILE, OPTIMIZER_FILE, CONFIG_FILE)
_STEP_DIRECTORY = re.compile(r"step-(\d+)")
#: how many mismatches an error lists before "... and N more"
_LISTED = 5


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged, or does not fit the model or optimizer.

    ``path`` is the file (or directory) at fault; the message starts with it
    and says what is wrong.
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


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
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    source: str | os.PathLike | None = None,
) -> None:
    """Load a name-keyed full optimizer state (every rank holds all of it under FSDP2).

    The state is checked against ``model``'s parameters and ``optimizer``'s
    groups first (names, shapes, dtypes), so a state that does not fit
    changes nothing. ``source``, the file it came from, is named in the
    :class:`CheckpointError` (a ValueError without it).
    """
    _check_optimizer_state(source, state, model)
    _check_optimizer_groups(source, state, model, optimizer)
    _set_optimizer_state(model, optimizer, state)


def _set_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
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


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) to the disk: a rename is only
    as durable as what it renames."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(directory: Path) -> None:
    """``manifest.json``: the size and sha256 of every checkpoint file, written after them."""
    files = {
        name: {"size": (directory / name).stat().st_size, "sha256": _file_digest(directory / name)}
        for name in CHECKPOINT_FILES
    }
    manifest = directory / MANIFEST_FILE
    manifest.write_text(json.dumps({"format": FORMAT_VERSION, "files": files}, indent=2) + "\n")
    _fsync(manifest)


def _write_files(
    directory: Path, weights: dict, optimizer_state: dict, meta: dict, aliases: dict[str, str]
) -> None:
    directory.mkdir(parents=True)
    unique = {k: v.detach().cpu().contiguous() for k, v in weights.items() if k not in aliases}
    save_file(unique, str(directory / MODEL_FILE), metadata={"tied": json.dumps(aliases)})
    tensors, metadata = _flatten_optimizer_state(optimizer_state)
    save_file(tensors, str(directory / OPTIMIZER_FILE), metadata=metadata)
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    for name in CHECKPOINT_FILES:
        _fsync(directory / name)
    _write_manifest(directory)
    _fsync(directory)


def _publish(out_dir: Path, staging: Path, name: str) -> Path:
    """Move a complete staging directory to ``out_dir/name``, then point ``latest`` at it."""
    target = out_dir / name
    previous = out_dir / f".{name}.old"
    if target.exists():  # a re-run saving the same step again: keep the old one until swapped
        shutil.rmtree(previous, ignore_errors=True)
        target.rename(previous)
    staging.rename(target)
    _fsync(out_dir)
    shutil.rmtree(previous, ignore_errors=True)
    pointer = out_dir / f".{LATEST_FILE}.tmp"
    pointer.write_text(name + "\n")
    _fsync(pointer)
    os.replace(pointer, out_dir / LATEST_FILE)
    _fsync(out_dir)
    return target


def checkpoint_steps(out_dir: str | os.PathLike) -> list[int]:
    """The steps of the complete-looking ``step-<N>`` directories in ``out_dir``, ascending."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    steps = []
    for entry in out_dir.iterdir():
        match = _STEP_DIRECTORY.fullmatch(entry.name)
        if match and entry.is_dir():
            steps.append(int(match.group(1)))
    return sorted(steps)


def _prune(out_dir: Path, keep_last: int, current: str) -> None:
    """Delete all but the newest ``keep_last`` step directories (``current`` always stays)."""
    if keep_last <= 0:
        return
    for step in checkpoint_steps(out_dir)[:-keep_last]:
        if f"step-{step}" != current:
            shutil.rmtree(out_dir / f"step-{step}", ignore_errors=True)


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
    keep_last: int = 0,
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
    keep_last : after ``latest`` points at the new checkpoint, delete all but
        the newest ``keep_last`` ``step-<N>`` directories; 0 keeps every one.

    Returns
    -------
    Path of the checkpoint directory.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {keep_last}")
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
    target = _publish(out_dir, staging, name)
    _prune(out_dir, keep_last, name)
    return target


def latest_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory for ``path``: a run directory (follows ``latest``)
    or a ``step-<N>`` directory itself.

    Raises
    ------
    FileNotFoundError
        when ``path`` holds neither a ``latest`` pointer nor a config.json.
    CheckpointError
        when ``latest`` names something that is not a checkpoint directory.
    """
    path = Path(path)
    pointer = path / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not _STEP_DIRECTORY.fullmatch(name):
            raise CheckpointError(pointer, f"names {name!r}, expected 'step-<N>'")
        target = path / name
        if not (target / CONFIG_FILE).is_file():
            raise CheckpointError(pointer, f"names {target}, which has no {CONFIG_FILE}")
        return target
    if (path / CONFIG_FILE).is_file():
        return path
    raise FileNotFoundError(
        f"no checkpoint at {path}: expected a '{LATEST_FILE}' pointer or a {CONFIG_FILE}"
    )


def _read_manifest(directory: Path) -> dict[str, tuple[int, str]]:
    """``{file name: (size, sha256)}`` for every file of :data:`CHECKPOINT_FILES`."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(
            path,
            f"missing: every complete save (format {FORMAT_VERSION}) writes one last, "
            f"so this checkpoint is incomplete or of an older format",
        )
    try:
        files = json.loads(path.read_text())["files"]
        return {
            name: (int(files[name]["size"]), str(files[name]["sha256"]))
            for name in CHECKPOINT_FILES
        }
    except (
        ValueError,
        KeyError,
        TypeError,
    ) as error:  # JSON, UTF-8 and int() errors are ValueErrors
        raise CheckpointError(path, f"not a readable manifest ({error!r})") from error


def _verified(directory: Path, manifest: dict[str, tuple[int, str]], name: str) -> Path:
    """``directory/name``, once its size and sha256 match the manifest."""
    path = directory / name
    size, digest = manifest[name]
    if not path.is_file():
        raise CheckpointError(path, f"missing (listed in {MANIFEST_FILE})")
    actual = path.stat().st_size
    if actual != size:
        raise CheckpointError(
            path, f"{actual} bytes where {MANIFEST_FILE} says {size}: truncated or overwritten"
        )
    if _file_digest(path) != digest:
        raise CheckpointError(path, f"sha256 differs from {MANIFEST_FILE}'s: the file is corrupted")
    return path


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            return tensors, handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(path, f"not a readable safetensors file ({error})") from error


def _read_meta(directory: Path, manifest: dict[str, tuple[int, str]]) -> dict[str, Any]:
    path = _verified(directory, manifest, CONFIG_FILE)
    try:
        meta = json.loads(path.read_text())
    except ValueError as error:
        raise CheckpointError(path, f"not valid JSON ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(
            path, f"checkpoint format {found!r}, this version reads {FORMAT_VERSION}"
        )
    missing = [key for key in ("step", "data_position", "model_config") if key not in meta]
    if missing:
        raise CheckpointError(path, f"lacks {missing}")
    return meta


def _model_config(directory: Path, meta: dict[str, Any]) -> MetaLMConfig:
    try:
        return MetaLMConfig(**meta["model_config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            directory / CONFIG_FILE, f"model_config does not build a MetaLMConfig ({error})"
        ) from error


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def _describe(tensor: torch.Tensor) -> str:
    return f"{list(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


def _check_model_config(directory: Path, meta: dict[str, Any], model: nn.Module) -> None:
    """A model with a MetaLMConfig must be the one the checkpoint was written for."""
    config = getattr(model, "config", None)
    if not isinstance(config, MetaLMConfig):
        return
    # Through JSON, as the file holds it (tuples become lists, nested configs dicts).
    ours, theirs = json.loads(json.dumps(dataclasses.asdict(config))), meta["model_config"]
    differences = [
        f"{key} {theirs.get(key)!r} in the file, {ours.get(key)!r} in the model"
        for key in sorted(ours.keys() | theirs.keys())
        if ours.get(key) != theirs.get(key)
    ]
    if differences:
        raise CheckpointError(
            directory / CONFIG_FILE, f"written for another model: {_listing(differences)}"
        )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model file's tensors, the tied aliases restored (sharing one tensor)."""
    tensors, metadata = _read_safetensors(path)
    try:
        aliases = json.loads(metadata.get("tied", "{}"))
        for alias, canonical in aliases.items():
            tensors[alias] = tensors[canonical]
    except (ValueError, KeyError, AttributeError) as error:
        raise CheckpointError(path, f"its 'tied' metadata is malformed ({error!r})") from error
    return tensors


def _check_weights(path: Path, tensors: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Every key of the model, nothing else, each with the model's shape and dtype."""
    expected = model.state_dict()
    problems = []
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing:
        problems.append(f"missing {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listing(unexpected)}")
    mismatched = [
        f"{name} is {_describe(tensors[name])}, the model's {_describe(expected[name])}"
        for name in sorted(expected.keys() & tensors.keys())
        if tensors[name].shape != expected[name].shape
        or tensors[name].dtype != expected[name].dtype
    ]
    if mismatched:
        problems.append(_listing(mismatched))
    if problems:
        raise CheckpointError(path, "does not fit the model: " + "; ".join(problems))


def _read_optimizer_state(path: Path) -> dict[str, Any]:
    try:
        return _unflatten_optimizer_state(*_read_safetensors(path))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(path, f"malformed optimizer state ({error!r})") from error


def _optimizer_error(source: str | os.PathLike | None, problem: str) -> ValueError:
    if source is None:
        return ValueError(f"optimizer state {problem}")
    return CheckpointError(source, problem)


def _check_optimizer_state(
    source: str | os.PathLike | None, state: dict[str, Any], model: nn.Module
) -> None:
    """Entries and groups name the model's parameters; tensors have their shapes and dtypes."""
    parameters = dict(unwrap_model(model).named_parameters())
    grouped = [name for group in state["param_groups"] for name in group["params"]]
    problems = []
    unknown = sorted((set(grouped) | state["state"].keys()) - parameters.keys())
    if unknown:
        problems.append(f"names parameters the model lacks: {_listing(unknown)}")
    ungrouped = sorted(parameters.keys() - set(grouped))
    if ungrouped:
        problems.append(f"has no parameter group for {_listing(ungrouped)}")
    mismatched = [
        f"{name}:{key} is {_describe(value)}, the parameter {_describe(parameters[name])}"
        for name, entries in sorted(state["state"].items())
        if name in parameters
        for key, value in sorted(entries.items())
        # 0-dim tensors are per-parameter scalars (AdamW's step), not per-element state
        if isinstance(value, torch.Tensor)
        and value.dim() > 0
        and (value.shape != parameters[name].shape or value.dtype != parameters[name].dtype)
    ]
    if mismatched:
        problems.append(_listing(mismatched))
    if problems:
        raise _optimizer_error(source, "does not fit the model: " + "; ".join(problems))


def _check_optimizer_groups(
    source: str | os.PathLike | None,
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> None:
    """The state's parameter groups list the optimizer's parameters, group by group."""
    names = {id(p): name for name, p in unwrap_model(model).named_parameters()}
    ours = [[names.get(id(p), "?") for p in group["params"]] for group in optimizer.param_groups]
    theirs = [list(group["params"]) for group in state["param_groups"]]
    if ours != theirs:
        raise _optimizer_error(
            source,
            f"its parameter groups ({[len(g) for g in theirs]} parameters) are not the "
            f"optimizer's ({[len(g) for g in ours]} parameters, in the model's order)",
        )


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Read a checkpoint: the model with its weights, the optimizer state, the metadata.

    All or nothing: every file is verified against the manifest and every
    tensor against ``model`` (and ``optimizer``) before either changes.

    Parameters
    ----------
    path : a run directory (its ``latest`` checkpoint) or a ``step-<N>`` directory.
    model : a plain (not DDP/FSDP-wrapped) model to load into; None builds a
        :class:`MetaLM` from config.json on the CPU. A model with a
        ``MetaLMConfig`` must have the checkpoint's.
    optimizer : ``model``'s optimizer, to load the optimizer state into as well
        (None: only return the state, for :func:`load_optimizer_state`).

    Returns
    -------
    (model, optimizer_state, meta): ``optimizer_state`` is name-keyed
    ``{"state": {name: {key: value}}, "param_groups": [...]}`` for
    :func:`load_optimizer_state`; ``meta`` is config.json (step, data_position,
    model_config, train_config).

    Raises
    ------
    FileNotFoundError
        when ``path`` holds no checkpoint at all.
    CheckpointError
        naming the file: missing, truncated or corrupted (size or sha256 differ
        from the manifest), unreadable, or not fitting the model or optimizer
        (the differing config fields, or missing/unexpected keys, shapes, dtypes).
    """
    directory = latest_checkpoint(path)
    manifest = _read_manifest(directory)
    meta = _read_meta(directory, manifest)
    if model is None:
        model = MetaLM(_model_config(directory, meta))
    _check_model_config(directory, meta, model)
    weights_path = _verified(directory, manifest, MODEL_FILE)
    optimizer_path = _verified(directory, manifest, OPTIMIZER_FILE)
    weights = _read_weights(weights_path)
    _check_weights(weights_path, weights, model)
    optimizer_state = _read_optimizer_state(optimizer_path)
    _check_optimizer_state(optimizer_path, optimizer_state, model)
    if optimizer is not None:
        _check_optimizer_groups(optimizer_path, optimizer_state, model, optimizer)
    # Everything is checked: from here on nothing is expected to fail.
    model.load_state_dict(weights, strict=True)
    if optimizer is not None:
        _set_optimizer_state(model, optimizer, optimizer_state)
    return model, optimizer_state, meta


def read_checkpoint_meta(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(checkpoint directory, its verified config.json) for ``path``, reading no tensor."""
    directory = latest_checkpoint(path)
    return directory, _read_meta(directory, _read_manifest(directory))


def load_model(path: str | os.PathLike) -> MetaLM:
    """A :class:`MetaLM` built from a checkpoint's config.json with its weights, in eval mode.

    Raises FileNotFoundError or :class:`CheckpointError` as :func:`load_checkpoint`.

    Example
    -------
    >>> model = load_model("runs/tiny")          # doctest: +SKIP
    """
    directory = latest_checkpoint(path)
    manifest = _read_manifest(directory)
    model = MetaLM(_model_config(directory, _read_meta(directory, manifest)))
    weights_path = _verified(directory, manifest, MODEL_FILE)
    weights = _read_weights(weights_path)
    _check_weights(weights_path, weights, model)
    model.load_state_dict(weights, strict=True)
    return model.eval()
