"""Span-masked flash attention (forward and backward) in Triton, over packed tokens.

The mask is one key interval per query (metalm_fast.masks.SpanMask)::

    query t attends key j  <=>  kv_start[t] <= j < kv_end[t]

q is [Tq, Hq, D], k and v are [Tk, Hkv, D]; query head h reads kv head
h // (Hq // Hkv) (GQA, never materialised). Only the last dim must be
contiguous: every token and head stride is a kernel argument, so q, k, v may be
slices of one fused qkv tensor.

Math
----
Forward (one program per query block of BLOCK_M rows and query head)::

    s_tj  = scale * q_t . k_j                 for kv_start[t] <= j < kv_end[t]
    lse_t = log sum_j exp(s_tj)               (-inf for an empty interval)
    out_t = sum_j exp(s_tj - lse_t) v_j       (exactly 0 for an empty interval)

computed with the online softmax over key tiles, in base 2 (log2(e) is folded
into the scale, so every exponential is one exp2). Backward, with delta
supplied by the caller as ``rowsum(dO * out) - dlse`` (so lse can carry a
gradient of its own)::

    P = exp(S - lse),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),
    dQ = scale * dS K,  dK = scale * dS^T Q

Tiles and memory
----------------
* Only key tiles meeting the block's interval union are visited; inside it,
  each tile is *empty* (skipped: never loaded), *full* (every query sees every
  key: no mask arithmetic at all) or *partial* (masked). For one query block
  the full tiles are one contiguous run, [ceil(max kv_start), floor(min kv_end)),
  so the loop is split into a branch-free, pipelinable run of full tiles and a
  run of the remaining tiles, each tested from the block's intervals (so
  arbitrary, non-monotone intervals stay correct and gaps are never loaded).
* Backward is deterministic by construction, with no atomics: dQ is reduced
  by the program owning the query block (kernel ``_bwd_dq_kernel``), dK/dV by
  the program owning the key block and kv head (``_bwd_dkdv_kernel``), which
  loops over the Hq/Hkv query heads of its group and over the query blocks
  that can see the key block. For monotone masks (every SpanMask constructor
  but from_intervals) those query blocks, and the full ones among them, come
  from an in-kernel binary search; otherwise every query block is tested from
  its intervals. Accumulation is fp32 throughout; P and dS are rounded to the
  input dtype only as tensor-core operands, as in FlashAttention-2.
* Intervals are clamped to [0, Tk] on load (start > end is empty), so no mask,
  however built, makes a kernel read or write out of bounds; the dK/dV binary
  search under a false ``monotone`` flag stays in bounds (but may be wrong).
* Empty intervals (from the clamped interval, not from l) get out = 0 and
  lse = -inf; a running max that is still -inf is replaced by 0 before exp2.
  The backward turns lse = -inf into +inf (P = exp2(s - inf) = 0) and zeroes
  delta there, so dS = 0.
* Non-finite inputs follow the float math of each row's allowed keys: a row
  attending a NaN (or +inf) score gets NaN out and lse (and NaN gradients),
  masked entries of P and dS are exact zeros. A NaN or inf operand row on a
  masked tile still meets the tile's masked zeros in a dot (0 * NaN); every
  result row that comes out non-finite is then recomputed exactly over its
  allowed keys by kernels/span_attention_rows.py (on finite inputs that pass
  only reads out/lse and dq/dk/dv once).
* D is padded to BLOCK_D = next_pow2(D) with masked loads; configs with
  D == BLOCK_D (EVEN_D) carry no head-dim mask at all.
* Token offsets are widened to int64 before multiplying a stride.

fp32 inputs
-----------
tl.dot on fp32 with ``input_precision="ieee"`` compiles to FMA loops (no
tensor cores); plain "tf32" keeps 10 mantissa bits and misses the tolerance
rule of docs/ARCHITECTURE.md by about 1000x. fp32 configs therefore use ``"tf32x3"``:
each operand is split into a tf32 high part and a tf32 low part and three
tensor-core products are summed (hi*hi + hi*lo + lo*hi), which is as accurate
as fp32 in practice (in an emulation over 30 problems its error against
float64 was a median 1.2x, at most 2.6x, the fp32 reference's own; exact fp32
dots gave 1.0x and 3.2x) at three times the tf32 cost, still on mma / wgmma.
The price is registers (hi and lo of each operand), so fp32 tiles are small,
and where no tf32x3 tile compiled without spills (dK/dV at 64 < D <= 128,
every pass at D > 128) the fp32 config uses "ieee" and says so
(``uses_matmul=False`` and a note in ``extra``). The
interpreter ignores input_precision (it multiplies in fp32), so
tests/kernels checks a bit-level emulation of tf32x3 against the rule.

Tile configs
------------
``_TILES`` (kernels/_span_attention_configs.py, with the reasons for each
choice) is the one table both the launchers (via ``_select_config``) and
``shipped_configs()`` read; keys are (pass, arch, dtype class, BLOCK_D). The
arch is 90 on compute capability >= 9 and 80 otherwise (sm_86/89 have less
shared memory than sm_80 and are not separately validated). Under
TRITON_INTERPRET=1 (CPU tensors) the sm_80 tiles are used, so the block
boundaries the tests exercise are the real ones.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import span_attention_rows
from ._config import KernelConfig, aligned_attrs, triton_signature
from ._span_attention_configs import (
    _DTYPE_NAMES,
    _TILES,
    MIN_BLOCK_D,
    MIN_HEAD_DIM,
    _arch_of,
    _block_d,
    _config_notes,
    _constexprs,
    _dot_precision,
    _select_config,
    _Tiles,
)
from ._span_attention_tiles import (
    _dkdv_tile,
    _dq_tile,
    _fwd_tile,
    _key_tile_ranges,
    _load_intervals,
    _load_rows,
    _monotone_row_bounds,
    _store_rows,
    _tile_is_full,
    _tile_is_seen,
)

__all__ = ["span_attention_forward", "span_attention_backward", "shipped_configs"]

_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------- kernels
# group is not specialised: the JIT would otherwise turn a
# value of 1 into a constant and run code other than the shipped, AOT-checked one.
@triton.jit(do_not_specialize=["group"])
def _fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    kv_start_ptr,
    kv_end_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    num_queries,
    num_keys,
    head_dim,
    group,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out, lse for one (query block, query head); grid (cdiv(Tq, BLOCK_M), Hq).

    q is loaded once; k/v tiles stream through (the full-tile loop is software
    pipelined: cp.async on sm_80, async copies + wgmma on sm_90).
    qk_scale = scale * log2(e).
    """
    block_m = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_start, row_end, row_valid = _load_intervals(
        kv_start_ptr, kv_end_ptr, offs_m, num_queries, num_keys
    )
    lo, full_lo, full_hi, hi = _key_tile_ranges(row_start, row_end, row_valid, num_keys, BLOCK_N)

    q = _load_rows(
        q_ptr + head.to(tl.int64) * stride_qh,
        offs_m,
        offs_d,
        stride_qt,
        num_queries,
        head_dim,
        True,
        EVEN_D,
    )
    k_base = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + kv_head.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Partial tiles, [lo, full_lo) then [full_hi, hi), as one loop so the
    # masked tile body is inlined once; each is skipped unless some row sees it.
    num_left = (full_lo - lo) // BLOCK_N
    num_partial = num_left + (hi - full_hi) // BLOCK_N
    for i in range(0, num_partial):
        n0 = tl.where(i < num_left, lo + i * BLOCK_N, full_hi + (i - num_left) * BLOCK_N)
        if _tile_is_seen(row_start, row_end, n0, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(
                acc,
                m_i,
                l_i,
                q,
                k_base,
                v_base,
                row_start,
                row_end,
                n0 + tl.arange(0, BLOCK_N),
                offs_d,
                stride_kt,
                stride_vt,
                num_keys,
                head_dim,
                qk_scale,
                True,
                EVEN_D,
                DOT_PRECISION,
            )
    # Full tiles: no mask, no bounds, no branch.
    for n0 in range(full_lo, full_hi, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(
            acc,
            m_i,
            l_i,
            q,
            k_base,
            v_base,
            row_start,
            row_end,
            n0 + tl.arange(0, BLOCK_N),
            offs_d,
            stride_kt,
            stride_vt,
            num_keys,
            head_dim,
            qk_scale,
            False,
            EVEN_D,
            DOT_PRECISION,
        )

    # Emptiness comes from the interval, not from l: a row attending a NaN or
    # +inf score has l = NaN, and one whose allowed scores are all -inf has
    # l = 0 (0 / 0 in its math): both are NaN, never a silent empty row.
    empty = row_start >= row_end
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
    lse = tl.where(empty, float("-inf"), tl.where(l_i == 0.0, float("nan"), lse))
    _store_rows(
        out_ptr + head.to(tl.int64) * stride_oh,
        out.to(out_ptr.dtype.element_ty),
        offs_m,
        offs_d,
        stride_ot,
        num_queries,
        head_dim,
        EVEN_D,
    )
    tl.store(lse_ptr + head.to(tl.int64) * num_queries + offs_m, lse, mask=row_valid)


@triton.jit(do_not_specialize=["group"])
def _bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    kv_start_ptr,
    kv_end_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dqt,
    stride_dqh,
    num_queries,
    num_keys,
    head_dim,
    group,
    qk_scale,
    sm_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dQ for one (query block, query head); grid (cdiv(Tq, BLOCK_M), Hq).

    Walks key tiles exactly like the forward kernel. Rows with no key get
    lse2 = +inf and delta = 0, so P = dS = 0 and their dQ is exactly 0.
    """
    block_m = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_start, row_end, row_valid = _load_intervals(
        kv_start_ptr, kv_end_ptr, offs_m, num_queries, num_keys
    )
    lo, full_lo, full_hi, hi = _key_tile_ranges(row_start, row_end, row_valid, num_keys, BLOCK_N)

    q = _load_rows(
        q_ptr + head.to(tl.int64) * stride_qh,
        offs_m,
        offs_d,
        stride_qt,
        num_queries,
        head_dim,
        True,
        EVEN_D,
    )
    do = _load_rows(
        do_ptr + head.to(tl.int64) * stride_doh,
        offs_m,
        offs_d,
        stride_dot,
        num_queries,
        head_dim,
        True,
        EVEN_D,
    )
    row_stats = head.to(tl.int64) * num_queries + offs_m
    lse = tl.load(lse_ptr + row_stats, mask=row_valid, other=float("-inf"))
    # lse is -inf exactly on empty rows; a NaN lse is kept (that row's dq is NaN).
    has_keys = lse != float("-inf")
    lse2 = tl.where(has_keys, lse * 1.4426950408889634, float("inf"))
    delta = tl.load(delta_ptr + row_stats, mask=row_valid & has_keys, other=0.0)
    k_base = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + kv_head.to(tl.int64) * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    num_left = (full_lo - lo) // BLOCK_N
    num_partial = num_left + (hi - full_hi) // BLOCK_N
    for i in range(0, num_partial):
        n0 = tl.where(i < num_left, lo + i * BLOCK_N, full_hi + (i - num_left) * BLOCK_N)
        if _tile_is_seen(row_start, row_end, n0, BLOCK_N):
            dq = _dq_tile(
                dq,
                q,
                do,
                lse2,
                delta,
                k_base,
                v_base,
                row_start,
                row_end,
                n0 + tl.arange(0, BLOCK_N),
                offs_d,
                stride_kt,
                stride_vt,
                num_keys,
                head_dim,
                qk_scale,
                True,
                EVEN_D,
                DOT_PRECISION,
            )
    for n0 in range(full_lo, full_hi, BLOCK_N):
        dq = _dq_tile(
            dq,
            q,
            do,
            lse2,
            delta,
            k_base,
            v_base,
            row_start,
            row_end,
            n0 + tl.arange(0, BLOCK_N),
            offs_d,
            stride_kt,
            stride_vt,
            num_keys,
            head_dim,
            qk_scale,
            False,
            EVEN_D,
            DOT_PRECISION,
        )

    dq = (dq * sm_scale).to(dq_ptr.dtype.element_ty)
    _store_rows(
        dq_ptr + head.to(tl.int64) * stride_dqh,
        dq,
        offs_m,
        offs_d,
        stride_dqt,
        num_queries,
        head_dim,
        EVEN_D,
    )


@triton.jit(do_not_specialize=["group"])
def _bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    kv_start_ptr,
    kv_end_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
    num_queries,
    num_keys,
    head_dim,
    group,
    monotone_ptr,
    qk_scale,
    sm_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dK, dV for one (key block, kv head); grid (cdiv(Tk, BLOCK_N), Hkv).

    The sum over the `group` query heads sharing this kv head and over query
    blocks happens in registers, in a fixed order: deterministic, no atomics.
    Query blocks come in runs like the forward's key tiles: partial ones
    (tested one by one: empty -> skipped, full -> unmasked, otherwise masked)
    and one branch-free run of full ones.
    """
    block_n = tl.program_id(0)
    kv_head = tl.program_id(1)
    n0 = block_n * BLOCK_N
    n1 = n0 + BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    num_q_blocks = tl.cdiv(num_queries, BLOCK_M)
    k = _load_rows(
        k_ptr + kv_head.to(tl.int64) * stride_kh,
        offs_n,
        offs_d,
        stride_kt,
        num_keys,
        head_dim,
        True,
        EVEN_D,
    )
    v = _load_rows(
        v_ptr + kv_head.to(tl.int64) * stride_vh,
        offs_n,
        offs_d,
        stride_vt,
        num_keys,
        head_dim,
        True,
        EVEN_D,
    )

    # The caller's monotone claim, checked on the device (_checked_monotone): a false
    # claim must not steer the binary search.
    if tl.load(monotone_ptr) != 0:
        seen_lo, seen_hi, rows_full_lo, rows_full_hi = _monotone_row_bounds(
            kv_start_ptr, kv_end_ptr, num_queries, num_keys, n0, n1
        )
        qb_lo = seen_lo // BLOCK_M
        qb_hi = tl.cdiv(seen_hi, BLOCK_M)
        full_lo = tl.cdiv(rows_full_lo, BLOCK_M)
        # Rows past Tq never count against fullness (nothing of theirs is kept).
        full_hi = tl.where(rows_full_hi == num_queries, num_q_blocks, rows_full_hi // BLOCK_M)
    else:
        qb_lo = 0
        qb_hi = num_q_blocks
        full_lo = num_q_blocks
        full_hi = num_q_blocks
    no_full = full_lo >= full_hi
    full_lo = tl.where(no_full, qb_hi, full_lo)
    full_hi = tl.where(no_full, qb_hi, full_hi)
    num_left = tl.maximum(full_lo - qb_lo, 0)
    num_partial = num_left + tl.maximum(qb_hi - full_hi, 0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, group):
        head = (kv_head * group + g).to(tl.int64)
        q_base = q_ptr + head * stride_qh
        do_base = do_ptr + head * stride_doh
        lse_base = lse_ptr + head * num_queries
        delta_base = delta_ptr + head * num_queries
        for i in range(0, num_partial):
            q_block = tl.where(i < num_left, qb_lo + i, full_hi + (i - num_left))
            offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
            row_start, row_end, row_valid = _load_intervals(
                kv_start_ptr, kv_end_ptr, offs_m, num_queries, num_keys
            )
            # Only a non-monotone mask puts full blocks in this loop; they skip
            # the mask through a uniform runtime branch inside the body, since a
            # third inlined copy of the body costs registers (spills) on sm_90.
            if _tile_is_seen(row_start, row_end, n0, BLOCK_N):
                masked = _tile_is_full(row_start, row_end, row_valid, n0, BLOCK_N) == 0
                dk, dv = _dkdv_tile(
                    dk,
                    dv,
                    k,
                    v,
                    q_base,
                    do_base,
                    lse_base,
                    delta_base,
                    offs_m,
                    offs_n,
                    offs_d,
                    row_start,
                    row_end,
                    stride_qt,
                    stride_dot,
                    num_queries,
                    head_dim,
                    qk_scale,
                    masked,
                    EVEN_D,
                    DOT_PRECISION,
                )
        for q_block in range(full_lo, full_hi):
            offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
            # Unmasked: the interval arguments (here offs_m twice) are never read.
            dk, dv = _dkdv_tile(
                dk,
                dv,
                k,
                v,
                q_base,
                do_base,
                lse_base,
                delta_base,
                offs_m,
                offs_n,
                offs_d,
                offs_m,
                offs_m,
                stride_qt,
                stride_dot,
                num_queries,
                head_dim,
                qk_scale,
                False,
                EVEN_D,
                DOT_PRECISION,
            )

    dk = (dk * sm_scale).to(dk_ptr.dtype.element_ty)
    _store_rows(
        dk_ptr + kv_head.to(tl.int64) * stride_dkh,
        dk,
        offs_n,
        offs_d,
        stride_dkt,
        num_keys,
        head_dim,
        EVEN_D,
    )
    _store_rows(
        dv_ptr + kv_head.to(tl.int64) * stride_dvh,
        dv.to(dv_ptr.dtype.element_ty),
        offs_n,
        offs_d,
        stride_dvt,
        num_keys,
        head_dim,
        EVEN_D,
    )


# --------------------------------------------------------------------------- configs
_KERNELS = {"fwd": _fwd_kernel, "bwd_dq": _bwd_dq_kernel, "bwd_dkdv": _bwd_dkdv_kernel}
# Signature typing: every *_ptr points at data of the input dtype except these.
_POINTERS = {
    "lse_ptr": "*fp32",
    "delta_ptr": "*fp32",
    "kv_start_ptr": "*i32",
    "kv_end_ptr": "*i32",
    "monotone_ptr": "*i32",
}
_FP32_SCALARS = {"qk_scale": "fp32", "sm_scale": "fp32"}


def _signature(kernel, dtype: torch.dtype) -> dict[str, str]:
    return triton_signature(kernel, dtype, pointers=_POINTERS, scalars=_FP32_SCALARS)


def shipped_configs() -> list[KernelConfig]:
    """Every configuration the launchers can pick: pass x dtype x BLOCK_D x EVEN_D x arch.

    Each BLOCK_D bucket ships the exact power of two and the padded variant
    (D=80, 96 -> 128; D=16, 24 -> 32).
    ``extra["attrs"]`` holds the ASTSource attrs (divisibility) that match the
    JIT's usual specialisation; compile with them to check what actually runs.
    """
    configs = []
    for (pass_name, arch, dtype_class, block_d), tiles in _TILES.items():
        dtypes = [torch.float32] if dtype_class == "32" else [torch.float16, torch.bfloat16]
        kernel = _KERNELS[pass_name]
        for dtype in dtypes:
            for even_d in (True, False):
                smallest = MIN_HEAD_DIM if block_d == MIN_BLOCK_D else block_d // 2 + 1
                head_dims = f"D={block_d}" if even_d else f"{smallest}<=D<{block_d}"
                precision = _dot_precision(tiles, dtype)
                note = _config_notes(pass_name, arch, tiles, dtype)
                configs.append(
                    KernelConfig(
                        kernel=kernel,
                        op="span_attention",
                        pass_name=pass_name,
                        arch=arch,
                        signature=_signature(kernel, dtype),
                        constexprs=_constexprs(tiles, dtype, block_d, even_d),
                        num_warps=tiles.num_warps,
                        num_stages=tiles.num_stages,
                        uses_matmul=not (dtype == torch.float32 and precision == "ieee"),
                        label=(
                            f"{_DTYPE_NAMES[dtype]} {head_dims} BM={tiles.block_m} "
                            f"BN={tiles.block_n} w{tiles.num_warps} s{tiles.num_stages}"
                        ),
                        extra={
                            "head_dims": head_dims,
                            "dot_precision": precision,
                            "attrs": aligned_attrs(kernel),
                            "note": note,
                            # sm_90 tiles too small for wgmma declare what they use instead.
                            **({"tensor_core": "mma"} if note.startswith("mma") else {}),
                        },
                    )
                )
    return configs + span_attention_rows.shipped_configs()


# --------------------------------------------------------------------------- launchers
def _launch_options(pass_name: str, tensor: torch.Tensor, head_dim: int) -> tuple[_Tiles, dict]:
    tiles = _select_config(pass_name, tensor.dtype, head_dim, _arch_of(tensor))
    block_d = _block_d(head_dim)
    options = _constexprs(tiles, tensor.dtype, block_d, head_dim == block_d)
    return tiles, {**options, "num_warps": tiles.num_warps, "num_stages": tiles.num_stages}


def span_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    scale: float,
    monotone: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Span-masked attention forward (inputs validated by the caller).

    Parameters
    ----------
    q : [Tq, Hq, D];  k, v : [Tk, Hkv, D]; fp16/bf16/fp32, last dim contiguous.
    kv_start, kv_end : int32 [Tq], contiguous; clamped in the kernel to
        0 <= start <= end <= Tk (start > end is an empty interval).
    scale : softmax scale.  monotone : unused by the forward (its tile walk
        needs no search); accepted so both launchers take the same mask.

    Returns
    -------
    out : [Tq, Hq, D], dtype of q, contiguous (rows with an empty interval are 0).
    lse : [Hq, Tq] float32, natural log (-inf for an empty interval).
    """
    del monotone
    num_queries, num_heads, head_dim = q.shape
    num_keys, num_kv_heads, _ = k.shape
    out = torch.empty((num_queries, num_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((num_heads, num_queries), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if num_keys == 0:  # every interval is empty
        return out.zero_(), lse.fill_(-math.inf)
    tiles, options = _launch_options("fwd", q, head_dim)
    grid = (triton.cdiv(num_queries, tiles.block_m), num_heads)
    _fwd_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        kv_start,
        kv_end,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        num_queries,
        num_keys,
        head_dim,
        num_heads // num_kv_heads,
        scale * _LOG2E,
        **options,
    )
    # Rows a NaN or inf operand reached through a masked tile's dot are redone exactly.
    span_attention_rows.recompute_forward_rows(q, k, v, out, lse, kv_start, kv_end, scale)
    return out, lse


def _checked_monotone(kv_start, kv_end, num_keys: int, monotone: bool) -> torch.Tensor:
    """int32 [1] on the intervals' device: 1 when ``monotone`` holds for the clamped intervals.

    The dK/dV kernel binary-searches monotone intervals; the claim comes from
    the caller (SpanMask checks its own, the raw op takes it on trust), so it
    is verified here, on the device and without a sync, over the intervals as
    the kernel clamps them. A false claim falls back to the scan: still correct.
    """
    if not monotone or kv_start.numel() < 2:
        return torch.full((1,), int(monotone), dtype=torch.int32, device=kv_start.device)
    start = kv_start.clamp(0, num_keys)
    end = torch.maximum(kv_end.clamp(max=num_keys), start)
    holds = (start[1:] >= start[:-1]).all() & (end[1:] >= end[:-1]).all()
    return holds.to(torch.int32).reshape(1)


def span_attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    scale: float,
    monotone: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Span-masked attention backward: dq, dk, dv (deterministic: no atomics).

    Parameters
    ----------
    do : [Tq, Hq, D], last dim contiguous.  q, k, v, kv_start, kv_end, scale :
        as for the forward.  lse : [Hq, Tq] float32 from the forward.
    delta : [Hq, Tq] float32, ``rowsum(do * out) - dlse``.
    monotone : kv_start and kv_end are both non-decreasing; lets the dK/dV
        kernel binary-search the query blocks that see each key block (the
        claim is checked on the device first, so a false one stays correct).

    Returns
    -------
    dq, dk, dv : contiguous, with the shapes and dtypes of q, k, v.
    """
    num_queries, num_heads, head_dim = q.shape
    num_keys, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads if num_kv_heads else 1
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if num_keys == 0 or num_queries == 0 or num_heads == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse, delta = lse.contiguous(), delta.contiguous()
    common = (
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        do.stride(0),
        do.stride(1),
    )

    tiles, options = _launch_options("bwd_dq", q, head_dim)
    _bwd_dq_kernel[(triton.cdiv(num_queries, tiles.block_m), num_heads)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        kv_start,
        kv_end,
        *common,
        dq.stride(0),
        dq.stride(1),
        num_queries,
        num_keys,
        head_dim,
        group,
        scale * _LOG2E,
        scale,
        **options,
    )
    tiles, options = _launch_options("bwd_dkdv", q, head_dim)
    _bwd_dkdv_kernel[(triton.cdiv(num_keys, tiles.block_n), num_kv_heads)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        kv_start,
        kv_end,
        *common,
        dk.stride(0),
        dk.stride(1),
        dv.stride(0),
        dv.stride(1),
        num_queries,
        num_keys,
        head_dim,
        group,
        _checked_monotone(kv_start, kv_end, num_keys, bool(monotone)),
        scale * _LOG2E,
        scale,
        **options,
    )
    span_attention_rows.recompute_backward_rows(
        do, q, k, v, lse, delta, dq, dk, dv, kv_start, kv_end, scale
    )
    return dq, dk, dv
