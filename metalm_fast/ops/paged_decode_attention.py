"""paged_decode_attention: one new query token per sequence over its cached pages.

::

    out[b, h] = sum_p softmax_p(scale * q[b, h] . k_p) v_p,    p < seq_lens[b]
    k_p = k_cache[block_table[b, p // block_size], p % block_size, h // (Hq // Hkv)]

This is the generation step: each sequence's prompt and earlier tokens are in
the paged cache (metalm_fast.nn.paged_kv_cache, written by
metalm_fast.ops.kv_cache_append), and only the newest token's query is
computed. The work is reading K and V (about 2 * seq_len * Hkv * D elements per
sequence) against a few FLOPs per element, so every backend reads each key
and value row once for all Hq / Hkv query heads that share it (GQA).

Backends: ``triton`` (kernels/paged_decode_attention.py: flash-decoding, long
sequences split across programs and merged by a second kernel), ``cpu``
(csrc/cpu/paged_decode_attention.cpp: the same split-and-merge over threads)
and ``reference`` (each sequence on its own, over exactly its keys).

Indices are never narrowed before they are checked: int64 ``block_table`` and
``seq_lens`` are mapped into int32 by :func:`kernel_indices`, which compares
them with the pool and the table in int64 first, so 2**32 + 1 cannot alias page
1 or a length of 1 (an int32 table, the allocator's, is passed as it is).

Layers: the ``metalm::paged_decode_attention`` custom op with a fake
implementation (``torch.compile`` traces it) and the public function, which
validates on the host and picks a backend. Decode is inference: the op has no
autograd.
"""

from __future__ import annotations

import math

import torch

from metalm_fast import reference
from metalm_fast.ops._backend import cpu_extension, eager_inference, resolve_with_compiled_op
from metalm_fast.ops._validation import (
    check_float_tensor,
    check_gqa_heads,
    check_head_dim,
    check_index_tensor,
    check_scale,
)
from metalm_fast.ops.kv_cache_append import check_cache_pair

__all__ = ["paged_decode_attention"]

_SUPPORTED = ("triton", "cpu", "reference")
_COMPILED_OPS = {"cpu": "_paged_decode_attention_cpu"}


# ----------------------------------------------------------------------------- backends
def _decode_triton(q, k_cache, v_cache, block_table, seq_lens, scale):
    from metalm_fast.kernels.paged_decode_attention import paged_decode_attention_forward

    return paged_decode_attention_forward(q, k_cache, v_cache, block_table, seq_lens, scale)


def _decode_cpu(q, k_cache, v_cache, block_table, seq_lens, scale):
    cpu_extension()
    return torch.ops.metalm._paged_decode_attention_cpu(
        q, k_cache, v_cache, block_table, seq_lens, scale
    )


def _decode_reference(q, k_cache, v_cache, block_table, seq_lens, scale):
    # The oracle keeps the kernels' contract itself: lengths clamped to the table,
    # keys on pages outside the pool skipped.
    return reference.paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale=scale)


_DECODE = {"triton": _decode_triton, "cpu": _decode_cpu, "reference": _decode_reference}


# ----------------------------------------------------------------------------- custom op
@torch.library.custom_op("metalm::paged_decode_attention", mutates_args=())
def _paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    backend: str,
) -> torch.Tensor:
    """out [B, Hq, D] in q.dtype, contiguous."""
    return _DECODE[backend](q, k_cache, v_cache, block_table, seq_lens, scale).contiguous()


@_paged_decode_attention.register_fake
def _(q, k_cache, v_cache, block_table, seq_lens, scale, backend):
    return q.new_empty(q.shape)


# ----------------------------------------------------------------------------- validation
def _check_inputs(q, k_cache, v_cache, block_table, seq_lens, scale) -> None:
    check_float_tensor("q", q, "3-D [B, Hq, D]")
    check_cache_pair(k_cache, v_cache)
    if k_cache.dtype != q.dtype:
        raise TypeError(f"q dtype {q.dtype} must equal k_cache dtype {k_cache.dtype}")
    if k_cache.device != q.device:
        raise ValueError(f"q is on {q.device} but k_cache is on {k_cache.device}")
    if q.shape[-1] != k_cache.shape[-1]:
        raise ValueError(
            f"q and k_cache must have the same head dim, got {q.shape[-1]} and {k_cache.shape[-1]}"
        )
    check_head_dim(q.shape[-1], "q.shape[-1]")
    check_gqa_heads(q.shape[1], k_cache.shape[2], "q.shape[1]", "k_cache.shape[2]")
    check_index_tensor("block_table", block_table, "2-D [B, max_blocks]")
    check_index_tensor("seq_lens", seq_lens, "1-D [B]")
    batch = q.shape[0]
    if block_table.shape[0] != batch or seq_lens.shape[0] != batch:
        raise ValueError(
            f"block_table and seq_lens need one row per sequence of q (B={batch}), got "
            f"block_table {tuple(block_table.shape)} and seq_lens {tuple(seq_lens.shape)}"
        )
    for name, index in (("block_table", block_table), ("seq_lens", seq_lens)):
        if index.device != q.device:
            raise ValueError(f"{name} is on {index.device} but q is on {q.device}")
    check_scale(scale)


def _check_index_contents(block_table, seq_lens, num_blocks: int, block_size: int) -> None:
    """validate=True: lengths fit the table, used pages exist (one device sync)."""
    lengths = seq_lens.to(torch.int64).cpu()
    table = block_table.to(torch.int64).cpu()
    capacity = table.shape[1] * block_size
    for b, length in enumerate(lengths.tolist()):
        if length < 0 or length > capacity:
            raise ValueError(
                f"seq_lens[{b}] = {length} is beyond the sequence's pages: block_table has "
                f"{table.shape[1]} pages of {block_size} tokens per sequence ({capacity} tokens)"
            )
        used = table[b, : math.ceil(length / block_size)]
        outside = (used < 0) | (used >= num_blocks)
        if bool(outside.any()):
            page = int(torch.nonzero(outside)[0, 0])
            raise ValueError(
                f"block_table[{b}, {page}] = {int(used[page])} is outside the pool "
                f"[0, num_blocks={num_blocks})"
            )


# ----------------------------------------------------------------------------- public API
def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    validate: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of one query token per sequence over that sequence's cached pages.

    ::

        out[b, h] = sum_{p < seq_lens[b]} softmax_p(scale * q[b, h] . k_p) v_p
        k_p, v_p  = cache[block_table[b, p // block_size], p % block_size, h // (Hq // Hkv)]

    Parameters
    ----------
    q : [B, Hq, D], float16, bfloat16, float32 (or float64 on the cpu and
        reference backends); only the last dim must be contiguous.
    k_cache, v_cache : [num_blocks, block_size, Hkv, D] in q's dtype; Hq must
        be a multiple of Hkv (GQA / MQA). D is a multiple of 8 from 16 to 256.
    block_table : int32 or int64 [B, max_blocks]: sequence b's pages in order
        (entries past its last page are never read).
    seq_lens : int32 or int64 [B]: keys per sequence; sequences may differ in
        length, and a length of 0 gives an output of zeros.
    scale : softmax scale, default ``1 / sqrt(D)``.
    validate : check that ``0 <= seq_lens[b] <= max_blocks * block_size`` and
        that every page a sequence uses is in ``[0, num_blocks)`` (one device
        sync). Without it, lengths are clamped to that range and keys on pages
        outside the pool are skipped: nothing is ever read out of bounds. Both
        are compared in the indices' own width (int64 stays int64) on every
        backend, reference included.
    backend : {"auto", "triton", "cpu", "reference"}. "auto" picks triton on
        CUDA tensors and cpu on CPU tensors.

    Returns
    -------
    out : [B, Hq, D] in q's dtype, contiguous. Not differentiable (inference).
        Non-finite values follow the float math of each row over its own keys: a
        NaN or inf in q, k or v reaches exactly the rows whose keys include it;
        cache rows past ``seq_lens[b]``, other sequences' pages and free pages
        never reach row b; a row with no key is exact zeros, and one whose scores
        are all -inf is NaN (softmax of -inf only).

    Notes
    -----
    Fill the cache with :func:`kv_cache_append` (the new token's own key and
    value included, so ``seq_lens`` counts it); :class:`PagedKVCache` builds
    ``block_table``, ``seq_lens`` and the slots.

    Example
    -------
    >>> import torch
    >>> from metalm_fast import paged_decode_attention
    >>> k_cache, v_cache = torch.randn(8, 16, 2, 64), torch.randn(8, 16, 2, 64)
    >>> block_table = torch.tensor([[3, 5, 0], [1, 0, 0]], dtype=torch.int32)
    >>> seq_lens = torch.tensor([20, 7], dtype=torch.int32)
    >>> q = torch.randn(2, 8, 64)
    >>> paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens).shape
    torch.Size([2, 8, 64])
    """
    resolved, scale = checked_decode_backend(
        q, k_cache, v_cache, block_table, seq_lens, scale=scale, validate=validate, backend=backend
    )
    block_table, seq_lens = kernel_indices(
        block_table, seq_lens, k_cache.shape[0], k_cache.shape[1]
    )
    return decode_unchecked(q, k_cache, v_cache, block_table, seq_lens, scale, resolved)


def kernel_indices(
    block_table: torch.Tensor, seq_lens: torch.Tensor, num_blocks: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 ``block_table`` and ``seq_lens`` that mean what the given ones mean.

    An int64 index is range-checked in its own width before it is narrowed: a
    page id outside ``[0, num_blocks)`` becomes -1 (skipped, as any page outside
    the pool is) and a length is clamped to ``[0, max_blocks * block_size]`` (as
    every backend clamps it). Narrowed first, 2**32 + 1 would read page 1 or
    attend 1 key. No device sync; int32 tensors are returned as they are.
    """
    if block_table.dtype != torch.int32:
        outside = (block_table < 0) | (block_table >= num_blocks)
        block_table = block_table.masked_fill(outside, -1).to(torch.int32)
    if seq_lens.dtype != torch.int32:
        capacity = block_table.shape[1] * block_size
        seq_lens = seq_lens.clamp(0, capacity).to(torch.int32)
    return block_table, seq_lens


def checked_decode_backend(
    q,
    k_cache,
    v_cache,
    block_table,
    seq_lens,
    *,
    scale: float | None = None,
    validate: bool = False,
    backend: str = "auto",
) -> tuple[str, float]:
    """Every check of :func:`paged_decode_attention`; returns (backend, scale) for the call."""
    _check_inputs(q, k_cache, v_cache, block_table, seq_lens, scale)
    if validate:
        _check_index_contents(block_table, seq_lens, k_cache.shape[0], k_cache.shape[1])
    resolved = resolve_with_compiled_op(
        "paged_decode_attention", backend, q.device, _SUPPORTED, _COMPILED_OPS
    )
    if resolved == "triton" and q.dtype == torch.float64:
        raise TypeError(
            "the triton backend supports float16, bfloat16 and float32, got float64 (q)"
        )
    return resolved, float(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)


def decode_unchecked(
    q, k_cache, v_cache, block_table, seq_lens, scale: float, backend: str
) -> torch.Tensor:
    """:func:`paged_decode_attention` without its checks: int32 ``block_table`` and
    ``seq_lens`` from :func:`kernel_indices`, ``scale`` and ``backend`` from
    :func:`checked_decode_backend`.

    Internal: for a caller that ran those checks on arguments of the same shapes,
    dtypes, devices and strides (the layers of one decode step share a pool, a
    block table and the lengths; metalm_fast.nn.kv_cache_attention checks the
    first layer only).
    """
    if eager_inference():  # the same result without the custom op's wrapper
        return _DECODE[backend](q, k_cache, v_cache, block_table, seq_lens, scale).contiguous()
    return _paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale, backend)
