"""Span attention Triton kernels under the interpreter, against the float64 reference.

Every case checks out, lse, dq, dk and dv with the DESIGN.md tolerance rule
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

from metalm_fast import reference  # noqa: E402
from metalm_fast.kernels import span_attention as kernels  # noqa: E402
from metalm_fast.masks import SpanMask  # noqa: E402
from tests.tolerance import assert_within_tolerance  # noqa: E402


def _patch_interpreter_bf16_dot() -> None:
    """Triton 3.9's interpreter keeps bf16 as raw uint16 bits and feeds them to
    np.matmul as integers. Widen bf16 dot operands to fp32 (exact) first; this
    only touches the interpreter, never compiled kernels."""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_metalm_bf16_dot", False):
        return
    original = builder.create_dot

    def widen(handle):
        if handle.dtype.scalar != triton.language.bfloat16:
            return handle
        bits = handle.data.astype(np.uint32) << np.uint32(16)
        return interpreter.TensorHandle(bits.view(np.float32), triton.language.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    builder._metalm_bf16_dot = True


_patch_interpreter_bf16_dot()


# ----------------------------------------------------------------------------- helpers
def _qkv(num_q, num_k, heads, kv_heads, head_dim, dtype, *, fused=False, seed=0):
    """q [Tq, Hq, D], k, v [Tk, Hkv, D] in ``dtype``; fused: slices of one qkv tensor."""
    gen = torch.Generator().manual_seed(seed)
    if fused:
        assert num_q == num_k
        qkv = torch.randn(num_q, heads + 2 * kv_heads, head_dim, generator=gen).to(dtype)
        return qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
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


def test_head_dim_256_fp16():
    cu = torch.tensor([0, 33, 70])
    q, k, v = _qkv(70, 70, 2, 1, 256, torch.float16, seed=7)
    _check(q, k, v, SpanMask.causal(cu))


# ----------------------------------------------------------------------------- edge sizes
@pytest.mark.parametrize("length", [1, 2])
def test_tiny_lengths(length):
    q, k, v = _qkv(length, length, 2, 1, 32, torch.float32, seed=length)
    _check(q, k, v, SpanMask.causal(torch.tensor([0, length])))


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
    scale = 128 ** -0.5
    q2, k2, v2, do2 = q[:, 0], k[:, 0], v[:, 0], do[:, 0]
    allowed = mask.to_dense()
    scores = (_tf32x3_matmul(q2, k2.T) * scale).masked_fill(~allowed, -math.inf)
    probs = torch.softmax(scores, dim=-1)
    out = _tf32x3_matmul(probs, v2)
    delta = (do2 * out).sum(-1, keepdim=True)
    dscores = probs * (_tf32x3_matmul(do2, v2.T) - delta)
    emulated = [
        out, _tf32x3_matmul(dscores, k2) * scale, _tf32x3_matmul(dscores.T, q2) * scale,
        _tf32x3_matmul(probs.T, do2),
    ]
    golden = _reference(q, k, v, mask, do, None, torch.float64)
    baseline = _reference(q, k, v, mask, do, None, torch.float32)
    for name, a, g, b in zip(("out", "dq", "dk", "dv"), emulated, golden[:1] + golden[2:],
                             baseline[:1] + baseline[2:]):
        assert_within_tolerance(a[:, None], g, b, name)


# ----------------------------------------------------------------------------- configs
def test_shipped_configs_cover_every_launch():
    configs = kernels.shipped_configs()
    assert configs
    seen = {(c.pass_name, c.signature["q_ptr"], c.constexprs["BLOCK_D"], c.arch) for c in configs}
    for pass_name in ("fwd", "bwd_dq", "bwd_dkdv"):
        for dtype in ("*fp16", "*bf16", "*fp32"):
            for block_d in (32, 64, 128, 256):
                for arch in (80, 90):
                    assert (pass_name, dtype, block_d, arch) in seen
    for config in configs:
        names = [n for n in config.kernel.arg_names if n not in config.constexprs]
        assert list(config.signature) == names, config.label
        assert set(config.constexprs) | set(names) == set(config.kernel.arg_names)
        assert config.uses_matmul and config.op == "span_attention"
        assert config.constexprs["DOT_PRECISION"] == (
            "tf32x3" if config.signature["q_ptr"] == "*fp32" else "ieee")


@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128, 200, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_launcher_tiles_are_shipped(head_dim, dtype):
    """What a launcher would pick on each arch is one of the shipped configs."""
    shipped = {
        (c.pass_name, c.arch, c.signature["q_ptr"], tuple(sorted(c.constexprs.items())),
         c.num_warps, c.num_stages)
        for c in kernels.shipped_configs()
    }
    block_d = triton.next_power_of_2(head_dim)
    for pass_name in ("fwd", "bwd_dq", "bwd_dkdv"):
        for arch in (80, 90):
            tiles = kernels._select_config(pass_name, dtype, head_dim, arch)
            constexprs = {
                "BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n, "BLOCK_D": block_d,
                "EVEN_D": head_dim == block_d, "DOT_PRECISION": kernels._dot_precision(dtype),
            }
            key = (pass_name, arch, "*" + kernels._DTYPE_NAMES[dtype],
                   tuple(sorted(constexprs.items())), tiles.num_warps, tiles.num_stages)
            assert key in shipped


def test_unsupported_head_dim_is_rejected():
    with pytest.raises(ValueError, match="head dims"):
        kernels._select_config("fwd", torch.float16, 16, 80)
    with pytest.raises(ValueError, match="head dims"):
        kernels._select_config("fwd", torch.float16, 320, 90)
