"""MLP: the inference path (row chunks, in-place activation) against the autograd path."""

import pytest
import torch

from metalm_fast.nn import MLP


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
@pytest.mark.parametrize("rows", [1, 5, 12, 13])  # one chunk, several, a partial last chunk
def test_inference_chunks_match_one_pass(kind, rows):
    torch.manual_seed(0)
    mlp = MLP(16, 40, kind)
    mlp.INFERENCE_CHUNK_ROWS = 4
    x = torch.randn(rows, 16)
    expected = mlp(x)  # autograd on: one pass, out-of-place activation
    with torch.no_grad():
        chunked = mlp(x)
    with torch.inference_mode():
        in_inference_mode = mlp(x)
    assert chunked.shape == (rows, 16)
    torch.testing.assert_close(chunked, expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(in_inference_mode, expected.detach(), rtol=1e-6, atol=1e-6)


def test_inference_leaves_input_untouched():
    mlp = MLP(8, 16)
    mlp.INFERENCE_CHUNK_ROWS = 2
    x = torch.randn(5, 8)
    before = x.clone()
    with torch.no_grad():
        mlp(x)
    assert torch.equal(x, before)


def test_autograd_path_still_differentiable():
    mlp = MLP(8, 16)
    x = torch.randn(6, 8, requires_grad=True)
    mlp(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert mlp.up.weight.grad is not None


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
@pytest.mark.parametrize("bias", [True, False])
def test_inference_chunks_write_their_rows_in_place(kind, bias):
    """Chunks of more than DECODE_ROWS rows: each chunk's down projection is F.linear's
    addmm / mm written into its rows of the output (equal chunks of 40 rows)."""
    torch.manual_seed(1)
    mlp = MLP(16, 40, kind)
    if not bias:
        mlp.down.bias = None
    mlp.INFERENCE_CHUNK_ROWS = 40
    x = torch.randn(120, 16)
    expected = mlp(x).detach()  # autograd on: one pass
    with torch.no_grad():
        chunked = mlp(x)
    torch.testing.assert_close(chunked, expected, rtol=1e-6, atol=1e-6)


def test_inference_chunks_call_a_hooked_down_projection():
    mlp = MLP(16, 40)
    mlp.INFERENCE_CHUNK_ROWS = 40
    seen = []
    mlp.down.register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
    with torch.no_grad():
        out = mlp(torch.randn(100, 16))
    assert seen == [34, 34, 32] and out.shape == (100, 16)  # ceil(100 / 3) rows a chunk
