"""Connectors and EmbeddingScatter: shapes, gradient flow, resampler vs unpacked reference."""

import math

import pytest
import torch

from metalm_fast.nn import Connector, EmbeddingScatter


@pytest.mark.parametrize("kind, rows", [("linear", 11), ("mlp", 11), ("resampler", 3 * 4)])
def test_connector_shapes_and_gradients(kind, rows):
    torch.manual_seed(0)
    connector = Connector(
        kind, 24, 32, num_layers=3, num_latents=4, num_heads=2, backend="reference"
    )
    x = torch.randn(11, 24, requires_grad=True)
    cu = torch.tensor([0, 5, 5, 11])  # includes an empty item
    out = connector(x, cu)
    assert out.shape == (rows, 32)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in connector.parameters())


def test_mlp_has_requested_linear_layers():
    connector = Connector("mlp", 8, 16, num_layers=3)
    assert sum(isinstance(m, torch.nn.Linear) for m in connector.modules()) == 3


def test_resampler_matches_unpacked_per_item_reference():
    torch.manual_seed(0)
    connector = Connector("resampler", 12, 32, num_latents=3, num_heads=2, backend="reference")
    body = connector.body
    lengths = [4, 1, 7]
    x = torch.randn(sum(lengths), 12)
    cu = torch.tensor([0, 4, 5, 12])
    packed = connector(x, cu)
    expected = []
    queries = body.q_proj(body.latents).view(3, 2, 16)  # [L, H, D]
    for b in range(3):
        item = body.kv_proj(body.norm(x[cu[b] : cu[b + 1]])).view(-1, 2, 2, 16)
        keys, values = item[:, 0], item[:, 1]  # [n, H, D]
        scores = torch.einsum("lhd,nhd->hln", queries, keys) / math.sqrt(16)
        attended = torch.einsum("hln,nhd->lhd", scores.softmax(-1), values)
        expected.append(body.out_proj(attended.reshape(3, 32)))
    torch.testing.assert_close(packed, torch.cat(expected))


def test_resampler_needs_cu_seqlens_and_unknown_kind():
    with pytest.raises(ValueError, match="needs cu_seqlens"):
        Connector("resampler", 8, 8, num_latents=2, num_heads=2)(torch.randn(3, 8))
    with pytest.raises(ValueError, match="kind must be one of"):
        Connector("conv", 8, 8)


def test_embedding_scatter_module_with_tied_head():
    torch.manual_seed(0)
    embedding = EmbeddingScatter(40, 16, padding_idx=0, scale=4.0, backend="reference")
    assert torch.all(embedding.weight[0] == 0)
    head = torch.nn.Linear(16, 40, bias=False)
    head.weight = embedding.weight  # tied input and output embeddings
    ids = torch.tensor([0, 5, 6, 5, 9])
    features = torch.randn(2, 16, requires_grad=True)
    feature_index = torch.tensor([-1, 0, -1, 1, -1])
    out = embedding(ids, features, feature_index)
    assert torch.equal(out[1], features[0].detach()) and torch.equal(
        out[2], embedding.weight[6] * 4
    )
    head(out).sum().backward()
    assert features.grad.abs().sum() > 0
    plain = embedding(ids)
    assert torch.equal(plain, embedding.weight[ids] * 4)
    with pytest.raises(ValueError, match="given together"):
        embedding(ids, features)


# ----------------------------------------------------------------------------- not integers
@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: Connector("mlp", 8, 16, num_layers=True), TypeError, "num_layers must be an int"),
        (lambda: Connector("mlp", 8, 16, num_layers=2.0), TypeError, "num_layers must be an int"),
        (lambda: Connector("resampler", 8, 16, num_latents=True), TypeError, "num_latents"),
        (lambda: Connector("resampler", 8, 16, num_heads=2.0), TypeError, "num_heads"),
        (lambda: EmbeddingScatter(10, 4, padding_idx=True), TypeError, "padding_idx"),
        (lambda: EmbeddingScatter(10, 4, padding_idx=1.0), TypeError, "padding_idx"),
        (lambda: EmbeddingScatter(True, 4), TypeError, "num_embeddings"),
        (lambda: EmbeddingScatter(10, 4.0), TypeError, "dim"),
        (lambda: EmbeddingScatter(10, 4, padding_idx=10), ValueError, "padding_idx"),
    ],
)
def test_counts_and_indices_must_be_real_ints(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_resampler_offsets_are_integers_spanning_x():
    connector = Connector("resampler", 8, 32, num_latents=2, num_heads=2, backend="reference")
    x = torch.randn(5, 8)
    for cu, error, match in [
        (torch.tensor([0.0, 2.7, 5.0]), TypeError, "cu_seqlens must be an integer tensor"),
        (torch.tensor([False, True]), TypeError, "cu_seqlens must be an integer tensor"),
        (torch.tensor([1, 5]), ValueError, "from 0 to the 5 rows of x"),
        (torch.tensor([0, 3]), ValueError, "from 0 to the 5 rows of x"),
        (torch.tensor([0, 2**32 + 5]), ValueError, "from 0 to the 5 rows of x"),
    ]:
        with pytest.raises(error, match=match):
            connector(x, cu)
    assert connector(x, torch.tensor([0, 2, 5], dtype=torch.int32)).shape == (4, 32)
