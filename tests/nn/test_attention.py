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


@pytest.mark.parametrize("rotary_dim", [16, 4])  # the whole head, GPT-NeoX's quarter
@pytest.mark.parametrize("tokens, chunk_rows", [(100, 33), (3000, 1024), (2049, 1024)])
def test_inference_projection_in_chunks_matches_the_module_path(tokens, chunk_rows, rotary_dim):
    """Without autograd the projection runs in equal row chunks, q and k rotated in place:
    the module path's values (the BLAS may round a chunk's rows differently: a tight
    tolerance, equal bit for bit on the measured machines)."""
    torch.manual_seed(1)
    rotary = RotaryEmbedding(16, rotary_dim=rotary_dim)
    attention = SpanSelfAttention(64, num_heads=4, num_kv_heads=2, rotary=rotary)
    attention.INFERENCE_CHUNK_ROWS = chunk_rows
    x = torch.randn(tokens, 64)
    positions = packed_positions(torch.tensor([0, tokens // 3, tokens]))
    with torch.no_grad():
        assert attention._projects_in_chunks(x)
        chunked = attention.project_qkv(x, positions)
    module_path = attention.project_qkv(x, positions)  # autograd on: the modules
    for got, want in zip(chunked, module_path, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)


def test_inference_projection_runs_the_module_when_hooked_or_short():
    attention = SpanSelfAttention(64, num_heads=4, num_kv_heads=2)
    x = torch.randn(200, 64)
    seen = []
    handle = attention.qkv.register_forward_hook(lambda module, args, out: seen.append(1))
    with torch.no_grad():
        assert not attention._projects_in_chunks(x)
        attention.project_qkv(x, torch.arange(200))
    handle.remove()
    assert seen == [1]
    with torch.no_grad():
        assert attention._projects_in_chunks(x)
        assert not attention._projects_in_chunks(x[:32])  # decode rows: DecodeLinear's kernel
    assert not SpanSelfAttention(64, 4, rotary=False)._projects_in_chunks(x)
