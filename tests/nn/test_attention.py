"""SpanSelfAttention and rotary embedding over packed positions."""

import warnings

import pytest
import torch

from metalm_fast import SpanMask, reference
from metalm_fast.nn import RotaryEmbedding, SpanSelfAttention, packed_positions


def test_packed_positions_restart_per_sequence():
    assert packed_positions(torch.tensor([0, 3, 3, 5])).tolist() == [0, 1, 2, 0, 1]


def test_rotary_is_relative():
    """q(m) . k(n) after rotation depends only on m - n."""
    rotary = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 16, dtype=torch.float64)
    rotary = rotary.double()

    def score(m, n):
        qm = rotary(q.float(), torch.tensor([m])).double()
        kn = rotary(k.float(), torch.tensor([n])).double()
        return float((qm * kn).sum())

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)


def test_module_matches_manual_composition():
    torch.manual_seed(0)
    cu = torch.tensor([0, 7, 7, 19])
    mask = SpanMask.semi_causal(cu, [2, 10], [5, 15])
    positions = packed_positions(cu)
    attention = SpanSelfAttention(64, num_heads=4, num_kv_heads=2, backend="reference")
    x = torch.randn(19, 64)
    q, k, v = attention.project_qkv(x, positions)
    assert q.shape == (19, 4, 16) and k.shape == (19, 2, 16) and not v.is_contiguous()
    expected = attention.out(reference.span_attention(q, k, v, mask)[0].reshape(19, 64))
    torch.testing.assert_close(attention(x, mask, positions), expected)


def test_rotary_needs_positions():
    attention = SpanSelfAttention(32, num_heads=2, backend="reference")
    with pytest.raises(ValueError, match="positions"):
        attention(torch.randn(4, 32), SpanMask.causal(torch.tensor([0, 4])))


def test_heads_not_divisible():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        SpanSelfAttention(64, num_heads=4, num_kv_heads=3)


def test_torch_compile_fullgraph_matches_eager():
    """The custom op traces with no graph break; compiled forward and backward match eager."""
    torch.manual_seed(0)
    cu = torch.tensor([0, 40, 41, 90])
    mask = SpanMask.semi_causal(cu, [5, 50], [20, 70])
    positions = packed_positions(cu)
    attention = SpanSelfAttention(64, num_heads=4, num_kv_heads=2)  # backend "auto"
    x = torch.randn(90, 64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # auto may warn when _C is not built
        eager = attention(x, mask, positions)
        (grad_eager,) = torch.autograd.grad(eager.sum(), x)
        compiled = torch.compile(attention, fullgraph=True)
        out = compiled(x, mask, positions)
        (grad_compiled,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad_compiled, grad_eager)
