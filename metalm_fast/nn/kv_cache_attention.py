"""Attention with a paged KV cache: prefill, continued prefill and decode.

:func:`cached_attention` is what :class:`~metalm_fast.nn.SpanSelfAttention`
runs when it is given a cache. A step (:class:`~metalm_fast.nn.paged_kv_cache.CacheStep`)
adds ``query_lens[b]`` new tokens to sequence ``b``, which already holds
``context_lens[b]`` cached tokens. The new tokens' keys and values are appended
to the layer's pages first, then:

* decode (one new token per sequence): :func:`paged_decode_attention` over the
  pages, the token's own key included;
* prefill (no sequence has cached tokens): :func:`span_attention` over the new
  tokens with the given SpanMask (causal, semi-causal with image/text spans, ...);
* continued prefill (a follow-up turn, or a prompt fed in chunks): each new
  token attends to every cached token of its sequence and to the new tokens its
  mask allows. The sequences' keys are gathered from the pages into packed
  [sum(seq_lens), Hkv, D] tensors and span_attention runs with the mask's
  intervals shifted into that key space::

      chunk interval [s, e) of a token of sequence b (new-token coordinates)
        -> [key_start_b, key_start_b + context_lens[b] + (e - chunk_start_b))

  so the mask must start every interval at its sequence's first new token
  (causal, semi-causal, prefix-LM and bidirectional masks do); a mask that
  does not (a sliding window) raises ValueError. The gather copies the cached
  keys and values once per layer: correct for any chunk, and cheap next to the
  attention itself when chunks are long. A paged prefill kernel that reads the
  pages in place is future work.
"""

from __future__ import annotations

import torch

from metalm_fast.masks import SpanMask
from metalm_fast.nn.paged_kv_cache import CacheStep, PagedKVCache
from metalm_fast.ops.kv_cache_append import append_unchecked, checked_append_backend
from metalm_fast.ops.paged_decode_attention import (
    checked_decode_backend,
    decode_unchecked,
    kernel_indices,
)
from metalm_fast.ops.span_attention import span_attention

__all__ = ["cached_attention", "gather_cached_kv", "continued_prefill_mask"]


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cache: PagedKVCache,
    layer_idx: int,
    step: CacheStep,
    mask: SpanMask | None = None,
    backend: str = "auto",
    query_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Append this step's keys and values to ``layer_idx``'s pages and attend.

    Parameters
    ----------
    q : [T_new, Hq, D];  k, v : [T_new, Hkv, D], the new tokens packed in
        ``step.seq_ids`` order (rotary already applied).
    cache, layer_idx : where keys and values live.
    step : from ``cache.step(seq_ids, num_new_tokens)``, shared by all layers.
    mask : SpanMask over the new tokens (as if each chunk were a whole
        sequence); default causal. Unused when every sequence adds one token.
    backend : passed to every op ("auto" picks per device).
    query_rows : int64 [R] or None: attend for these new tokens only (prefill and
        continued prefill; every new token's keys and values are still appended).

    Returns
    -------
    [T_new, Hq, D] (or [R, Hq, D]) in q's dtype.
    """
    if step.num_tokens != q.shape[0]:
        raise ValueError(
            f"step adds {step.num_tokens} tokens but q has {q.shape[0]} (q.shape[0], step)"
        )
    k_cache, v_cache = cache.key_cache(layer_idx), cache.value_cache(layer_idx)
    if step.is_decode and query_rows is None:
        return _decode(q, k, v, k_cache, v_cache, cache, step, backend)
    cache.append(layer_idx, k, v, step.slot_mapping, backend=backend)
    if mask is None:
        mask = SpanMask.causal(step.cu_seqlens)
    if any(step.context_lens):
        k, v = gather_cached_kv(k_cache, step), gather_cached_kv(v_cache, step)
        mask = continued_prefill_mask(mask, step)
    if query_rows is not None:
        mask = mask.select_queries(query_rows)  # checks the rows first
        q = q[query_rows]
    return span_attention(q, k, v, mask, backend=backend)


def _decode(
    q, k, v, k_cache, v_cache, cache: PagedKVCache, step: CacheStep, backend: str
) -> torch.Tensor:
    """Append, then paged_decode_attention, with the ops' checks run once per step.

    Every layer of a decode step writes the same slots and reads the same block
    table and lengths, from layer views of one pool, and gets q, k, v of the same
    shapes, dtypes, devices and strides: kv_cache_append's and
    paged_decode_attention's checks (and backend choice) give every layer the same
    answer. They run in full for the first layer with a given signature; the
    others call the custom ops directly. This is an internal fast path: the public
    functions still check every call.
    """
    signature = (
        "decode",
        id(cache),
        backend,
        q.device,
        q.dtype,
        k.dtype,
        v.dtype,
        tuple(q.shape),
        tuple(k.shape),
        tuple(v.shape),
        q.stride(-1),
        k.stride(-1),
        v.stride(-1),
    )
    plan = step.memo.get(signature)
    if plan is None:
        append_backend = checked_append_backend(
            k_cache, v_cache, k, v, step.slot_mapping, backend=backend
        )
        decode_backend, scale = checked_decode_backend(
            q, k_cache, v_cache, step.block_table, step.seq_lens, backend=backend
        )
        # The cache rides along so that id(cache) cannot be reused while the memo lives.
        plan = step.memo[signature] = (
            cache,
            append_backend,
            decode_backend,
            scale,
            *kernel_indices(step.block_table, step.seq_lens, k_cache.shape[0], k_cache.shape[1]),
        )
    _, append_backend, decode_backend, scale, block_table, seq_lens = plan
    append_unchecked(k_cache, v_cache, k, v, step.slot_mapping, append_backend)
    return decode_unchecked(q, k_cache, v_cache, block_table, seq_lens, scale, decode_backend)


def gather_cached_kv(cache: torch.Tensor, step: CacheStep) -> torch.Tensor:
    """Every key (or value) of the step's sequences, packed: [sum(seq_lens), Hkv, D]."""
    block_size = cache.shape[1]
    lengths = [c + n for c, n in zip(step.context_lens, step.query_lens, strict=True)]
    device = cache.device
    counts = torch.tensor(lengths, device=device)
    starts = torch.cumsum(counts, 0) - counts
    total = sum(lengths)
    sequence = torch.repeat_interleave(
        torch.arange(len(lengths), device=device), counts, output_size=total
    )
    position = torch.arange(total, device=device) - starts[sequence]
    pages = step.block_table.to(torch.int64)[sequence, position // block_size]
    return cache[pages, position % block_size]


def continued_prefill_mask(mask: SpanMask, step: CacheStep) -> SpanMask:
    """Shift a mask over the new tokens into the key space of :func:`gather_cached_kv`."""
    if mask.num_queries != step.num_tokens or mask.num_keys != step.num_tokens:
        raise ValueError(
            f"mask must cover the step's {step.num_tokens} new tokens as queries and keys, got "
            f"{mask.num_queries} queries and {mask.num_keys} keys"
        )
    device = mask.kv_start.device
    query_lens = torch.tensor(step.query_lens, device=device)
    context = torch.tensor(step.context_lens, device=device)
    chunk_start = torch.cumsum(query_lens, 0) - query_lens
    key_start = torch.cumsum(query_lens + context, 0) - (query_lens + context)
    sequence = torch.repeat_interleave(
        torch.arange(len(step.query_lens), device=device), query_lens, output_size=step.num_tokens
    )
    start, end = mask.kv_start.to(torch.int64), mask.kv_end.to(torch.int64)
    late = start != chunk_start[sequence]
    if bool(late.any()):
        token = int(torch.nonzero(late)[0, 0])
        raise ValueError(
            f"mask: token {token}'s interval starts at {int(start[token])}, not at its sequence's "
            f"first new token {int(chunk_start[sequence][token])}; with cached tokens every "
            "interval must start there (causal, semi-causal, prefix-LM, bidirectional)"
        )
    new_start = key_start[sequence]
    new_end = new_start + context[sequence] + (end - chunk_start[sequence])
    total_keys = sum(c + n for c, n in zip(step.context_lens, step.query_lens, strict=True))
    return SpanMask.from_intervals(new_start, new_end, total_keys)
