"""The oracle: every op in plain PyTorch with dense masks, in any dtype.

Nothing here is fast; everything here is obviously right. Tests compare the
kernels against these functions run in float64 (the golden) and in the test
dtype (the baseline), as docs/ARCHITECTURE.md's correctness policy describes.
Autograd through these functions gives the reference gradients; they are
written so that queries with an empty interval get output 0, lse -inf and
zero gradients, with no NaN anywhere.
"""

from __future__ import annotations

import math

import torch

from metalm_fast.masks import SpanMask

__all__ = ["span_attention"]


def span_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: SpanMask,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention over packed tokens, computed in ``q.dtype``.

    Parameters
    ----------
    q : [Tq, Hq, D];  k, v : [Tk, Hkv, D] with Hq a multiple of Hkv (query head
        ``h`` uses key/value head ``h // (Hq // Hkv)``).
    mask : SpanMask over (Tq, Tk).
    scale : softmax scale, default ``1 / sqrt(D)``.

    Returns
    -------
    out : [Tq, Hq, D] in ``q.dtype``
    lse : [Hq, Tq], natural-log log-sum-exp of the scaled scores over attended
        keys, in ``q.dtype``; ``-inf`` for a query with no keys.
    """
    num_queries, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    keys = k.repeat_interleave(group, dim=1)  # [Tk, Hq, D]
    values = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, keys) * scale  # [Hq, Tq, Tk]
    allowed = mask.to_dense().to(q.device)[None]  # [1, Tq, Tk]
    empty_row = ~allowed.any(dim=-1, keepdim=True)  # [1, Tq, 1]
    # Empty rows take zeros before the log-sum-exp so its backward never sees
    # exp(-inf - -inf); their lse is replaced by -inf afterwards.
    neg_inf = torch.full_like(scores, -math.inf)
    safe_scores = torch.where(allowed, scores, neg_inf)
    safe_scores = torch.where(empty_row, torch.zeros_like(scores), safe_scores)
    lse = torch.logsumexp(safe_scores, dim=-1, keepdim=True)  # [Hq, Tq, 1]
    # exp of the -inf-filled scores: masked entries are exactly 0 and their
    # backward is 0 * 0, never 0 * inf (a masked score far above lse would
    # overflow exp in fp16).
    probs = torch.where(allowed, torch.exp(safe_scores - lse), torch.zeros_like(scores))
    out = torch.einsum("hqk,khd->qhd", probs, values)
    lse = torch.where(empty_row, torch.full_like(lse, -math.inf), lse)
    return out, lse.squeeze(-1)


def span_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: SpanMask,
    *,
    grad_lse: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The explicit backward of :func:`span_attention`, dense, in ``q.dtype``.

    With ``P`` the attention probabilities, ``O`` the output and ``dO``,
    ``dLSE`` the incoming gradients::

        delta = rowsum(dO * O) - dLSE
        dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta)
        dQ = scale * dS K,   dK = scale * dS^T Q

    summed over the query heads that share a key/value head. Kernels implement
    exactly this; autograd through :func:`span_attention` gives the same result.
    """
    num_queries, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    out, lse = span_attention(q, k, v, mask, scale=scale)
    keys = k.repeat_interleave(group, dim=1)
    values = v.repeat_interleave(group, dim=1)
    allowed = mask.to_dense().to(q.device)[None]
    scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None]
    probs = torch.where(allowed, torch.exp(scores - finite_lse), torch.zeros_like(scores))
    delta = (grad_out * out).sum(-1).transpose(0, 1)  # [Hq, Tq]
    if grad_lse is not None:
        delta = delta - grad_lse.to(delta.dtype)
    grad_values = torch.einsum("hqk,qhd->khd", probs, grad_out)
    grad_probs = torch.einsum("qhd,khd->hqk", grad_out, values)
    grad_scores = probs * (grad_probs - delta[..., None])
    grad_q = torch.einsum("hqk,khd->qhd", grad_scores, keys) * scale
    grad_keys = torch.einsum("hqk,qhd->khd", grad_scores, q) * scale
    tokens, kv_heads = k.shape[0], k.shape[1]
    grad_k = grad_keys.reshape(tokens, kv_heads, group, head_dim).sum(2)
    grad_v = grad_values.reshape(tokens, kv_heads, group, head_dim).sum(2)
    return grad_q, grad_k, grad_v


def embed_scatter(
    token_ids: torch.Tensor,
    weight: torch.Tensor,
    features: torch.Tensor,
    feature_index: torch.Tensor,
    *,
    scale: float = 1.0,
) -> torch.Tensor:
    """Token embeddings with encoder features scattered in, in ``weight.dtype``.

    ``out[t] = weight[token_ids[t]] * scale`` where ``feature_index[t] < 0``, else
    ``features[feature_index[t]]``. Token ids at feature positions are never
    read. Autograd gives the reference gradients (weight rows of unused ids are 0).
    """
    is_feature = feature_index >= 0
    safe_ids = torch.where(is_feature, torch.zeros_like(token_ids), token_ids)
    safe_rows = torch.where(is_feature, feature_index, torch.zeros_like(feature_index))
    embedded = weight[safe_ids] * scale
    if features.shape[0] == 0:
        return embedded
    scattered = features[safe_rows].to(embedded.dtype)
    return torch.where(is_feature[:, None], scattered, embedded)


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
