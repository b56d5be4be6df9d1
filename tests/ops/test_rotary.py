"""apply_rotary: the fused CPU kernel against the rotate-half tensor expression (bit for
bit), its dispatch rule and its errors."""

from __future__ import annotations

import pytest
import torch

import metalm_fast.ops.rotary as rotary
from metalm_fast.nn.rotary import RotaryEmbedding
from metalm_fast.ops._backend import compiled_op_available
from metalm_fast.ops.rotary import apply_rotary


def require_kernel() -> None:
    if not compiled_op_available("_rotary_cpu"):
        pytest.skip("metalm_fast._C has no _rotary_cpu: rebuild it (pip install -e .)")


def expression(module, q, k, positions):
    """rotate_pair through the tensor expression (the kernel switched off)."""
    saved = rotary.uses_kernel
    rotary.uses_kernel = lambda x, cos, in_place=False: False
    try:
        return module.rotate_pair(q, k, positions)
    finally:
        rotary.uses_kernel = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "tokens, heads, kv_heads, head_dim",
    [(1, 1, 1, 2), (37, 8, 8, 32), (130, 6, 2, 64), (5, 4, 1, 128)],
)
def test_kernel_equals_the_expression_bit_for_bit(dtype, tokens, heads, kv_heads, head_dim):
    """q and k sliced from a fused projection (strided rows), packed positions."""
    require_kernel()
    generator = torch.Generator().manual_seed(tokens + head_dim)
    width = (heads + 2 * kv_heads) * head_dim
    fused = torch.randn(tokens, width, generator=generator, dtype=dtype) * 3
    q = fused[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = fused[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    positions = torch.randint(0, 5000, (tokens,), generator=generator)
    module = RotaryEmbedding(head_dim)
    with torch.no_grad():
        assert rotary.uses_kernel(q, torch.empty(0, dtype=dtype))
        got = module.rotate_pair(q, k, positions)
        want = expression(module, q, k, positions)
    for a, b in zip(got, want):
        assert a.is_contiguous() and torch.equal(a, b)


def test_autograd_and_other_dtypes_use_the_expression():
    require_kernel()
    table = torch.empty(0)
    x = torch.randn(4, 2, 8, requires_grad=True)
    assert not rotary.uses_kernel(x, table)  # the kernel has no backward
    with torch.no_grad():
        assert rotary.uses_kernel(x, table)
        assert not rotary.uses_kernel(x.half(), table)  # fp16 rows, fp32 tables
    out = RotaryEmbedding(8)(x, torch.arange(4))
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize(
    "x, cos, match",
    [
        (torch.randn(3, 2, 8), torch.randn(3, 1, 6), r"cos and signed_sin must be contiguous"),
        (torch.randn(3, 2, 8), torch.randn(3, 1, 8, dtype=torch.float64), "share a dtype"),
        (torch.randn(3, 8), torch.randn(3, 1, 8), r"x must be \[T, H, D\]"),
        (torch.randn(3, 2, 7), torch.randn(3, 1, 7), "must be even"),
    ],
)
def test_kernel_checks_name_the_argument(x, cos, match):
    require_kernel()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.metalm._rotary_cpu(x, cos, cos)


@pytest.mark.parametrize(
    "x_shape, table_shape, match",
    [
        ((3, 2), (3, 1, 2), r"x must be \[T, H, D\] with D even"),
        ((3, 2, 7), (3, 1, 7), r"x must be \[T, H, D\] with D even"),
        ((3, 2, 8), (3, 2, 8), r"cos must be \[T, 1, D\] = \[3, 1, 8\]"),
        ((3, 2, 8), (4, 1, 8), r"cos must be \[T, 1, D\]"),
    ],
)
def test_bad_shapes_name_the_argument(x_shape, table_shape, match):
    table = torch.zeros(table_shape)
    with pytest.raises(ValueError, match=match):
        apply_rotary(torch.zeros(x_shape), table, table)


def test_tables_must_share_a_dtype():
    with pytest.raises(ValueError, match="cos and signed_sin must share a dtype"):
        apply_rotary(
            torch.zeros(3, 2, 8), torch.zeros(3, 1, 8), torch.zeros(3, 1, 8, dtype=torch.float64)
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kernel", [True, False])
def test_in_place_equals_apply_rotary_and_touches_nothing_else(monkeypatch, dtype, kernel):
    """apply_rotary_ on q inside a fused projection: q becomes apply_rotary(q) bit for bit
    (the kernel, or the expression with the kernel off); k and v are untouched."""
    if kernel:
        require_kernel()
        if not compiled_op_available("_rotary_cpu_"):
            pytest.skip("metalm_fast._C has no _rotary_cpu_: rebuild it (pip install -e .)")
    else:
        monkeypatch.setattr(rotary, "uses_kernel", lambda x, cos, in_place=False: False)
    generator = torch.Generator().manual_seed(3)
    tokens, heads, kv_heads, head_dim = 37, 4, 2, 32
    fused = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator)
    fused = fused.to(dtype)
    q = fused[:, : heads * head_dim].view(tokens, heads, head_dim)
    compute = torch.promote_types(dtype, torch.float32)
    cos, signed_sin = RotaryEmbedding(head_dim).tables(torch.arange(tokens) * 7, compute)
    with torch.no_grad():
        # fp32 and fp64 rows in the tables' dtype take the kernel; bf16 the expression.
        assert rotary.uses_kernel(q, cos) == (kernel and dtype != torch.bfloat16)
        expected = apply_rotary(q, cos, signed_sin)
        rest = fused[:, heads * head_dim :].clone()
        assert rotary.apply_rotary_(q, cos, signed_sin) is q
    assert torch.equal(q, expected) and torch.equal(fused[:, heads * head_dim :], rest)


def test_in_place_kernel_refuses_overlapping_rows():
    require_kernel()
    x = torch.randn(1, 1, 8).expand(3, 2, 8)
    cos, signed_sin = RotaryEmbedding(8).tables(torch.arange(3), torch.float32)
    with pytest.raises(RuntimeError, match="share memory"):
        torch.ops.metalm._rotary_cpu_(x, cos, signed_sin)
