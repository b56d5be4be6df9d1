"""Mask and tensor builders shared by the attention tests."""

from __future__ import annotations

import torch

from metalm_fast import SpanMask

MASK_KINDS = ("causal", "bidirectional", "semi_causal", "prefix_lm", "sliding_window", "intervals")


def make_mask(kind: str, seqlens: list[int], seed: int = 0) -> SpanMask:
    """A mask of ``kind`` over packed sequences of ``seqlens`` (zeros allowed)."""
    generator = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + seqlens).cumsum(0)
    total = int(cu[-1])
    if kind == "causal":
        return SpanMask.causal(cu)
    if kind == "bidirectional":
        return SpanMask.bidirectional(cu)
    if kind == "sliding_window":
        return SpanMask.sliding_window(cu, 7)
    if kind == "prefix_lm":
        prefix = [int(torch.randint(0, n + 1, (1,), generator=generator)) for n in seqlens]
        return SpanMask.prefix_lm(cu, prefix)
    if kind == "semi_causal":
        starts, ends = [], []
        for begin, length in zip(cu[:-1].tolist(), seqlens):
            if length >= 3:  # one span in the middle third of each long-enough sequence
                starts.append(begin + length // 3)
                ends.append(begin + max(length // 3 + 1, 2 * length // 3))
        return SpanMask.semi_causal(cu, starts, ends)
    if kind == "intervals":
        # Arbitrary intervals, some empty, not monotone.
        start = torch.randint(0, max(total, 1), (total,), generator=generator)
        length = torch.randint(0, max(total, 1), (total,), generator=generator)
        end = torch.minimum(start + length, torch.tensor(total))
        empty = torch.rand(total, generator=generator) < 0.2
        end = torch.where(empty, start, end)
        return SpanMask.from_intervals(start, end, total)
    raise ValueError(kind)


def make_qkv(
    total: int, heads: int, kv_heads: int, head_dim: int, dtype, *, fused: bool, seed: int = 0
):
    """q [T, Hq, D], k and v [T, Hkv, D]; with ``fused`` they are slices of one tensor."""
    generator = torch.Generator().manual_seed(seed)
    if fused:
        qkv = torch.randn(total, heads + 2 * kv_heads, head_dim, generator=generator).to(dtype)
        q = qkv[:, :heads]
        k = qkv[:, heads : heads + kv_heads]
        v = qkv[:, heads + kv_heads :]
        return q, k, v
    q = torch.randn(total, heads, head_dim, generator=generator).to(dtype)
    k = torch.randn(total, kv_heads, head_dim, generator=generator).to(dtype)
    v = torch.randn(total, kv_heads, head_dim, generator=generator).to(dtype)
    return q, k, v
