"""Builders shared by the paged KV-cache tests: caches, block tables, slots."""

from __future__ import annotations

import math

import pytest
import torch

from metalm_fast.ops._backend import cpu_extension, unavailable_reason


def require_backend(backend: str, cpu_op: str) -> None:
    """Skip unless ``backend`` can run here (and the built _C holds ``cpu_op``)."""
    if backend == "triton":
        reason = unavailable_reason("triton", torch.device("cpu"))
        if reason is not None:
            pytest.skip(reason)
    if backend == "cpu" and not hasattr(torch.ops.metalm, cpu_op):
        cpu_extension()
        if not hasattr(torch.ops.metalm, cpu_op):
            pytest.skip(f"metalm_fast._C has no {cpu_op}: rebuild it (pip install -e .)")


def paged_layout(
    lengths: list[int], block_size: int, spare: int = 3, seed: int = 0, contiguous: bool = False
):
    """(num_blocks, block_table int32 [B, max_blocks]): each sequence's pages are drawn
    from a random permutation of ``spare`` times the pages all sequences need, or with
    ``contiguous`` handed out in order (sequence 0 takes pages 0, 1, ..., sequence 1 the
    next ones), as a fresh PagedKVCache does."""
    generator = torch.Generator().manual_seed(seed)
    needed = [math.ceil(length / block_size) for length in lengths]
    num_blocks = max(1, sum(needed)) * spare
    order = (
        torch.arange(num_blocks) if contiguous else torch.randperm(num_blocks, generator=generator)
    )
    table = torch.zeros(len(lengths), max(needed + [1]), dtype=torch.int32)
    used = 0
    for b, count in enumerate(needed):
        table[b, :count] = order[used : used + count]
        used += count
    return num_blocks, table


def random_caches(
    num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype, seed: int = 0
):
    generator = torch.Generator().manual_seed(seed + 1)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return (
        torch.randn(shape, generator=generator).to(dtype),
        torch.randn(shape, generator=generator).to(dtype),
    )


def slots_of(table: torch.Tensor, block_size: int, b: int, first: int, count: int) -> list[int]:
    """Slots of positions [first, first + count) of sequence b."""
    return [
        int(table[b, p // block_size]) * block_size + p % block_size
        for p in range(first, first + count)
    ]
