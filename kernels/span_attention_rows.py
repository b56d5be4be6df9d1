"""Exact per-row recompute of the span attention results that came out non-finite.

Why: the tiled kernels of kernels/span_attention.py multiply whole tiles in
``tl.dot``. On a tile the mask cuts (a *partial* tile), the masked entries of
P (forward) or dS (backward) are exact zeros, but a NaN or inf *operand row*
on that tile still meets them: 0 * NaN = NaN reaches rows that never attend
the bad key (forward P.V, backward dS.K, dS^T.Q, P^T.dO). Keeping those dots
exact inside the tiled kernels costs registers on every call (an attempt
spilled on every shipped configuration); instead the contamination is undone
afterwards, here, and only where it can have happened:

* a non-finite input only ever turns results *non-finite*, so a row of
  out / dq / dk / dv that is finite is already right and is left alone (one
  read per row: on finite inputs these kernels only read the results once);
* a row that is non-finite (or a forward row with lse NaN, +inf, or -inf on a
  non-empty interval) is recomputed from scratch over exactly its allowed
  keys (forward, dQ) or exactly the queries that attend it (dK, dV), with
  masked loads, so no masked entry is ever read. A row whose math really is
  non-finite comes out as that math says; a contaminated row comes out finite.

The recompute is plain fp32 arithmetic (no tensor cores): it is for rows that
met NaN or inf, which a healthy run does not have. Rows are grouped
``ROWS`` per program so that the check of a clean block is one tile load.

Math (the same as the tiled kernels, base 2, intervals clamped to [0, Tk])::

    forward:  m = max_j s_tj (NaN if any is NaN), p_tj = exp2(s_tj - m),
              out_t = sum_j p_tj v_j / sum_j p_tj,  lse_t = (m + log2 sum_j p_tj) ln 2
    backward: p_tj = exp(s_tj - lse_t), dS_tj = p_tj (dO_t . v_j - delta_t),
              dq_t = scale sum_j dS_tj k_j, dk_j = scale sum_t dS_tj q_t, dv_j = sum_t p_tj dO_t
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import DTYPE_NAMES, KernelConfig, aligned_attrs, triton_signature

__all__ = ["recompute_forward_rows", "recompute_backward_rows", "shipped_configs"]

_LOG2E = 1.4426950408889634
# Globals a @triton.jit function reads must be constexpr.
_LOG2E_C = tl.constexpr(_LOG2E)
_LN2_C = tl.constexpr(0.6931471805599453)
#: Rows checked per program.
ROWS = 16
_NUM_WARPS = 4
#: BLOCK_D buckets: every supported head dim (16..256) pads to one of these.
BLOCK_DS = (32, 64, 128, 256)


@triton.jit
def _finite(x):
    # False for NaN (every comparison with NaN is false) and for +-inf.
    return tl.abs(x) < float("inf")


@triton.jit
def _interval(kv_start_ptr, kv_end_ptr, rows, valid, num_keys):
    """Clamped [start, end) of ``rows`` (end >= start), as the tiled kernels read them."""
    start = tl.load(kv_start_ptr + rows, mask=valid, other=0)
    end = tl.load(kv_end_ptr + rows, mask=valid, other=0)
    start = tl.minimum(tl.maximum(start, 0), num_keys)
    end = tl.maximum(tl.minimum(end, num_keys), start)
    return start, end


@triton.jit
def _rows_are_bad(ptr, rows, valid, stride_t, offs_d, head_dim):
    """int32 [ROWS]: 1 where a row of ``ptr`` holds a NaN or inf."""
    tile = tl.load(
        ptr + rows.to(tl.int64)[:, None] * stride_t + offs_d[None, :],
        mask=valid[:, None] & (offs_d[None, :] < head_dim),
        other=0.0,
    ).to(tl.float32)
    return tl.sum(tl.where(_finite(tile), 0, 1), axis=1)


@triton.jit
def _element(vector, r, ROWS: tl.constexpr):
    """vector[r] for a runtime r (Triton cannot index a tensor by a scalar)."""
    return tl.sum(tl.where(tl.arange(0, ROWS) == r, vector, 0), axis=0)


@triton.jit
def _probs_and_dscores(s, lse2, dp, delta, allowed):
    """P = exp2(s - lse2) and dS = P (dP - delta), exact zeros where not ``allowed``."""
    p = tl.where(allowed, tl.exp2(s - lse2), 0.0)
    return p, tl.where(allowed, p * (dp - delta), 0.0)


@triton.jit
def _load_vector(ptr, offs_d, head_dim):
    return tl.load(ptr + offs_d, mask=offs_d < head_dim, other=0.0).to(tl.float32)


@triton.jit
def _load_key_tile(ptr, keys, key_ok, stride_t, offs_d, head_dim):
    return tl.load(
        ptr + keys.to(tl.int64)[:, None] * stride_t + offs_d[None, :],
        mask=key_ok[:, None] & (offs_d[None, :] < head_dim),
        other=0.0,
    ).to(tl.float32)


@triton.jit
def _forward_row(
    q_row,
    k_base,
    v_base,
    start,
    end,
    stride_kt,
    stride_vt,
    head_dim,
    qk_scale,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(out [BLOCK_D] fp32, lse scalar, natural log) of one row over keys [start, end)."""
    offs_d = tl.arange(0, BLOCK_D)
    # Pass 1: the row max, and whether any score is NaN (max need not propagate NaN on a GPU).
    m = tl.full([], float("-inf"), tl.float32)
    nan_seen = tl.full([], 0, tl.int32)
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        k = _load_key_tile(k_base, keys, key_ok, stride_kt, offs_d, head_dim)
        s = tl.sum(k * q_row[None, :], axis=1) * qk_scale
        nan_seen += tl.sum(tl.where(key_ok & (s != s), 1, 0))
        m = tl.maximum(m, tl.max(tl.where(key_ok, s, float("-inf")), axis=0))
    m = tl.where(nan_seen > 0, float("nan"), m)
    # Pass 2: p = exp2(s - m) over the allowed keys only (m = +-inf gives NaN, as softmax does).
    total = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        k = _load_key_tile(k_base, keys, key_ok, stride_kt, offs_d, head_dim)
        v = _load_key_tile(v_base, keys, key_ok, stride_vt, offs_d, head_dim)
        s = tl.sum(k * q_row[None, :], axis=1) * qk_scale
        p = tl.where(key_ok, tl.exp2(s - m), 0.0)
        total += tl.sum(p, axis=0)
        acc += tl.sum(p[:, None] * v, axis=0)
    nonempty = end > start
    out = tl.where(nonempty, acc / total, 0.0)
    lse = tl.where(nonempty, (m + tl.log2(total)) * _LN2_C, float("-inf"))
    return out, lse


@triton.jit(do_not_specialize=["group"])
def _forward_rows_kernel(
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
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Recompute the out/lse rows of one (row block, query head) that are suspect.

    grid (cdiv(Tq, ROWS), Hq); qk_scale = scale * log2(e).
    """
    head = tl.program_id(1)
    kv_head = head // group
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    valid = rows < num_queries
    offs_d = tl.arange(0, BLOCK_D)
    out_base = out_ptr + head.to(tl.int64) * stride_oh
    lse_base = lse_ptr + head.to(tl.int64) * num_queries
    start, end = _interval(kv_start_ptr, kv_end_ptr, rows, valid, num_keys)
    lse = tl.load(lse_base + rows, mask=valid, other=0.0)
    bad_lse = (lse != lse) | (lse == float("inf")) | ((lse == float("-inf")) & (end > start))
    suspect = _rows_are_bad(out_base, rows, valid, stride_ot, offs_d, head_dim)
    suspect += tl.where(valid & bad_lse, 1, 0)
    if tl.sum(suspect, axis=0) > 0:
        for r in range(0, ROWS):
            row = tl.program_id(0) * ROWS + r
            if (row < num_queries) & (_element(suspect, r, ROWS) > 0):
                row_start = _element(start, r, ROWS)
                row_end = _element(end, r, ROWS)
                q_row = _load_vector(
                    q_ptr + row.to(tl.int64) * stride_qt + head.to(tl.int64) * stride_qh,
                    offs_d,
                    head_dim,
                )
                out, row_lse = _forward_row(
                    q_row,
                    k_ptr + kv_head.to(tl.int64) * stride_kh,
                    v_ptr + kv_head.to(tl.int64) * stride_vh,
                    row_start,
                    row_end,
                    stride_kt,
                    stride_vt,
                    head_dim,
                    qk_scale,
                    BLOCK_N,
                    BLOCK_D,
                )
                tl.store(
                    out_base + row.to(tl.int64) * stride_ot + offs_d,
                    out.to(out_ptr.dtype.element_ty),
                    mask=offs_d < head_dim,
                )
                tl.store(lse_base + row, row_lse)


@triton.jit(do_not_specialize=["group"])
def _dq_rows_kernel(
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
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Recompute the dq rows of one (row block, query head) that hold NaN or inf.

    grid (cdiv(Tq, ROWS), Hq); qk_scale = scale * log2(e), sm_scale = scale.
    """
    head = tl.program_id(1)
    kv_head = head // group
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    valid = rows < num_queries
    offs_d = tl.arange(0, BLOCK_D)
    dq_base = dq_ptr + head.to(tl.int64) * stride_dqh
    suspect = _rows_are_bad(dq_base, rows, valid, stride_dqt, offs_d, head_dim)
    if tl.sum(suspect, axis=0) > 0:
        start, end = _interval(kv_start_ptr, kv_end_ptr, rows, valid, num_keys)
        k_base = k_ptr + kv_head.to(tl.int64) * stride_kh
        v_base = v_ptr + kv_head.to(tl.int64) * stride_vh
        for r in range(0, ROWS):
            row = tl.program_id(0) * ROWS + r
            if (row < num_queries) & (_element(suspect, r, ROWS) > 0):
                row_start = _element(start, r, ROWS)
                row_end = _element(end, r, ROWS)
                at = row.to(tl.int64)
                q_row = _load_vector(q_ptr + at * stride_qt + head * stride_qh, offs_d, head_dim)
                do_row = _load_vector(
                    do_ptr + at * stride_dot + head * stride_doh, offs_d, head_dim
                )
                lse2 = tl.load(lse_ptr + head.to(tl.int64) * num_queries + row) * _LOG2E_C
                delta = tl.load(delta_ptr + head.to(tl.int64) * num_queries + row)
                acc = tl.zeros([BLOCK_D], dtype=tl.float32)
                for n0 in range(row_start, row_end, BLOCK_N):
                    keys = n0 + tl.arange(0, BLOCK_N)
                    key_ok = keys < row_end
                    k = _load_key_tile(k_base, keys, key_ok, stride_kt, offs_d, head_dim)
                    v = _load_key_tile(v_base, keys, key_ok, stride_vt, offs_d, head_dim)
                    s = tl.sum(k * q_row[None, :], axis=1) * qk_scale
                    dp = tl.sum(v * do_row[None, :], axis=1)
                    _, ds = _probs_and_dscores(s, lse2, dp, delta, key_ok)
                    acc += tl.sum(ds[:, None] * k, axis=0)
                tl.store(
                    dq_base + at * stride_dqt + offs_d,
                    (acc * sm_scale).to(dq_ptr.dtype.element_ty),
                    mask=offs_d < head_dim,
                )


@triton.jit(do_not_specialize=["group"])
def _dkdv_rows_kernel(
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
    qk_scale,
    sm_scale,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Recompute the dk/dv rows of one (key block, kv head) where either holds NaN or inf.

    A key's gradient sums over every query that attends it, over the ``group``
    query heads of its kv head; the queries are scanned ``BLOCK_N`` at a time
    and those whose clamped interval misses the key are never loaded.
    grid (cdiv(Tk, ROWS), Hkv).
    """
    kv_head = tl.program_id(1)
    keys = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    valid = keys < num_keys
    offs_d = tl.arange(0, BLOCK_D)
    dk_base = dk_ptr + kv_head.to(tl.int64) * stride_dkh
    dv_base = dv_ptr + kv_head.to(tl.int64) * stride_dvh
    suspect = _rows_are_bad(dk_base, keys, valid, stride_dkt, offs_d, head_dim)
    suspect += _rows_are_bad(dv_base, keys, valid, stride_dvt, offs_d, head_dim)
    if tl.sum(suspect, axis=0) > 0:
        for r in range(0, ROWS):
            key = tl.program_id(0) * ROWS + r
            if (key < num_keys) & (_element(suspect, r, ROWS) > 0):
                at = key.to(tl.int64)
                k_row = _load_vector(
                    k_ptr + at * stride_kt + kv_head.to(tl.int64) * stride_kh, offs_d, head_dim
                )
                v_row = _load_vector(
                    v_ptr + at * stride_vt + kv_head.to(tl.int64) * stride_vh, offs_d, head_dim
                )
                dk = tl.zeros([BLOCK_D], dtype=tl.float32)
                dv = tl.zeros([BLOCK_D], dtype=tl.float32)
                for g in range(0, group):
                    head = kv_head * group + g
                    for m0 in range(0, num_queries, BLOCK_N):
                        queries = m0 + tl.arange(0, BLOCK_N)
                        start, end = _interval(
                            kv_start_ptr, kv_end_ptr, queries, queries < num_queries, num_keys
                        )
                        attends = (queries < num_queries) & (start <= key) & (key < end)
                        q = _load_key_tile(
                            q_ptr + head.to(tl.int64) * stride_qh,
                            queries,
                            attends,
                            stride_qt,
                            offs_d,
                            head_dim,
                        )
                        do = _load_key_tile(
                            do_ptr + head.to(tl.int64) * stride_doh,
                            queries,
                            attends,
                            stride_dot,
                            offs_d,
                            head_dim,
                        )
                        stats = head.to(tl.int64) * num_queries + queries
                        lse2 = tl.load(lse_ptr + stats, mask=attends, other=0.0) * _LOG2E_C
                        delta = tl.load(delta_ptr + stats, mask=attends, other=0.0)
                        s = tl.sum(q * k_row[None, :], axis=1) * qk_scale
                        dp = tl.sum(do * v_row[None, :], axis=1)
                        p, ds = _probs_and_dscores(s, lse2, dp, delta, attends)
                        dv += tl.sum(p[:, None] * do, axis=0)
                        dk += tl.sum(ds[:, None] * q, axis=0)
                d_ok = offs_d < head_dim
                tl.store(
                    dk_base + at * stride_dkt + offs_d,
                    (dk * sm_scale).to(dk_ptr.dtype.element_ty),
                    mask=d_ok,
                )
                tl.store(
                    dv_base + at * stride_dvt + offs_d, dv.to(dv_ptr.dtype.element_ty), mask=d_ok
                )


# --------------------------------------------------------------------------- launchers
def _block_d(head_dim: int) -> int:
    return max(BLOCK_DS[0], triton.next_power_of_2(head_dim))


def _block_n(block_d: int) -> int:
    """Key (query) rows per step of a recompute: [BLOCK_N, BLOCK_D] fp32 tiles of at
    most 2048 values, so that no shipped configuration spills (gpu_readiness)."""
    return min(32, max(8, 2048 // block_d))


def _constexprs(block_d: int) -> dict:
    return {"ROWS": ROWS, "BLOCK_N": _block_n(block_d), "BLOCK_D": block_d}


def _options(head_dim: int) -> dict:
    return {**_constexprs(_block_d(head_dim)), "num_warps": _NUM_WARPS}


def recompute_forward_rows(q, k, v, out, lse, kv_start, kv_end, scale: float) -> None:
    """Recompute, in place, the rows of out [Tq, Hq, D] / lse [Hq, Tq] a bad operand reached.

    Arguments as for kernels.span_attention.span_attention_forward, after it ran.
    """
    num_queries, num_heads, head_dim = q.shape
    num_keys, num_kv_heads, _ = k.shape
    _forward_rows_kernel[(triton.cdiv(num_queries, ROWS), num_heads)](
        q, k, v, out, lse, kv_start, kv_end,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        num_queries, num_keys, head_dim, num_heads // num_kv_heads, scale * _LOG2E,
        **_options(head_dim),
    )  # fmt: skip


def recompute_backward_rows(do, q, k, v, lse, delta, dq, dk, dv, kv_start, kv_end, scale) -> None:
    """Recompute, in place, the rows of dq, dk, dv that hold NaN or inf (see the module doc).

    Arguments as for kernels.span_attention.span_attention_backward, after it ran.
    """
    num_queries, num_heads, head_dim = q.shape
    num_keys, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    inputs = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1),
    )  # fmt: skip
    sizes = (num_queries, num_keys, head_dim, group, scale * _LOG2E, scale)
    _dq_rows_kernel[(triton.cdiv(num_queries, ROWS), num_heads)](
        q, k, v, do, lse, delta, dq, kv_start, kv_end,
        *inputs, dq.stride(0), dq.stride(1), *sizes, **_options(head_dim),
    )  # fmt: skip
    _dkdv_rows_kernel[(triton.cdiv(num_keys, ROWS), num_kv_heads)](
        q, k, v, do, lse, delta, dk, dv, kv_start, kv_end,
        *inputs, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), *sizes,
        **_options(head_dim),
    )  # fmt: skip


# --------------------------------------------------------------------------- configs
_KERNELS = {
    "fwd_rows": _forward_rows_kernel,
    "bwd_dq_rows": _dq_rows_kernel,
    "bwd_dkdv_rows": _dkdv_rows_kernel,
}
_POINTERS = {
    "lse_ptr": "*fp32",
    "delta_ptr": "*fp32",
    "kv_start_ptr": "*i32",
    "kv_end_ptr": "*i32",
}
_SCALARS = {"qk_scale": "fp32", "sm_scale": "fp32"}


def shipped_configs() -> list[KernelConfig]:
    """Every recompute kernel the launchers can run: pass x dtype x BLOCK_D x arch."""
    configs = []
    for pass_name, kernel in _KERNELS.items():
        for arch in (80, 90):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                for block_d in BLOCK_DS:
                    configs.append(
                        KernelConfig(
                            kernel=kernel,
                            op="span_attention",
                            pass_name=pass_name,
                            arch=arch,
                            signature=triton_signature(
                                kernel, dtype, pointers=_POINTERS, scalars=_SCALARS
                            ),
                            constexprs=_constexprs(block_d),
                            num_warps=_NUM_WARPS,
                            num_stages=1,
                            uses_matmul=False,
                            label=(
                                f"{DTYPE_NAMES[dtype]} BLOCK_D={block_d} ROWS={ROWS} "
                                f"BN={_block_n(block_d)}"
                            ),
                            extra={"attrs": aligned_attrs(kernel)},
                        )
                    )
    return configs
