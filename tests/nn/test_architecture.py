"""BlockArchitecture: refused fields, rotary frequencies, and the three block orders."""

from __future__ import annotations

import pytest
import torch

from metalm_fast.masks import SpanMask
from metalm_fast.nn import BlockArchitecture, PagedKVCache, RotaryEmbedding, TransformerBlock
from metalm_fast.nn.fused_decode import fused_decode_block

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"norm": "batchnorm"}, "norm"),
        ({"positions": "alibi"}, "positions"),
        ({"mlp_kind": "relu2"}, "mlp_kind"),
        ({"rotary_fraction": 0.0}, "rotary_fraction"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 2.0}}, "low_freq_factor"),
        ({"positions": "learned"}, "max_positions"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"post_norm": True, "parallel_residual": True}, "parallel_residual"),
    ],
)
def test_unimplemented_fields_are_refused_by_name(fields, named):
    with pytest.raises(ValueError, match=named):
        BlockArchitecture(**fields)


def test_llama3_frequencies_are_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=2,
        rope_parameters={**LLAMA3, "rope_theta": 10000.0},
    )
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = BlockArchitecture(rope_scaling=LLAMA3).inverse_frequencies(32)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-6, atol=0)
    # The scaling changes the long wavelengths: the test would see a missing scaling.
    assert not torch.allclose(ours, BlockArchitecture().inverse_frequencies(32))


def test_partial_rotary_turns_the_leading_dims_only():
    torch.manual_seed(0)
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    positions = torch.arange(5)
    partial = RotaryEmbedding(8, rotary_dim=4)
    whole = RotaryEmbedding(4)
    out = partial(x, positions)
    assert torch.equal(out[..., 4:], x[..., 4:])
    torch.testing.assert_close(out[..., :4], whole(x[..., :4].contiguous(), positions))


def _block(arch: BlockArchitecture, dim: int = 32) -> TransformerBlock:
    torch.manual_seed(0)
    block = TransformerBlock(dim, 2, 1, 24, arch, backend="reference").double()
    for parameter in block.parameters():  # norms away from identity, so their order shows
        torch.nn.init.normal_(parameter, std=0.3)
    return block


def _manual(block: TransformerBlock, x, mask, positions):
    arch, attention = block.architecture, block.attention
    if arch.post_norm:
        x = block.attention_norm(x + attention(x, mask, positions))
        return block.mlp_norm(x + block.mlp(x))
    attended = attention(block.attention_norm(x), mask, positions)
    if arch.parallel_residual:
        return x + attended + block.mlp(block.mlp_norm(x))
    x = x + attended
    return x + block.mlp(block.mlp_norm(x))


@pytest.mark.parametrize(
    "arch",
    [
        BlockArchitecture(),
        BlockArchitecture(norm="rmsnorm", mlp_kind="swiglu", mlp_bias=False),
        BlockArchitecture(parallel_residual=True, rotary_fraction=0.25, qkv_bias=True),
        BlockArchitecture(post_norm=True, positions="none", mlp_kind="gelu_tanh", out_bias=True),
        BlockArchitecture(mlp_kind="quick_gelu", norm_bias=False, norm_eps=1e-12),
    ],
    ids=["native", "llama", "neox", "bert", "clip"],
)
def test_block_orders_and_rows(arch):
    block = _block(arch)
    x = torch.randn(7, 32, dtype=torch.float64)
    cu = torch.tensor([0, 3, 7])
    positions = None if arch.positions == "none" else torch.tensor([0, 1, 2, 0, 1, 2, 3])
    mask = SpanMask.causal(cu)
    expected = _manual(block, x, mask, positions)
    torch.testing.assert_close(block(x, mask, positions), expected, rtol=0, atol=0)
    rows = torch.tensor([2, 6])
    torch.testing.assert_close(
        block(x, mask, positions, query_rows=rows), expected[rows], rtol=1e-12, atol=1e-12
    )


def test_fused_decode_steps_aside_for_post_norm_blocks():
    torch.manual_seed(0)
    block = TransformerBlock(32, 2, 1, 24, BlockArchitecture(post_norm=True)).eval()
    cache = PagedKVCache(1, 2, 4, 1, 16)
    step = cache.step([cache.allocate(1)], 1)
    with torch.no_grad():
        assert fused_decode_block(block, torch.randn(1, 32), cache, 0, step) is None


def test_stock_block_still_takes_the_fused_step():
    torch.manual_seed(0)
    block = TransformerBlock(32, 2, 1, 24).eval()
    cache = PagedKVCache(1, 2, 4, 1, 16)
    step = cache.step([cache.allocate(1)], 1)
    with torch.no_grad():
        assert fused_decode_block(block, torch.randn(1, 32), cache, 0, step) is not None
