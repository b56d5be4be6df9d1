"""Paged KV-cache append in Triton: scatter new key/value rows into their slots.

::

    k_cache[s // block_size, s % block_size, h, :] = k_new[t, h, :]    s = slot_mapping[t]
    v_cache[...]                                   = v_new[t, h, :]

k_cache, v_cache are [num_blocks, block_size, Hkv, D]; k_new, v_new [T, Hkv, D]
(any strides but a unit last dim, so slices of a fused qkv projection work).

One program copies a [BLOCK_T tokens, BLOCK_D columns] tile of one kv head, for
keys and values, looping over D in BLOCK_D chunks: a pure bandwidth kernel,
each element read once and written once. Loads and stores keep the input
dtype, so the copy is bit-exact. A slot < 0 (padding) or past the pool
(num_blocks * block_size) masks its row: it is never written, whatever the
caller passes. Slot and row offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import DTYPE_NAMES as _DTYPE_NAMES
from ._config import KernelConfig, triton_signature

__all__ = ["kv_cache_append_forward", "shipped_configs"]

BLOCK_T = 16
BLOCK_D = 64
NUM_WARPS = 4


@triton.jit
def _kv_cache_append_kernel(
    k_cache_ptr,
    v_cache_ptr,
    k_new_ptr,
    v_new_ptr,
    slots_ptr,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_knt,
    stride_knh,
    stride_vnt,
    stride_vnh,
    num_tokens,
    num_slots,
    block_size,
    head_dim,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Copy rows of one kv head for BLOCK_T tokens; grid (cdiv(T, BLOCK_T), Hkv)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1).to(tl.int64)
    in_tokens = tokens < num_tokens
    slots = tl.load(slots_ptr + tokens, mask=in_tokens, other=-1).to(tl.int64)
    keep = in_tokens & (slots >= 0) & (slots < num_slots)
    blocks = slots // block_size
    offsets = slots % block_size
    k_dst = k_cache_ptr + blocks * stride_kb + offsets * stride_ks + head * stride_kh
    v_dst = v_cache_ptr + blocks * stride_vb + offsets * stride_vs + head * stride_vh
    k_src = k_new_ptr + tokens.to(tl.int64) * stride_knt + head * stride_knh
    v_src = v_new_ptr + tokens.to(tl.int64) * stride_vnt + head * stride_vnh
    for d0 in range(0, head_dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = keep[:, None] & (cols < head_dim)[None, :]
        k_rows = tl.load(k_src[:, None] + cols[None, :], mask=mask)
        tl.store(k_dst[:, None] + cols[None, :], k_rows, mask=mask)
        v_rows = tl.load(v_src[:, None] + cols[None, :], mask=mask)
        tl.store(v_dst[:, None] + cols[None, :], v_rows, mask=mask)


# --------------------------------------------------------------------------- launcher
def kv_cache_append_forward(k_cache, v_cache, k_new, v_new, slot_mapping) -> None:
    """In-place append (inputs validated by the caller: shapes, dtypes, unit last dims)."""
    num_tokens, kv_heads, head_dim = k_new.shape
    if num_tokens == 0 or kv_heads == 0 or head_dim == 0:
        return
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    slots = slot_mapping.to(torch.int64).contiguous()
    grid = (triton.cdiv(num_tokens, BLOCK_T), kv_heads)
    _kv_cache_append_kernel[grid](
        k_cache,
        v_cache,
        k_new,
        v_new,
        slots,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        k_new.stride(0),
        k_new.stride(1),
        v_new.stride(0),
        v_new.stride(1),
        num_tokens,
        num_blocks * block_size,
        block_size,
        head_dim,
        BLOCK_T=BLOCK_T,
        BLOCK_D=BLOCK_D,
        num_warps=NUM_WARPS,
    )


# --------------------------------------------------------------------------- AOT configs
def _signature(dtype: torch.dtype) -> dict[str, str]:
    return triton_signature(_kv_cache_append_kernel, dtype, pointers={"slots_ptr": "*i64"})


def shipped_configs() -> list[KernelConfig]:
    """The one append kernel for fp16, bf16 and fp32 on sm_80 and sm_90 (no matmul)."""
    return [
        KernelConfig(
            kernel=_kv_cache_append_kernel,
            op="kv_cache_append",
            pass_name="append",
            arch=arch,
            signature=_signature(dtype),
            constexprs={"BLOCK_T": BLOCK_T, "BLOCK_D": BLOCK_D},
            num_warps=NUM_WARPS,
            num_stages=1,
            uses_matmul=False,
            label=f"{name} BLOCK_T={BLOCK_T} BLOCK_D={BLOCK_D}",
        )
        for arch in (80, 90)
        for dtype, name in _DTYPE_NAMES.items()
    ]
