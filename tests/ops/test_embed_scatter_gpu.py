"""embed_scatter on a real GPU: triton and cuda backends against the reference."""

import pytest
import torch

from metalm_fast import embed_scatter, reference
from metalm_fast.ops._backend import unavailable_reason

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_backends_match_reference(backend, dtype):
    reason = unavailable_reason(backend, torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    generator = torch.Generator().manual_seed(0)
    tokens, vocab, width = 1023, 97, 200
    ids = torch.randint(0, vocab, (tokens,), generator=generator).cuda()
    feature_index = torch.full((tokens,), -1)
    positions = torch.randperm(tokens, generator=generator)[:300]
    feature_index[positions] = torch.arange(300)
    feature_index = feature_index.cuda()
    weight = torch.randn(vocab, width, generator=generator).to(dtype).cuda().requires_grad_(True)
    features = torch.randn(300, width, generator=generator).to(dtype).cuda().requires_grad_(True)
    out = embed_scatter(
        ids, weight, features, feature_index, scale=2.0, padding_idx=3, backend=backend
    )
    assert torch.equal(
        out, reference.embed_scatter(ids, weight, features, feature_index, scale=2.0)
    )
    grad_out = torch.randn(tokens, width, generator=generator).to(dtype).cuda()
    out.backward(grad_out)
    is_token = feature_index < 0
    golden = torch.zeros(vocab, width, dtype=torch.float64, device="cuda")
    golden.index_add_(0, ids[is_token], grad_out[is_token].double() * 2.0)
    golden[3] = 0
    torch.testing.assert_close(weight.grad.double(), golden, rtol=1e-2, atol=1e-2)
    first = weight.grad.clone()
    weight.grad = None
    embed_scatter(
        ids, weight, features, feature_index, scale=2.0, padding_idx=3, backend=backend
    ).backward(grad_out)
    assert torch.equal(weight.grad, first)
