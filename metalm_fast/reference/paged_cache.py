"""Reference paged KV cache: appending to the pages and decode attention over them."""

from __future__ import annotations

import torch

from metalm_fast.masks import SpanMask
from metalm_fast.reference.attention import span_attention

__all__ = ["gather_paged_kv", "kv_cache_append", "paged_decode_attention"]


def kv_cache_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new keys and values into a paged cache, in place, by advanced indexing.

    ``slot = block * block_size + offset`` addresses ``cache[block, offset]``
    (caches are [num_blocks, block_size, Hkv, D]); token ``t`` goes to
    ``slot_mapping[t]``. Slots < 0 and slots past the pool are skipped (never
    written). Slots must be distinct: with duplicates, which write wins is
    unspecified.
    """
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    slots = slot_mapping.to(torch.int64)
    keep = (slots >= 0) & (slots < num_blocks * block_size)
    blocks, offsets = slots[keep] // block_size, slots[keep] % block_size
    k_cache[blocks, offsets] = k_new[keep]
    v_cache[blocks, offsets] = v_new[keep]


def gather_paged_kv(
    cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor
) -> torch.Tensor:
    """Sequences' cached rows, packed: [sum(seq_lens), Hkv, D], one sequence at a time.

    Token ``p`` of sequence ``b`` is ``cache[block_table[b, p // block_size],
    p % block_size]``.
    """
    block_size = cache.shape[1]
    rows = []
    for b, length in enumerate(seq_lens.tolist()):
        positions = torch.arange(length, device=cache.device)
        pages = block_table[b].to(device=cache.device, dtype=torch.int64)[positions // block_size]
        rows.append(cache[pages, positions % block_size])
    if not rows:
        return cache.new_empty((0, *cache.shape[2:]))
    return torch.cat(rows)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """One query token per sequence over its cached pages, in ``q.dtype``: [B, Hq, D].

    The pages are gathered into packed keys and values (:func:`gather_paged_kv`)
    and query ``b`` attends exactly its own sequence's ``seq_lens[b]`` keys
    through :func:`span_attention`; a sequence of length 0 gets zeros.
    """
    lengths = seq_lens.to(torch.int64).cpu()
    keys = gather_paged_kv(k_cache, block_table, lengths).to(q.dtype)
    values = gather_paged_kv(v_cache, block_table, lengths).to(q.dtype)
    ends = lengths.cumsum(0)
    mask = SpanMask.from_intervals(ends - lengths, ends, keys.shape[0]).to(q.device)
    out, _ = span_attention(q, keys, values, mask, scale=scale)
    return out
