"""Reference paged KV cache: appending to the pages and decode attention over them."""

from __future__ import annotations

import math

import torch

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

    Each sequence is computed on its own, over exactly its keys: positions
    ``p < seq_lens[b]`` (clamped to ``[0, max_blocks * block_size]``) whose page
    ``block_table[b, p // block_size]`` is inside ``[0, num_blocks)``; keys on
    other pages are skipped, as the kernels skip them. Both indices are compared
    in int64, so no out-of-range value aliases a valid one. Then::

        out[b, h] = exp(s - logsumexp(s)) @ v,    s = scale * k @ q[b, h]

    in ``q.dtype``, so a NaN or inf in q, k or v reaches exactly the rows whose keys
    include it, as that float math says; a sequence with no key gets zeros (and
    one whose scores are all -inf gets NaN, as softmax does).
    """
    batch, num_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads = k_cache.shape[:3]
    group = num_heads // kv_heads
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    capacity = block_table.shape[1] * block_size
    lengths = seq_lens.to(torch.int64).cpu().clamp(0, capacity)
    table = block_table.to(torch.int64).cpu()
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    for b, length in enumerate(lengths.tolist()):
        positions = torch.arange(length)
        pages = table[b, positions // block_size]
        inside = (pages >= 0) & (pages < num_blocks)
        if not bool(inside.any()):
            continue  # no key: zeros
        pages = pages[inside].to(k_cache.device)
        offsets = (positions % block_size)[inside].to(k_cache.device)
        keys = k_cache[pages, offsets].to(q.dtype).repeat_interleave(group, dim=1)  # [n, Hq, D]
        values = v_cache[pages, offsets].to(q.dtype).repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b], keys) * scale  # [Hq, n]
        probs = torch.exp(scores - torch.logsumexp(scores, dim=-1, keepdim=True))
        out[b] = torch.einsum("hn,nhd->hd", probs, values)
    return out
