"""Paged decode attention in Triton: flash-decoding over a paged KV cache.

One query token per sequence, keys and values in pages::

    q [B, Hq, D];  k_cache, v_cache [num_blocks, block_size, Hkv, D]
    key p of sequence b = k_cache[block_table[b, p // block_size], p % block_size]
    out[b, h] = sum_{p < seq_len[b]} softmax_p(scale * q[b, h] . k_p) v_p

Math and memory
---------------
Decode reads every cached key and value once and does about 4 * Hq / Hkv FLOPs
per element read: it is bound by memory bandwidth, and the kernels are built
to read K and V exactly once.

* GQA: a program serves BLOCK_H query heads that share one kv head (the rows
  of its q tile), so each K/V tile it loads feeds all of them: the tile is read
  once per kv head, not once per query head. The q tile is padded to
  BLOCK_H = 16 rows (masked) because tensor-core dots need 16 rows; Hq / Hkv
  above 16 takes several head blocks.
* Flash-decoding: a batch of few long sequences gives too few (sequence, kv
  head) programs to fill a GPU, and one long sequence among short ones leaves
  its programs running alone at the end; so each sequence's keys are also
  split into ``num_splits`` chunks of ``split_keys`` keys (grid axis 2; see
  ``choose_splits``, which needs no device sync). A split program
  runs the online softmax over its chunk (base 2: log2(e) is folded into the
  scale) and writes its normalised partial output and its log-sum-exp::

      o_s = sum_{p in s} exp2(t_p - m_s) v_p / l_s,   lse_s = m_s + log2(l_s)

  and ``_merge_splits_kernel`` combines them exactly::

      M = max_s lse_s,   out = sum_s exp2(lse_s - M) o_s / sum_s exp2(lse_s - M)

  With a single split the first kernel writes ``out`` directly (no second
  pass). A split that starts past its sequence's end computes nothing and
  writes nothing; the merge reads only the ``cdiv(seq_len, split_keys)`` splits
  that were written.
* Pages: a tile of BLOCK_N consecutive key positions looks up each position's
  page in the block table (one int32 gather, cached), so any block size works
  (1, 8, 16, 128, ...) and a tile may span pages. Rows are addressed with
  int64 offsets.
* Bounds: seq_len is clamped to [0, max_blocks * block_size], and a key whose
  page id is outside [0, num_blocks) is masked out (never loaded). A sequence
  (or split) with no keys writes zeros and lse = -inf, and the running max is
  replaced by 0 before exp2 while it is -inf, so no exp2(-inf - -inf) arises.
  The launcher narrows an int64 block table only after mapping ids outside the
  pool to -1, and clamps int64 lengths before narrowing them.
* Non-finite values follow the float math of each row over its own keys: a NaN
  or inf in q, k or v reaches exactly the rows whose keys include it (masked
  keys are loaded as 0 and scored -inf, never multiplied in); a row whose
  scores are all -inf is NaN (0 / 0), as softmax is; the merge keeps a NaN.
* fp32 inputs use ``input_precision="tf32x3"`` (three tf32 tensor-core
  products, accurate to fp32 in practice; see kernels/span_attention.py); P is
  rounded to the input dtype before the P V product, as in FlashAttention.

Configs: one per (dtype, BLOCK_D = next_pow2(D)), listed by ``shipped_configs()``
and chosen by ``_select_config``; the launchers use nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._config import DTYPE_NAMES as _DTYPE_NAMES
from ._config import KernelConfig, aligned_attrs, triton_signature

__all__ = ["paged_decode_attention_forward", "shipped_configs", "choose_splits"]

_LOG2E = 1.4426950408889634
BLOCK_H = 16  # query rows per program (the tensor-core minimum); Hq / Hkv > 16 tiles it
MAX_SPLITS = 64  # the merge kernel reads every split's lse in one vector
MIN_SPLIT_KEYS = 256  # a split shorter than this costs more to merge than it saves
MAX_SPLIT_KEYS = 4096  # longer sequences are split even on a full device (stragglers)
HEAD_DIM_BLOCKS = (16, 32, 64, 128, 256)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_ob,
    stride_oh,
    num_blocks,
    block_size,
    max_blocks,
    num_heads,
    head_dim,
    group,
    head_blocks,
    split_keys,
    num_splits,
    qk_scale,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One (sequence, kv head x head block, split); grid (B, Hkv * head_blocks, num_splits).

    Writes out[b, heads] when num_splits == 1, else the split's normalised
    partial output part_out[b, heads, split] and its base-2 lse part_lse[b, heads, split].
    """
    batch = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1) // head_blocks
    first_row = (tl.program_id(1) % head_blocks) * BLOCK_H
    split = tl.program_id(2)
    rows = first_row + tl.arange(0, BLOCK_H)
    row_valid = rows < group
    heads = (kv_head * group + rows).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim

    seq_len = tl.load(seq_lens_ptr + batch)
    seq_len = tl.minimum(tl.maximum(seq_len, 0), max_blocks * block_size)
    start = split * split_keys
    end = tl.minimum(start + split_keys, seq_len)

    q = tl.load(
        q_ptr + batch * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=row_valid[:, None] & d_valid[None, :],
        other=0.0,
    )
    k_base = k_cache_ptr + kv_head.to(tl.int64) * stride_kh
    v_base = v_cache_ptr + kv_head.to(tl.int64) * stride_vh
    table = block_table_ptr + batch * stride_bt
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    # Whether the split saw a key on a page inside the pool (per row, all alike):
    # l = 0 alone cannot tell "no key" (output 0) from "every score -inf" (NaN).
    seen = tl.zeros([BLOCK_H], dtype=tl.int32)

    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        in_range = keys < end
        page = tl.load(table + keys // block_size, mask=in_range, other=-1)
        key_valid = in_range & (page >= 0) & (page < num_blocks)
        seen = tl.maximum(seen, tl.max(key_valid.to(tl.int32), 0))
        offset = keys % block_size
        k_rows = page.to(tl.int64) * stride_kb + offset.to(tl.int64) * stride_ks
        v_rows = page.to(tl.int64) * stride_vb + offset.to(tl.int64) * stride_vs
        tile_mask = key_valid[:, None] & d_valid[None, :]
        k = tl.load(k_base + k_rows[:, None] + offs_d[None, :], mask=tile_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(key_valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # While a row has seen no valid key its max is -inf; subtract 0 instead.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + v_rows[:, None] + offs_d[None, :], mask=tile_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # A row that saw no key has output 0 and lse -inf. One that saw keys divides
    # by its l untested: NaN stays NaN, and l = 0 (every score -inf) gives 0 / 0 =
    # NaN, as softmax over those keys does (its lse is -inf: the merge knows it).
    empty = seen == 0
    l_safe = tl.where(empty, 1.0, l_i)
    result = acc / l_safe[:, None]
    # A split past its sequence's end writes nothing: the merge never reads it.
    # With one split a sequence of length 0 must still write its zeros, so the
    # bound is then at least 1 (2 - min(num_splits, 2) is 1 for one split, else 0).
    # (Compared per row, as a vector: the interpreter rejects scalar-and-tensor masks.)
    bound = tl.maximum(seq_len, 2 - tl.minimum(num_splits, 2))
    row_written = row_valid & (rows * 0 + start < bound)
    store_mask = row_written[:, None] & d_valid[None, :]
    if num_splits == 1:
        tl.store(
            out_ptr + batch * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
            result.to(out_ptr.dtype.element_ty),
            mask=store_mask,
        )
    else:
        slot = (batch * num_heads + heads) * num_splits + split
        tl.store(part_out_ptr + slot[:, None] * BLOCK_D + offs_d[None, :], result, mask=store_mask)
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
        tl.store(part_lse_ptr + slot, lse, mask=row_written)


@triton.jit
def _merge_splits_kernel(
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    seq_lens_ptr,
    stride_ob,
    stride_oh,
    num_heads,
    head_dim,
    num_splits,
    split_keys,
    max_keys,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, h] from the partials of (b, h); grid (B, Hq).

    Only the splits that start inside the sequence were written and are read.
    A split with lse = -inf (no key, or every score -inf) adds nothing while
    another split has keys with finite scores; when no split has, the output is
    the sum of their partials: 0 where none saw a key, NaN where one did (its
    partial is 0 / 0). A NaN lse or partial is never dropped: it reaches the output.
    """
    batch = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + batch)
    seq_len = tl.minimum(tl.maximum(seq_len, 0), max_keys)
    used = tl.cdiv(seq_len, split_keys)
    first = (batch * num_heads + head) * num_splits
    splits = tl.arange(0, BLOCK_S)
    lse = tl.load(part_lse_ptr + first + splits, mask=splits < used, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    none_finite = lse_max == float("-inf")
    lse_max = tl.where(none_finite, 0.0, lse_max)
    weights = tl.math.exp2(lse - lse_max)
    total = tl.sum(weights, 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, used):
        split_lse = tl.load(part_lse_ptr + first + s)
        weight = tl.math.exp2(split_lse - lse_max)
        partial = tl.load(part_out_ptr + (first + s) * BLOCK_D + offs_d, mask=d_valid, other=0.0)
        # lse = -inf: weight 0 beside finite splits (its partial may be a NaN 0 / 0),
        # its partial itself when no split is finite. Otherwise weight * partial, NaN kept.
        unweighted = tl.where(none_finite, partial, 0.0)
        acc += tl.where(split_lse == float("-inf"), unweighted, weight * partial)
    result = acc / tl.where(total == 0.0, 1.0, total)
    tl.store(
        out_ptr + batch * stride_ob + head * stride_oh + offs_d,
        result.to(out_ptr.dtype.element_ty),
        mask=d_valid,
    )


# --------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class _Tiles:
    block_n: int
    num_warps: int
    num_stages: int


def _tiles(block_d: int, dtype: torch.dtype) -> _Tiles:
    """Key tile per head-dim bucket: a K and a V tile of BLOCK_N x BLOCK_D per stage."""
    if dtype == torch.float32 and block_d >= 256:
        return _Tiles(block_n=16, num_warps=8, num_stages=2)
    if block_d >= 256 or (dtype == torch.float32 and block_d >= 128):
        return _Tiles(block_n=32, num_warps=4, num_stages=2)
    return _Tiles(block_n=64, num_warps=4, num_stages=2)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"


# Pointers that are not in the input dtype; every other *_ptr is.
_POINTER_TYPES = {
    "block_table_ptr": "*i32",
    "seq_lens_ptr": "*i32",
    "part_out_ptr": "*fp32",
    "part_lse_ptr": "*fp32",
}  # every other *_ptr is in the input dtype


def _signature(kernel, dtype: torch.dtype) -> dict[str, str]:
    return triton_signature(kernel, dtype, pointers=_POINTER_TYPES, scalars={"qk_scale": "fp32"})


def shipped_configs() -> list[KernelConfig]:
    """Split and merge kernels for fp16, bf16, fp32 x BLOCK_D in {16..256} x sm_80, sm_90.

    The split kernel's dots have 16 query rows, below wgmma's 64-row minimum,
    so it uses mma.sync on both archs (declared with ``tensor_core: mma``);
    decode is bound by memory, not by the tensor cores. The merge kernel has no matmul.
    """
    configs = []
    for arch in (80, 90):
        for dtype, name in _DTYPE_NAMES.items():
            for block_d in HEAD_DIM_BLOCKS:
                tiles = _tiles(block_d, dtype)
                split_constexprs = {
                    "BLOCK_H": BLOCK_H,
                    "BLOCK_N": tiles.block_n,
                    "BLOCK_D": block_d,
                    "DOT_PRECISION": _dot_precision(dtype),
                }
                configs.append(
                    KernelConfig(
                        kernel=_decode_split_kernel,
                        op="paged_decode_attention",
                        pass_name="split",
                        arch=arch,
                        signature=_signature(_decode_split_kernel, dtype),
                        constexprs=split_constexprs,
                        num_warps=tiles.num_warps,
                        num_stages=tiles.num_stages,
                        uses_matmul=True,
                        label=(
                            f"{name} BLOCK_D={block_d} BH={BLOCK_H} BN={tiles.block_n} "
                            f"w{tiles.num_warps} s{tiles.num_stages}"
                        ),
                        extra={
                            "attrs": aligned_attrs(_decode_split_kernel),
                            "tensor_core": "mma",
                            "note": "mma: 16-row decode dots are below wgmma's 64-row tile",
                        },
                    )
                )
                merge_constexprs = {"BLOCK_S": MAX_SPLITS, "BLOCK_D": block_d}
                configs.append(
                    KernelConfig(
                        kernel=_merge_splits_kernel,
                        op="paged_decode_attention",
                        pass_name="merge",
                        arch=arch,
                        signature=_signature(_merge_splits_kernel, dtype),
                        constexprs=merge_constexprs,
                        num_warps=4,
                        num_stages=1,
                        uses_matmul=False,
                        label=f"{name} BLOCK_D={block_d} BS={MAX_SPLITS}",
                        extra={"attrs": aligned_attrs(_merge_splits_kernel)},
                    )
                )
    return configs


# --------------------------------------------------------------------------- launchers
def _target_programs(device: torch.device) -> int:
    """Programs that keep the device busy: two waves of SMs (a token 16 under the interpreter)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 16


def choose_splits(
    batch: int, kv_programs: int, max_keys: int, block_n: int, target_programs: int
) -> tuple[int, int]:
    """(num_splits, split_keys) for a launch; host-side, with no device sync.

    ``max_keys`` is the block table's capacity (max_blocks * block_size), an
    upper bound on every seq_len. Split while B * kv_programs programs leave the
    device idle, and so that no program walks more than MAX_SPLIT_KEYS keys (one
    long sequence among short ones would otherwise run alone at the end); never
    below MIN_SPLIT_KEYS keys per split, at most MAX_SPLITS splits. Splits that
    start past their sequence's end exit at once and write nothing.
    """
    programs = max(1, batch * kv_programs)
    wanted = max(math.ceil(target_programs / programs), math.ceil(max_keys / MAX_SPLIT_KEYS))
    wanted = min(wanted, MAX_SPLITS, max(1, max_keys // MIN_SPLIT_KEYS))
    split_keys = math.ceil(max(max_keys, 1) / wanted / block_n) * block_n
    return max(1, math.ceil(max_keys / split_keys)), split_keys


def paged_decode_attention_forward(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """out [B, Hq, D] in q.dtype (inputs validated by the caller).

    Parameters
    ----------
    q : [B, Hq, D]; k_cache, v_cache : [num_blocks, block_size, Hkv, D]; one of
        fp16/bf16/fp32, last dims contiguous.
    block_table : int32 [B, max_blocks]; seq_lens : int32 [B] (int64 is range-checked
        in int64, then narrowed).
    scale : softmax scale.
    num_splits : force this many splits (tests); default: :func:`choose_splits`.
    """
    batch, num_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    group = num_heads // kv_heads
    head_blocks = triton.cdiv(group, BLOCK_H)
    block_d = _block_d(head_dim)
    tiles = _tiles(block_d, q.dtype)
    out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    max_blocks = block_table.shape[1]
    max_keys = max_blocks * block_size
    if block_table.dtype != torch.int32:  # checked in int64 first: no aliased page id
        outside = (block_table < 0) | (block_table >= num_blocks)
        block_table = block_table.masked_fill(outside, -1).to(torch.int32)
    if seq_lens.dtype != torch.int32:
        seq_lens = seq_lens.clamp(0, max_keys).to(torch.int32)
    seq_lens = seq_lens.contiguous()
    if num_splits is None:
        num_splits, split_keys = choose_splits(
            batch, kv_heads * head_blocks, max_keys, tiles.block_n, _target_programs(q.device)
        )
    else:
        num_splits = max(1, min(num_splits, MAX_SPLITS))
        split_keys = triton.cdiv(triton.cdiv(max(max_keys, 1), num_splits), tiles.block_n)
        split_keys *= tiles.block_n
    partial_shape = (batch, num_heads, num_splits) if num_splits > 1 else (1, 1, 1)
    part_out = torch.empty((*partial_shape, block_d), dtype=torch.float32, device=q.device)
    part_lse = torch.empty(partial_shape, dtype=torch.float32, device=q.device)
    grid = (batch, kv_heads * head_blocks, num_splits)
    _decode_split_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_table,
        seq_lens,
        out,
        part_out,
        part_lse,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_table.stride(0),
        out.stride(0),
        out.stride(1),
        num_blocks,
        block_size,
        max_blocks,
        num_heads,
        head_dim,
        group,
        head_blocks,
        split_keys,
        num_splits,
        scale * _LOG2E,
        BLOCK_H=BLOCK_H,
        BLOCK_N=tiles.block_n,
        BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(batch, num_heads)](
            out,
            part_out,
            part_lse,
            seq_lens,
            out.stride(0),
            out.stride(1),
            num_heads,
            head_dim,
            num_splits,
            split_keys,
            max_keys,
            BLOCK_S=MAX_SPLITS,
            BLOCK_D=block_d,
            num_warps=4,
            num_stages=1,
        )
    return out
