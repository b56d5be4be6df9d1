"""Tile-level building blocks of the span attention kernels (kernels/span_attention.py).

Everything here is a ``@triton.jit`` helper inlined into the three kernels:
loading row tiles, reading a block's intervals, classifying key tiles as
empty / full / partial, the monotone binary search of the dK/dV kernel, and
the three per-tile bodies (forward, dQ, dK/dV). The bodies take ``MASKED`` as a
constexpr (or, in the dK/dV partial loop, a uniform runtime flag), so a full
tile runs without any mask arithmetic and a partial tile with it, from one source.

Conventions shared by all helpers:

* Scores live in the log2 domain: ``s = (q . k) * qk_scale`` with
  ``qk_scale = scale * log2(e)``, so softmax uses ``exp2`` and the stored
  natural-log lse is ``(m + log2(l)) * ln(2)``.
* A row (query) outside ``[0, Tq)`` or with an empty interval carries
  ``lse2 = +inf`` in the backward helpers: ``exp2(s - inf) = 0`` for any finite
  or ``-inf`` score, so such rows contribute exactly nothing, with no NaN.
* Token offsets are widened to int64 before they multiply a stride.
* Intervals are clamped on load to ``0 <= start <= end <= Tk`` (``_clamp_interval``),
  so no mask, however built, makes a kernel read or write out of bounds.
* Non-finite inputs: masked entries of P and dS are exact zeros (``tl.where``,
  never a product), and a row whose lse is NaN keeps it, so its gradients are
  NaN as its math says; only lse = -inf (empty) rows get ``lse2 = +inf``.
  On a masked tile, a NaN or inf row of v (forward), k (dQ) or q / dO (dK,
  dV) still meets the masked zeros in a dot (0 * NaN) and reaches rows of the
  tile that do not attend it; kernels/span_attention_rows.py recomputes every
  result row that came out non-finite exactly, after these kernels ran (an
  in-loop fix with counting dots spilled on every shipped config).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_rows(
    base, offs_t, offs_d, stride_t, num_rows, head_dim, BOUNDS_T: tl.constexpr, EVEN_D: tl.constexpr
):
    """Load rows ``offs_t`` (x the head dim) of a [T, D] view; zeros outside it.

    ``BOUNDS_T=False`` is used where the caller already knows every row is in
    range (full key tiles), ``EVEN_D`` where D == BLOCK_D: no mask then, so the
    loads stay fully vectorised.
    """
    ptrs = base + offs_t.to(tl.int64)[:, None] * stride_t + offs_d[None, :]
    if BOUNDS_T:
        if EVEN_D:
            tile = tl.load(ptrs, mask=offs_t[:, None] < num_rows, other=0.0)
        else:
            tile = tl.load(
                ptrs, mask=(offs_t[:, None] < num_rows) & (offs_d[None, :] < head_dim), other=0.0
            )
    else:
        if EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < head_dim, other=0.0)
    return tile


@triton.jit
def _store_rows(base, tile, offs_t, offs_d, stride_t, num_rows, head_dim, EVEN_D: tl.constexpr):
    """Store a [len(offs_t), BLOCK_D] tile into rows of a [T, D] view, inside bounds only."""
    ptrs = base + offs_t.to(tl.int64)[:, None] * stride_t + offs_d[None, :]
    if EVEN_D:
        tl.store(ptrs, tile, mask=offs_t[:, None] < num_rows)
    else:
        tl.store(ptrs, tile, mask=(offs_t[:, None] < num_rows) & (offs_d[None, :] < head_dim))


@triton.jit
def _clamp_interval(start, end, num_keys):
    """Clamp to 0 <= start <= end <= Tk (start > end becomes empty): nothing reads past k, v."""
    start = tl.minimum(tl.maximum(start, 0), num_keys)
    end = tl.maximum(tl.minimum(end, num_keys), start)
    return start, end


@triton.jit
def _load_intervals(kv_start_ptr, kv_end_ptr, offs_m, num_queries, num_keys):
    """Clamped kv_start/kv_end of rows ``offs_m``; rows past Tq read as empty, [0, 0)."""
    row_valid = offs_m < num_queries
    row_start = tl.load(kv_start_ptr + offs_m, mask=row_valid, other=0)
    row_end = tl.load(kv_end_ptr + offs_m, mask=row_valid, other=0)
    row_start, row_end = _clamp_interval(row_start, row_end, num_keys)
    return row_start, row_end, row_valid


@triton.jit
def _key_tile_ranges(row_start, row_end, row_valid, num_keys, BLOCK_N: tl.constexpr):
    """Split the key axis of one query block into partial and full tiles.

    Returns ``(lo, full_lo, full_hi, hi)``, all multiples of BLOCK_N, such that
    tiles in ``[lo, full_lo)`` and ``[full_hi, hi)`` may be partial (or even
    empty, for non-monotone intervals: callers test each), tiles in
    ``[full_lo, full_hi)`` are full (every valid row sees every key of the tile,
    so no mask is needed), and no tile outside ``[lo, hi)`` is seen by any row.

    Empty rows are left out of the union ``[lo, hi)`` but not out of the full
    test (they make it fail, as they must: an empty row sees nothing); rows
    past Tq are left out of both, since their results are never stored.
    """
    nonempty = row_valid & (row_start < row_end)
    lo = tl.min(tl.where(nonempty, row_start, num_keys), 0)
    hi = tl.max(tl.where(nonempty, row_end, 0), 0)
    max_start = tl.max(tl.where(row_valid, row_start, 0), 0)
    min_end = tl.min(tl.where(row_valid, row_end, num_keys), 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.cdiv(hi, BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, lo)  # all rows empty: lo = Tk rounded down, hi = 0 -> nothing
    full_lo = tl.cdiv(max_start, BLOCK_N) * BLOCK_N
    # min_end <= Tk, so a full tile never reaches past the last key.
    full_hi = (min_end // BLOCK_N) * BLOCK_N
    no_full = full_lo >= full_hi
    full_lo = tl.where(no_full, hi, full_lo)
    full_hi = tl.where(no_full, hi, full_hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _tile_is_seen(row_start, row_end, n0, BLOCK_N: tl.constexpr):
    """Whether any row's (non-empty) interval meets keys [n0, n0 + BLOCK_N)."""
    meets = (row_start < row_end) & (row_start < n0 + BLOCK_N) & (row_end > n0)
    return tl.max(meets.to(tl.int32), 0) > 0


@triton.jit
def _tile_is_full(row_start, row_end, row_valid, n0, BLOCK_N: tl.constexpr):
    """Whether every valid row sees all of keys [n0, n0 + BLOCK_N).

    kv_end <= Tk, so a full tile never reaches past the last key."""
    covers = (row_start <= n0) & (row_end >= n0 + BLOCK_N)
    return tl.min((covers | ~row_valid).to(tl.int32), 0) > 0


@triton.jit
def _monotone_row_bounds(kv_start_ptr, kv_end_ptr, num_queries, num_keys, n0, n1):
    """For non-decreasing kv_start and kv_end: the rows that see keys [n0, n1).

    Four lower-bound searches run as the lanes of one vector, so the loop costs
    log2(Tq) dependent loads, not four times that. Lane i finds the first row t
    with ``array_i[t] >= threshold_i``:

        0: kv_end > n0     rows before it end before the tile
        1: kv_start >= n1  rows from it start after the tile
        2: kv_end >= n1    rows from it reach past the tile's end
        3: kv_start > n0   rows before it start at or before the tile's start

    Rows [lane0, lane1) may see the tile, rows [lane2, lane3) see all of it.
    The intervals are clamped as everywhere else (a clamped monotone mask stays
    monotone). A mask wrongly flagged monotone can misplace these bounds, but
    every probe stays in [0, Tq): wrong, never out of bounds.
    """
    lane = tl.arange(0, 4)
    on_end = (lane % 2) == 0
    threshold = tl.where((lane == 0) | (lane == 3), n0 + 1, n1)
    lo = tl.zeros([4], dtype=tl.int32)
    hi = tl.zeros([4], dtype=tl.int32) + num_queries
    while tl.max(hi - lo, 0) > 0:
        active = lo < hi
        mid = lo + (hi - lo) // 2  # never lo + hi: that could overflow int32
        # Both ends per lane: the clamped end depends on the start.
        start_val = tl.load(kv_start_ptr + mid, mask=active, other=0)
        end_val = tl.load(kv_end_ptr + mid, mask=active, other=0)
        start_val, end_val = _clamp_interval(start_val, end_val, num_keys)
        right = tl.where(on_end, end_val, start_val) >= threshold
        hi = tl.where(active & right, mid, hi)
        lo = tl.where(active & ~right, mid + 1, lo)
    seen_lo = tl.sum(tl.where(lane == 0, lo, 0), 0)
    seen_hi = tl.sum(tl.where(lane == 1, lo, 0), 0)
    full_lo = tl.sum(tl.where(lane == 2, lo, 0), 0)
    full_hi = tl.sum(tl.where(lane == 3, lo, 0), 0)
    return seen_lo, seen_hi, full_lo, full_hi


@triton.jit
def _fwd_tile(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    row_start,
    row_end,
    offs_n,
    offs_d,
    stride_kt,
    stride_vt,
    num_keys,
    head_dim,
    qk_scale,
    MASKED: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One key tile of the online softmax: acc, m_i (log2 domain), l_i updated.

    Only MASKED tiles can hold a row whose running max is still -inf (nothing
    seen yet); they use 0 in its place so exp2(-inf - -inf) never happens.
    """
    k = _load_rows(k_base, offs_n, offs_d, stride_kt, num_keys, head_dim, MASKED, EVEN_D)
    v = _load_rows(v_base, offs_n, offs_d, stride_vt, num_keys, head_dim, MASKED, EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        # kv_end <= Tk, so this also masks the keys past the end of k.
        seen = (offs_n[None, :] >= row_start[:, None]) & (offs_n[None, :] < row_end[:, None])
        s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new_safe = m_new
    alpha = tl.math.exp2(m_i - m_new_safe)
    p = tl.math.exp2(s - m_new_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _dq_tile(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    row_start,
    row_end,
    offs_n,
    offs_d,
    stride_kt,
    stride_vt,
    num_keys,
    head_dim,
    qk_scale,
    MASKED: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dq += dS K for one key tile, with P rebuilt from the saved lse (log2 domain)."""
    k = _load_rows(k_base, offs_n, offs_d, stride_kt, num_keys, head_dim, MASKED, EVEN_D)
    v = _load_rows(v_base, offs_n, offs_d, stride_vt, num_keys, head_dim, MASKED, EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if MASKED:
        # Masked dS is an exact 0 whatever S, lse or dP hold there (a NaN key or value).
        seen = (offs_n[None, :] >= row_start[:, None]) & (offs_n[None, :] < row_end[:, None])
        ds = tl.where(seen, ds, 0.0)
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def _dkdv_tile(
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
    MASKED,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dv += P^T dO and dk += dS^T Q for one query block, computed transposed ([keys, queries]).

    The transposed layout keeps the key tile as the M side of every dot, so k,
    v and both accumulators stay on chip across the whole query loop. MASKED is
    a constexpr in the full-block loop and a runtime (uniform) flag in the
    partial-block loop: either way a full block runs no mask arithmetic.
    """
    q = _load_rows(q_base, offs_m, offs_d, stride_qt, num_queries, head_dim, True, EVEN_D)
    do = _load_rows(do_base, offs_m, offs_d, stride_dot, num_queries, head_dim, True, EVEN_D)
    row_valid = offs_m < num_queries
    lse = tl.load(lse_base + offs_m, mask=row_valid, other=float("-inf"))
    delta = tl.load(delta_base + offs_m, mask=row_valid, other=0.0)
    # Rows past Tq or with an empty interval (lse = -inf) get lse2 = +inf: P = 0,
    # and delta = 0 so dS = 0 even if the caller's delta is not finite there.
    # (Sanitised after both loads, so the software pipeline carries only them.)
    # A NaN lse (a row attending a NaN) is kept: that row's gradients are NaN.
    has_keys = lse != float("-inf")
    lse2 = tl.where(has_keys, lse * 1.4426950408889634, float("inf"))
    delta = tl.where(has_keys, delta, 0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
    p_t = tl.math.exp2(s_t - lse2[None, :])
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    if MASKED:
        # Masked P and dS are exact zeros whatever S, lse or dP hold there (one
        # block: MASKED may be a runtime flag, and names set inside stay inside).
        seen = (offs_n[:, None] >= row_start[None, :]) & (offs_n[:, None] < row_end[None, :])
        p_t = tl.where(seen, p_t, 0.0)
        ds_t = tl.where(seen, ds_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv
