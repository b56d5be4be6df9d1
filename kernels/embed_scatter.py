"""Encoder-to-decoder embedding scatter in Triton, forward and backward.

Math::

    out[t] = weight[token_ids[t]] * scale   where feature_index[t] < 0
           = features[feature_index[t]]     otherwise

Forward: one program per (BLOCK_T tokens, BLOCK_D columns) tile. Each row's
source pointer is chosen per row (weight row or feature row), so every output
element is read once and written once: a pure bandwidth kernel.

Backward (deterministic, no atomics): the launcher groups token positions by
key with a stable sort (key = token id for the weight gradient, feature row for
the features gradient; positions of the other kind get key K, past every real
key), giving CSR offsets. One program per (key row, BLOCK_D columns) then sums
its positions' gradient rows, BLOCK_P at a time, in fp32, and writes the row
once: ``scale * sum`` for the weight (exact zeros for rows no token uses and for
the padding row), ``sum`` for the features. The per-chunk tl.sum is a fixed
reduction tree and chunks are visited in position order, so results are
bit-identical on repeat.

All row offsets are int64 (row * stride can pass 2^31 for large T x Dm or V x Dm).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import DTYPE_NAMES as _DTYPE_NAMES
from ._config import KernelConfig, triton_signature

BLOCK_T = 16
BLOCK_P = 16
BLOCK_D = 256  # columns per program; Dm is tiled, any width works
NUM_WARPS = 4


@triton.jit
def _embed_scatter_fwd_kernel(
    out_ptr,
    weight_ptr,
    features_ptr,
    ids_ptr,
    rows_ptr,
    num_tokens,
    width,
    num_embeddings,
    num_features,
    stride_out,
    stride_weight,
    stride_features,
    scale,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[t, d] for one [BLOCK_T, BLOCK_D] tile; feature rows copied, token rows scaled.

    An id or feature row out of range is never dereferenced: its row reads as
    zeros. Defence in depth only: the op layer raises (or, on a GPU, queues a
    device-side assert) for such a row before this kernel runs.
    """
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_tokens = tokens < num_tokens
    in_cols = cols < width
    ids = tl.load(ids_ptr + tokens, mask=in_tokens, other=0).to(tl.int64)
    rows = tl.load(rows_ptr + tokens, mask=in_tokens, other=-1).to(tl.int64)
    is_feature = rows >= 0
    id_ok = (ids >= 0) & (ids < num_embeddings)
    row_ok = rows < num_features
    tile = in_tokens[:, None] & in_cols[None, :]
    token_rows = tl.load(
        weight_ptr + ids[:, None] * stride_weight + cols[None, :],
        mask=tile & (~is_feature & id_ok)[:, None],
        other=0.0,
    )
    feature_rows = tl.load(
        features_ptr + rows[:, None] * stride_features + cols[None, :],
        mask=tile & (is_feature & row_ok)[:, None],
        other=0.0,
    )
    scaled = (token_rows.to(tl.float32) * scale).to(token_rows.dtype)
    result = tl.where(is_feature[:, None], feature_rows, scaled)
    tl.store(out_ptr + tokens.to(tl.int64)[:, None] * stride_out + cols[None, :], result, mask=tile)


@triton.jit
def _segment_sum_kernel(
    dst_ptr,
    grad_ptr,
    order_ptr,
    offsets_ptr,
    width,
    stride_dst,
    stride_grad,
    factor,
    skip_row,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dst[r] = factor * sum of grad[order[offsets[r]:offsets[r+1]]], fp32, in position order.

    ``skip_row`` (the padding index, or -1) is written as zeros.
    """
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_cols = cols < width
    first = tl.load(offsets_ptr + row)
    last = tl.load(offsets_ptr + row + 1)
    if row == skip_row:
        last = first
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for chunk in range(first, last, BLOCK_P):
        slots = chunk + tl.arange(0, BLOCK_P)
        in_chunk = slots < last
        positions = tl.load(order_ptr + slots, mask=in_chunk, other=0).to(tl.int64)
        rows = tl.load(
            grad_ptr + positions[:, None] * stride_grad + cols[None, :],
            mask=in_chunk[:, None] & in_cols[None, :],
            other=0.0,
        )
        total += tl.sum(rows.to(tl.float32), axis=0)
    result = (total * factor).to(dst_ptr.dtype.element_ty)
    tl.store(dst_ptr + row.to(tl.int64) * stride_dst + cols, result, mask=in_cols)


# --------------------------------------------------------------------------- launchers
def embed_scatter_forward(token_ids, weight, features, feature_index, scale: float):
    """out [T, Dm] in weight.dtype. Inputs validated by the caller (last dims contiguous)."""
    num_tokens, width = token_ids.shape[0], weight.shape[1]
    token_ids, feature_index = _as_index(token_ids), _as_index(feature_index)
    out = torch.empty((num_tokens, width), dtype=weight.dtype, device=weight.device)
    if num_tokens == 0 or width == 0:
        return out
    grid = (triton.cdiv(num_tokens, BLOCK_T), triton.cdiv(width, BLOCK_D))
    features_arg = features if features.shape[0] else weight  # never read when F == 0
    _embed_scatter_fwd_kernel[grid](
        out,
        weight,
        features_arg,
        token_ids,
        feature_index,
        num_tokens,
        width,
        weight.shape[0],
        features.shape[0],
        out.stride(0),
        weight.stride(0),
        features_arg.stride(0),
        scale,
        BLOCK_T=BLOCK_T,
        BLOCK_D=BLOCK_D,
        num_warps=NUM_WARPS,
    )
    return out


def _as_index(index: torch.Tensor) -> torch.Tensor:
    # The kernels read int64 indices with unit stride (a no-op for int64 inputs).
    return index.to(torch.int64).contiguous()


def _group_by_key(keys: torch.Tensor, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable CSR grouping: positions with key r are order[offsets[r]:offsets[r+1]]."""
    order = torch.sort(keys, stable=True).indices.to(torch.int32)
    counts = torch.bincount(keys, minlength=num_keys + 1)[: num_keys + 1]
    offsets = torch.zeros(num_keys + 2, dtype=torch.int32, device=keys.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return order, offsets


def _segment_sum(grad_out, keys, num_keys, factor, skip_row, dtype):
    width = grad_out.shape[1]
    dst = torch.empty((num_keys, width), dtype=dtype, device=grad_out.device)
    if num_keys == 0 or width == 0:
        return dst
    order, offsets = _group_by_key(keys, num_keys)
    grid = (num_keys, triton.cdiv(width, BLOCK_D))
    _segment_sum_kernel[grid](
        dst,
        grad_out,
        order,
        offsets,
        width,
        dst.stride(0),
        grad_out.stride(0),
        factor,
        skip_row,
        BLOCK_P=BLOCK_P,
        BLOCK_D=BLOCK_D,
        num_warps=NUM_WARPS,
    )
    return dst


def embed_scatter_backward(
    grad_out,
    token_ids,
    feature_index,
    num_embeddings: int,
    num_features: int,
    scale: float,
    padding_idx: int,
):
    """(grad_weight [V, Dm], grad_features [F, Dm]) in grad_out.dtype; deterministic."""
    is_feature = feature_index >= 0
    # Positions of the other kind get the key past every real row: they sort last
    # and no program reads them.
    # Out-of-range indices (the op layer has already failed on them) take that
    # key too, so no program ever addresses a row that does not exist.
    ids = token_ids.to(torch.int64)
    rows = feature_index.to(torch.int64)
    id_keys = torch.where(is_feature | (ids < 0) | (ids >= num_embeddings), num_embeddings, ids)
    row_keys = torch.where(is_feature & (rows < num_features), rows, num_features)
    grad_weight = _segment_sum(
        grad_out, id_keys, num_embeddings, scale, padding_idx, grad_out.dtype
    )
    grad_features = _segment_sum(grad_out, row_keys, num_features, 1.0, -1, grad_out.dtype)
    return grad_weight, grad_features


# --------------------------------------------------------------------------- AOT configs
# Pointers that are not in the input dtype, and the fp32 scalars; every other argument is i32.
_POINTERS = {"ids_ptr": "*i64", "rows_ptr": "*i64", "order_ptr": "*i32", "offsets_ptr": "*i32"}
_SCALARS = {"scale": "fp32", "factor": "fp32"}


def _signature(kernel, dtype: torch.dtype) -> dict[str, str]:
    return triton_signature(kernel, dtype, pointers=_POINTERS, scalars=_SCALARS)


def shipped_configs() -> list[KernelConfig]:
    """Forward and segment-sum kernels for fp16, bf16, fp32 on sm_80 and sm_90 (no matmul)."""
    configs = []
    for arch in (80, 90):
        for dtype, name in _DTYPE_NAMES.items():
            for kernel, pass_name, constexprs in (
                (_embed_scatter_fwd_kernel, "fwd", {"BLOCK_T": BLOCK_T, "BLOCK_D": BLOCK_D}),
                (_segment_sum_kernel, "bwd_segment_sum", {"BLOCK_P": BLOCK_P, "BLOCK_D": BLOCK_D}),
            ):
                configs.append(
                    KernelConfig(
                        kernel=kernel,
                        op="embed_scatter",
                        pass_name=pass_name,
                        arch=arch,
                        signature=_signature(kernel, dtype),
                        constexprs=constexprs,
                        num_warps=NUM_WARPS,
                        num_stages=2,
                        uses_matmul=False,
                        label=f"{name} " + " ".join(f"{k}={v}" for k, v in constexprs.items()),
                    )
                )
    return configs
