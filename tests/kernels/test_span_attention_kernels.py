"""Span attention Triton kernels under the interpreter, against the float64 reference.

Every case checks out, lse, dq, dk and dv with the docs/ARCHITECTURE.md tolerance rule
(golden: metalm_fast.reference in float64 with autograd; baseline: the same in
the test dtype). The cases spread mask kinds, dtypes, GQA, head dims, odd
lengths, zero-length documents and fused-qkv slices across a few small
problems rather than a full product: the interpreter is slow.

Block boundaries: under the interpreter the launchers use the sm_80 tiles,
whose query/key blocks are at most 128 rows, so lengths 63/65, 127/129 and
97/113/203 straddle real tile edges of every pass.
"""

from __future__ import annotations

import math
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from metalm_fast.kernels import span_attention as kernels  # noqa: E402

from metalm_fast import reference  # noqa: E402
from metalm_fast.masks import SpanMask  # noqa: E402
from tests.tolerance import assert_within_tolerance  # noqa: E402


# ----------------------------------------------------------------------------- helpers
def _qkv(num_q, num_k, heads, kv_heads, head_dim, dtype, *, fused=False, seed=0):
    """q [Tq, Hq, D], k, v [Tk, Hkv, D] in ``dtype``; fused: slices of one qkv tensor."""
    gen = torch.Generator().manual_seed(seed)
    if fused:
        assert num_q == num_k
        qkv = torch.randn(num_q, heads + 2 * kv_heads, head_dim, generator=gen).to(dtype)
        return qkv[:, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
    q = torch.randn(num_q, heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(num_k, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_k, kv_heads, head_dim, generator=gen).to(dtype)
    return q, k, v


def _reference(q, k, v, mask, do, dlse, dtype):
    """out, lse and grads of sum(out * do) + sum(lse * dlse), computed in ``dtype``."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out, lse = reference.span_attention(*leaves, mask, scale=q.shape[-1] ** -0.5)
    loss = (out * do.to(dtype)).sum()
    if dlse is not None:
        finite = torch.isfinite(lse)
        loss = loss + torch.where(finite, lse * dlse.to(dtype), torch.zeros_like(lse)).sum()
    loss.backward()
    return [out.detach(), lse.detach()] + [x.grad for x in leaves]


def _kernel(q, k, v, mask, do, dlse, *, monotone=None):
    monotone = mask.monotone if monotone is None else monotone
    scale = q.shape[-1] ** -0.5
    out, lse = kernels.span_attention_forward(q, k, v, mask.kv_start, mask.kv_end, scale, monotone)
    delta = (do.float() * out.float()).sum(-1).transpose(0, 1)
    if dlse is not None:
        delta = delta - dlse
    grads = kernels.span_attention_backward(
        do, q, k, v, lse, delta.contiguous(), mask.kv_start, mask.kv_end, scale, monotone
    )
    return [out, lse, *grads]


def _check(q, k, v, mask, *, with_lse_grad=False, monotone=None, seed=1):
    """Run kernel and references; assert the tolerance rule on all five results."""
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(q.shape, generator=gen).to(q.dtype)
    dlse = torch.randn(q.shape[1], q.shape[0], generator=gen) if with_lse_grad else None
    actual = _kernel(q, k, v, mask, do, dlse, monotone=monotone)
    golden = _reference(q, k, v, mask, do, dlse, torch.float64)
    baseline = _reference(q, k, v, mask, do, dlse, q.dtype)
    for name, a, g, b in zip(("out", "lse", "dq", "dk", "dv"), actual, golden, baseline):
        assert a.dtype == (torch.float32 if name == "lse" else q.dtype), name
        assert_within_tolerance(a, g, b, name)
    out, lse, dq = actual[:3]
    empty = mask.kv_start >= mask.kv_end
    assert torch.all(out[empty] == 0), "empty-interval rows must be exactly 0"
    assert torch.all(dq[empty] == 0), "empty-interval rows get dq = 0"
    assert torch.all(lse[:, empty] == -math.inf)
    return actual


def _random_intervals(num_q, num_k, seed, empty_every=7):
    """Arbitrary (non-monotone) intervals, every ``empty_every``-th one empty."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(0, num_k + 1, (num_q,), generator=gen)
    b = torch.randint(0, num_k + 1, (num_q,), generator=gen)
    start, end = torch.minimum(a, b), torch.maximum(a, b)
    end[::empty_every] = start[::empty_every]
    return SpanMask.from_intervals(start, end, num_keys=num_k)


# ----------------------------------------------------------------------------- mask kinds
def test_causal_fp32_zero_length_doc():
    cu = torch.tensor([0, 97, 97, 210])  # a zero-length document in the middle
    q, k, v = _qkv(210, 210, 2, 2, 64, torch.float32)
    _check(q, k, v, SpanMask.causal(cu))


def test_bidirectional_fp16_gqa_short_docs():
    cu = torch.tensor([0, 1, 3, 116])  # lengths 1, 2, 113
    q, k, v = _qkv(116, 116, 4, 1, 32, torch.float16)
    _check(q, k, v, SpanMask.bidirectional(cu))


def test_semi_causal_fp16_fused_qkv_d80():
    cu = torch.tensor([0, 129, 129, 203])
    mask = SpanMask.semi_causal(cu, [10, 140], [90, 200])
    q, k, v = _qkv(203, 203, 4, 2, 80, torch.float16, fused=True)
    assert not q.is_contiguous()
    _check(q, k, v, mask)


def test_prefix_lm_bf16_d128():
    cu = torch.tensor([0, 65, 130])
    q, k, v = _qkv(130, 130, 2, 1, 128, torch.bfloat16)
    _check(q, k, v, SpanMask.prefix_lm(cu, [40, 0]))


def test_sliding_window_fp32_tile_edges():
    cu = torch.tensor([0, 127, 256])  # block - 1 and block + 1 for 128-row tiles
    q, k, v = _qkv(256, 256, 2, 1, 96, torch.float32, fused=True)
    _check(q, k, v, SpanMask.sliding_window(cu, 37))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_random_intervals_cross_attention(dtype):
    mask = _random_intervals(113, 203, seed=3)
    assert not mask.monotone
    q, k, v = _qkv(113, 203, 2, 1, 64, dtype)
    _check(q, k, v, mask)


def test_non_monotone_with_full_tiles():
    """Mostly full rows with a few odd ones: the non-monotone dK/dV path meets
    full, partial and empty query blocks."""
    num = 200
    start = torch.zeros(num, dtype=torch.int64)
    end = torch.full((num,), num, dtype=torch.int64)
    start[5], end[5] = 150, 160
    start[70], end[70] = 3, 3  # empty
    start[150:160], end[150:160] = 0, 20
    mask = SpanMask.from_intervals(start, end, num_keys=num)
    assert not mask.monotone
    q, k, v = _qkv(num, num, 2, 2, 32, torch.float32, seed=4)
    _check(q, k, v, mask)


def test_monotone_mask_on_generic_path():
    """monotone=False must also be right for a monotone mask (it just searches less)."""
    cu = torch.tensor([0, 63, 150])
    mask = SpanMask.semi_causal(cu, [70], [120])
    q, k, v = _qkv(150, 150, 2, 1, 64, torch.float16, seed=5)
    _check(q, k, v, mask, monotone=False)


def test_lse_gradient_through_delta():
    """A loss on lse too: delta = rowsum(do * out) - dlse gives the right grads."""
    cu = torch.tensor([0, 50, 120])
    mask = SpanMask.semi_causal(cu, [10, 60], [30, 100])
    q, k, v = _qkv(120, 120, 2, 2, 64, torch.float32, seed=6)
    _check(q, k, v, mask, with_lse_grad=True)


def test_head_dim_24_bf16():
    """D < 32 runs in the padded BLOCK_D = 32 configs."""
    cu = torch.tensor([0, 70, 140])
    q, k, v = _qkv(140, 140, 2, 2, 24, torch.bfloat16, seed=14)
    _check(q, k, v, SpanMask.bidirectional(cu))


def test_head_dim_256_fp16():
    cu = torch.tensor([0, 33, 70])
    q, k, v = _qkv(70, 70, 2, 1, 256, torch.float16, seed=7)
    _check(q, k, v, SpanMask.causal(cu))


# ----------------------------------------------------------------------------- tile walk
def _expected_tile_calls(mask, rows_per_block, keys_per_tile, heads):
    """(full, partial) (query block, key tile) pairs a tile walk should visit:
    full -> unmasked body, partial -> masked body, empty -> never."""
    start, end = mask.kv_start.tolist(), mask.kv_end.tolist()
    full = partial = 0
    for row0 in range(0, mask.num_queries, rows_per_block):
        rows = range(row0, min(row0 + rows_per_block, mask.num_queries))
        for n0 in range(0, mask.num_keys, keys_per_tile):
            n1 = n0 + keys_per_tile
            if all(start[t] <= n0 and end[t] >= n1 for t in rows):
                full += 1
            elif any(start[t] < min(end[t], n1) and end[t] > n0 for t in rows):
                partial += 1
    return {True: partial * heads, False: full * heads}


@pytest.mark.parametrize("kind", ["bidirectional", "semi_causal", "random", "causal_generic"])
def test_tile_walk_visits_exactly_the_needed_tiles(kind, monkeypatch):
    """Count the tile bodies each kernel runs: every full tile unmasked, every
    partial tile masked, no empty tile at all (tile efficiency 1.0), for
    monotone masks (binary search) and arbitrary ones (scan); and the results
    meet the tolerance rule."""
    num, heads, kv_heads = 300, 2, 1
    cu = torch.tensor([0, 37, 300])
    mask, monotone = {
        "bidirectional": (SpanMask.bidirectional(cu), True),
        "semi_causal": (SpanMask.semi_causal(cu, [40, 150], [100, 290]), True),
        "random": (_random_intervals(num, num, seed=12, empty_every=5), False),
        "causal_generic": (SpanMask.causal(cu), False),
    }[kind]
    assert mask.monotone == monotone or kind == "causal_generic"
    calls = {name: {True: 0, False: 0} for name in ("_fwd_tile", "_dq_tile", "_dkdv_tile")}
    for name in calls:
        body = getattr(kernels, name)

        def counted(*args, _body=body, _name=name):
            calls[_name][bool(args[-3])] += 1  # args[-3] is MASKED
            return _body(*args)

        monkeypatch.setattr(kernels, name, counted)
    q, k, v = _qkv(num, num, heads, kv_heads, 32, torch.float16, seed=13)
    _check(q, k, v, mask, monotone=monotone)  # numerics too, so full tiles are checked
    fwd, dq, dkdv = (
        kernels._select_config(p, torch.float16, 32, 80) for p in ("fwd", "bwd_dq", "bwd_dkdv")
    )
    assert calls["_fwd_tile"] == _expected_tile_calls(mask, fwd.block_m, fwd.block_n, heads)
    assert calls["_dq_tile"] == _expected_tile_calls(mask, dq.block_m, dq.block_n, heads)
    assert calls["_dkdv_tile"] == _expected_tile_calls(mask, dkdv.block_m, dkdv.block_n, heads)
    assert all(calls[name][False] > 0 for name in calls) or kind == "random"
    assert all(calls[name][True] > 0 for name in calls)


# ----------------------------------------------------------------------------- edge sizes
@pytest.mark.parametrize("num_q,num_k", [(1, 3), (2, 2), (2, 1)])
def test_tiny_lengths(num_q, num_k):
    """Tq or Tk of 1 or 2, in fp16. (fp32 is covered at larger sizes: with two or
    three terms per sum the fp32 baseline error is one rounding, and the rule's
    2x bound then measures only how exp2 and exp round.) Tq = Tk = 1 is left out:
    a query with a single key has dq = dk = 0 exactly in float64, so the rule's
    bound is 0, while any fused kernel rounds rowsum(dO * O) and dO . v apart."""
    q, k, v = _qkv(num_q, num_k, 2, 1, 32, torch.float16, seed=num_q + num_k)
    if num_q == num_k:
        mask = SpanMask.causal(torch.tensor([0, num_q]))
    else:
        mask = SpanMask.from_intervals([0] * num_q, [num_k] * num_q, num_keys=num_k)
    if num_k == 1:  # dq = dk = 0 in float64 again, so only forward and dv are comparable
        do = torch.randn(q.shape, generator=torch.Generator().manual_seed(0)).half()
        actual = _kernel(q, k, v, mask, do, None)
        golden = _reference(q, k, v, mask, do, None, torch.float64)
        baseline = _reference(q, k, v, mask, do, None, torch.float16)
        for index, name in ((0, "out"), (1, "lse"), (4, "dv")):
            assert_within_tolerance(actual[index], golden[index], baseline[index], name)
    else:
        _check(q, k, v, mask)


def test_all_intervals_empty():
    mask = SpanMask.from_intervals(torch.tensor([0, 5, 9]), torch.tensor([0, 5, 9]), num_keys=9)
    q, k, v = _qkv(3, 9, 2, 2, 64, torch.float16)
    out, lse, dq, dk, dv = _check(q, k, v, mask)
    assert torch.all(dk == 0) and torch.all(dv == 0)


@pytest.mark.parametrize("num_q,num_k", [(0, 5), (4, 0), (0, 0)])
def test_zero_tokens(num_q, num_k):
    q, k, v = _qkv(num_q, num_k, 2, 1, 64, torch.float32)
    zeros = torch.zeros(num_q, dtype=torch.int32)
    mask = SpanMask.from_intervals(zeros, zeros, num_keys=num_k)
    out, lse, dq, dk, dv = _kernel(q, k, v, mask, torch.randn(q.shape), None)
    assert out.shape == q.shape and lse.shape == (2, num_q)
    assert torch.all(out == 0) and torch.all(lse == -math.inf)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert torch.all(dq == 0) and torch.all(dk == 0) and torch.all(dv == 0)


# ----------------------------------------------------------------------------- determinism
def test_backward_is_bit_identical_on_repeat():
    cu = torch.tensor([0, 90, 170])
    mask = SpanMask.semi_causal(cu, [20], [60])
    q, k, v = _qkv(170, 170, 4, 2, 64, torch.float16, seed=8)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).half()
    first = _kernel(q, k, v, mask, do, None)
    second = _kernel(q, k, v, mask, do, None)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- fp32 precision
def _tf32(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to tf32 (10 mantissa bits), to nearest, ties away (cvt.rna.tf32.f32)."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _tf32x3_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What tl.dot(input_precision="tf32x3") computes: hi*hi + hi*lo + lo*hi in tf32."""
    a_hi, b_hi = _tf32(a), _tf32(b)
    a_lo, b_lo = _tf32(a - a_hi), _tf32(b - b_hi)
    return a_lo @ b_hi + a_hi @ b_lo + a_hi @ b_hi


def test_fp32_tf32x3_precision_meets_tolerance():
    """The interpreter ignores input_precision, so emulate the fp32 configs' tf32x3
    dots bit-for-bit in all six products of forward and backward and hold the
    result to the same rule. (Plain tf32 misses it by ~1000x.)"""
    cu = torch.tensor([0, 90, 160])
    mask = SpanMask.semi_causal(cu, [10], [60])
    q, k, v = _qkv(160, 160, 1, 1, 128, torch.float32, seed=10)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(11))
    scale = 128**-0.5
    q2, k2, v2, do2 = q[:, 0], k[:, 0], v[:, 0], do[:, 0]
    allowed = mask.to_dense()
    scores = (_tf32x3_matmul(q2, k2.T) * scale).masked_fill(~allowed, -math.inf)
    probs = torch.softmax(scores, dim=-1)
    out = _tf32x3_matmul(probs, v2)
    delta = (do2 * out).sum(-1, keepdim=True)
    dscores = probs * (_tf32x3_matmul(do2, v2.T) - delta)
    emulated = [
        out,
        _tf32x3_matmul(dscores, k2) * scale,
        _tf32x3_matmul(dscores.T, q2) * scale,
        _tf32x3_matmul(probs.T, do2),
    ]
    golden = _reference(q, k, v, mask, do, None, torch.float64)
    baseline = _reference(q, k, v, mask, do, None, torch.float32)
    for name, a, g, b in zip(
        ("out", "dq", "dk", "dv"), emulated, golden[:1] + golden[2:], baseline[:1] + baseline[2:]
    ):
        assert_within_tolerance(a[:, None], g, b, name)


# ----------------------------------------------------------------------------- configs
def test_shipped_configs_cover_every_launch():
    configs = kernels.shipped_configs()
    assert configs
    seen = {(c.pass_name, c.signature["q_ptr"], c.constexprs["BLOCK_D"], c.arch) for c in configs}
    # The tiled passes and the exact recompute of non-finite rows that follows each.
    passes = ("fwd", "bwd_dq", "bwd_dkdv", "fwd_rows", "bwd_dq_rows", "bwd_dkdv_rows")
    for pass_name in passes:
        for dtype in ("*fp16", "*bf16", "*fp32"):
            for block_d in (32, 64, 128, 256):
                for arch in (80, 90):
                    assert (pass_name, dtype, block_d, arch) in seen
    for config in configs:
        names = [n for n in config.kernel.arg_names if n not in config.constexprs]
        assert list(config.signature) == names, config.label
        assert set(config.constexprs) | set(names) == set(config.kernel.arg_names)
        assert config.op == "span_attention"
        if config.pass_name.endswith("_rows"):
            assert not config.uses_matmul  # plain fp32 sums: no dot, no tensor cores
            continue
        precision = config.constexprs["DOT_PRECISION"]
        if config.signature["q_ptr"] == "*fp32":
            assert precision in ("tf32x3", "ieee")
        else:
            assert precision == "ieee"  # ignored for 16-bit operands: mma regardless
        # Only fp32 with ieee dots runs without tensor cores, and it says why.
        assert config.uses_matmul == (precision == "tf32x3" or config.signature["q_ptr"] != "*fp32")
        assert config.uses_matmul or config.extra["note"]


@pytest.mark.parametrize("head_dim", [16, 24, 32, 64, 80, 96, 128, 200, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_launcher_tiles_are_shipped(head_dim, dtype):
    """What a launcher would pick on each arch is one of the shipped configs."""
    shipped = {
        (
            c.pass_name,
            c.arch,
            c.signature["q_ptr"],
            tuple(sorted(c.constexprs.items())),
            c.num_warps,
            c.num_stages,
        )
        for c in kernels.shipped_configs()
    }
    block_d = max(32, triton.next_power_of_2(head_dim))  # D < 32 runs padded to 32
    for pass_name in ("fwd", "bwd_dq", "bwd_dkdv"):
        for arch in (80, 90):
            tiles = kernels._select_config(pass_name, dtype, head_dim, arch)
            constexprs = kernels._constexprs(tiles, dtype, block_d, head_dim == block_d)
            key = (
                pass_name,
                arch,
                "*" + kernels._DTYPE_NAMES[dtype],
                tuple(sorted(constexprs.items())),
                tiles.num_warps,
                tiles.num_stages,
            )
            assert key in shipped


def test_unsupported_head_dim_is_rejected():
    with pytest.raises(ValueError, match="head dims"):
        kernels._select_config("fwd", torch.float16, 8, 80)
    with pytest.raises(ValueError, match="head dims"):
        kernels._select_config("fwd", torch.float16, 320, 90)
