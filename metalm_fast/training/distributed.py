"""One process or torchrun: process group, device, DDP / FSDP2 wrapping, gradient sync.

Under ``torchrun --nproc-per-node N`` the launcher sets ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK``; :func:`init_distributed` reads them and starts the process
group (gloo on CPU, nccl on CUDA). Without them the run is a single process,
and asking for ``parallel="ddp"`` or ``"fsdp"`` is an error rather than a
silent world of one: a flag that does nothing would hide a launch mistake.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every
:class:`~metalm_fast.models.transformer.TransformerBlock` and then the root
module. It runs on CPU with gloo as well as on CUDA with nccl. The tied
decoder embedding (``lm_head.weight is embedding.weight``) is one Parameter
owned by the root group, so it stays tied after sharding (and under DDP,
which replicates the module as is).

Both rely on every rank running the same modules each step: MetaLM runs each
encoder on every batch, on zero rows when it holds no span or image, so a
rank without spans still joins the encoder's gradient reduction (DDP) and
all-gathers (FSDP2).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistributedContext",
    "all_reduce_max",
    "all_reduce_sum",
    "gradient_sync",
    "init_distributed",
    "is_sharded",
    "resolve_device",
    "shutdown",
    "unwrap_model",
    "wrap_model",
]

PARALLEL_MODES = ("none", "ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: its rank, the world size, its device, the wrapping."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    parallel: str
    owns_process_group: bool  # True when init_distributed started it (and shutdown ends it)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes files."""
        return self.rank == 0


def _torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's variables, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    return rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank))


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; CUDA picks the local rank's GPU."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but torch sees no CUDA device")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(parallel: str, device: str = "auto") -> DistributedContext:
    """Start (or join) the process group when running under torchrun.

    Parameters
    ----------
    parallel : "none", "ddp" or "fsdp".
    device : "auto", "cpu" or "cuda".

    Raises
    ------
    ValueError
        for an unknown ``parallel`` or ``device``; ``parallel`` other than
        "none" outside torchrun; ``parallel="none"`` under torchrun with more
        than one process (every rank would train the same model alone).
    """
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    env = _torchrun_env()
    if env is None:
        if parallel != "none":
            raise ValueError(
                f"parallel={parallel!r} needs torchrun (RANK and WORLD_SIZE are not set); "
                f"launch with `torchrun --nproc-per-node N ...` or use parallel='none'"
            )
        return DistributedContext(0, 1, 0, resolve_device(device), parallel, False)
    rank, world_size, local_rank = env
    if parallel == "none" and world_size > 1:
        raise ValueError(
            f"running under torchrun with WORLD_SIZE={world_size} but parallel='none'; "
            f"choose parallel='ddp' or 'fsdp'"
        )
    torch_device = resolve_device(device, local_rank)
    owns = False
    if not dist.is_initialized():
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
        owns = True
    return DistributedContext(rank, world_size, local_rank, torch_device, parallel, owns)


def shutdown(context: DistributedContext) -> None:
    """Destroy the process group if this context started it."""
    if context.owns_process_group and dist.is_initialized():
        # Every rank reaches teardown before any tears down: a gloo rank whose peer
        # had already closed its connections aborted at exit ("terminate called
        # without an active exception", about 1 run in 5 of the 2-rank test).
        dist.barrier()
        dist.destroy_process_group()


def _shard_fsdp2(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    from metalm_fast.nn import TransformerBlock

    # One FSDP group per block: its parameters are gathered only while it runs.
    for module in list(model.modules()):
        if isinstance(module, TransformerBlock):
            fully_shard(module)
    # The root group holds the rest, the tied embedding included (one Parameter).
    fully_shard(model)
    return model


def wrap_model(model: nn.Module, context: DistributedContext) -> nn.Module:
    """The model as the training loop drives it: itself, DDP, or FSDP2-sharded in place."""
    if context.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [context.device.index] if context.device.type == "cuda" else None
        # Every parameter takes part in every step (MetaLM runs each encoder even on
        # zero rows), so DDP need not search the graph for unused ones.
        return DistributedDataParallel(model, device_ids=device_ids)
    if context.parallel == "fsdp":
        return _shard_fsdp2(model)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP (FSDP2 modifies the module in place: nothing to unwrap)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    """True when FSDP2 has sharded the model (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap_model(model), FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the cross-rank gradient reduction inside the block when ``enabled`` is False.

    Gradient accumulation reduces once, on the last micro-batch: DDP's
    ``no_sync()``, FSDP2's ``set_requires_gradient_sync(False)``; a plain
    module has nothing to skip.
    """
    if enabled:
        yield
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
        return
    if is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (a no-op in a single process); returns it."""
    if context.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """The elementwise maximum of ``tensor`` over ranks, in place; returns it."""
    if context.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor
