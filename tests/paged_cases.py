"""Builders shared by the paged KV-cache tests: caches, block tables, slots."""

from __future__ import annotations

import math

import pytest
import torch

from metalm_fast.ops._backend import cpu_extension, unavailable_reason
from tests.tolerance import assert_within_tolerance


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


def row_golden(q, k_cache, v_cache, block_table, seq_lens, scale=None) -> torch.Tensor:
    """float64 [B, Hq, D]: each row (sequence b, query head h) on its own, over exactly
    its allowed keys (positions < seq_lens[b], clamped to the table, on pages inside the
    pool, compared in int64): softmax(scale * K q) V in float64, as torch computes it (a
    row with no key is 0; a NaN or inf goes where that math takes it)."""
    batch, heads, head_dim = q.shape
    num_blocks, block_size, kv_heads = k_cache.shape[:3]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    table = block_table.to(torch.int64)
    capacity = table.shape[1] * block_size
    out = torch.zeros(batch, heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        length = min(max(int(seq_lens[b]), 0), capacity)
        keys = [
            (int(table[b, p // block_size]), p % block_size)
            for p in range(length)
            if 0 <= int(table[b, p // block_size]) < num_blocks
        ]
        if not keys:
            continue
        pages = torch.tensor([page for page, _ in keys])
        offsets = torch.tensor([offset for _, offset in keys])
        k_rows = k_cache[pages, offsets].double()  # [n, Hkv, D]
        v_rows = v_cache[pages, offsets].double()
        for h in range(heads):
            scores = (k_rows[:, h // group] @ q[b, h].double()) * scale
            out[b, h] = torch.softmax(scores, dim=0) @ v_rows[:, h // group]
    return out


def assert_matches_golden(out, golden, baseline, name="out") -> None:
    """NaN and inf exactly where the golden has them (same sign), the tolerance rule on
    the finite entries (``baseline``: the reference in the test dtype)."""
    out64 = out.detach().double().cpu()
    nan = torch.isnan(golden)
    assert torch.equal(torch.isnan(out64), nan), (
        f"{name}: NaN at {torch.nonzero(torch.isnan(out64) != nan)[:8].tolist()} "
        "differs from the golden (rows, heads, dims)"
    )
    inf = torch.isinf(golden)
    assert torch.equal(torch.isinf(out64), inf), f"{name}: inf pattern differs from the golden"
    assert torch.equal(out64[inf], golden[inf]), f"{name}: an inf has the wrong sign"
    finite = torch.isfinite(golden)

    def finite_part(t):
        return torch.where(finite, t.detach().double().cpu(), torch.zeros_like(golden))

    assert_within_tolerance(
        finite_part(out).to(out.dtype), finite_part(golden), finite_part(baseline), name
    )
