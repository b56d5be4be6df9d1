"""Attention with a paged KV cache: prefill, continued prefill, and cached generation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metalm_fast import PagedKVCache, SpanMask, reference
from metalm_fast.nn import SpanSelfAttention, packed_positions
from metalm_fast.nn.kv_cache_attention import cached_attention
from tests.paged_cases import require_backend

CPU_OPS = "_paged_decode_attention_cpu"


def _require(backend):
    require_backend(backend, CPU_OPS)
    require_backend(backend, "_kv_cache_append_cpu")


# ----------------------------------------------------------------------------- continued prefill
def _chunks(seed=0):
    generator = torch.Generator().manual_seed(seed)
    full = [torch.randn(n, 6, 32, generator=generator) for n in (14, 13)]  # q | k | v heads 2|2|2
    return full


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_continued_prefill_matches_full_sequence(backend):
    """Chunk 1 (prefill, semi-causal) then chunk 2 (with its own span): chunk 2's output
    equals the reference over whole sequences with the same spans."""
    _require(backend)
    first, second = [5, 9], [9, 4]
    qkv = _chunks()
    cache = PagedKVCache(1, num_blocks=16, block_size=4, num_kv_heads=2, head_dim=32)
    seqs = [cache.allocate(), cache.allocate()]

    def run_chunk(offsets, lengths, spans):
        rows = torch.cat([x[o : o + n] for x, o, n in zip(qkv, offsets, lengths)])
        q, k, v = rows[:, :2], rows[:, 2:4], rows[:, 4:]
        step = cache.step(seqs, lengths)
        mask = SpanMask.semi_causal(step.cu_seqlens, *spans)
        return cached_attention(
            q, k, v, cache=cache, layer_idx=0, step=step, mask=mask, backend=backend
        )

    run_chunk([0, 0], first, ([1], [3]))  # a span in sequence 0's first chunk
    out = run_chunk(first, second, ([11], [13]))  # packed chunk 2: seq 0 is 0..8, seq 1 9..12
    # The same spans over the whole sequences (seq 0: 0..13, seq 1: 14..26).
    full_rows = torch.cat(qkv)
    cu = torch.tensor([0, 14, 27])
    mask = SpanMask.semi_causal(cu, [1, 14 + 9 + 2], [3, 14 + 9 + 4])
    expected, _ = reference.span_attention(
        full_rows[:, :2], full_rows[:, 2:4], full_rows[:, 4:], mask
    )
    chunk_two = torch.cat([expected[5:14], expected[14 + 9 :]])
    torch.testing.assert_close(out, chunk_two, rtol=1e-5, atol=1e-5)


def test_continued_prefill_rejects_masks_that_hide_the_prefix():
    cache = PagedKVCache(1, num_blocks=8, block_size=4, num_kv_heads=1, head_dim=16)
    seq = cache.allocate()
    x = torch.randn(12, 3, 16)
    step = cache.step([seq], 6)
    cached_attention(
        x[:6, :1], x[:6, 1:2], x[:6, 2:], cache=cache, layer_idx=0, step=step, backend="reference"
    )
    step = cache.step([seq], 6)
    window = SpanMask.sliding_window(step.cu_seqlens, 2)
    with pytest.raises(ValueError, match="must start there"):
        cached_attention(
            x[6:, :1],
            x[6:, 1:2],
            x[6:, 2:],
            cache=cache,
            layer_idx=0,
            step=step,
            mask=window,
            backend="reference",
        )


def test_module_needs_step_and_mask():
    attention = SpanSelfAttention(32, num_heads=2, backend="reference")
    with pytest.raises(ValueError, match="mask is required"):
        attention(torch.randn(4, 32))
    cache = PagedKVCache(1, num_blocks=4, block_size=4, num_kv_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="step"):
        attention(torch.randn(4, 32), cache=cache, layer_idx=0)


# ----------------------------------------------------------------------------- tiny decoder
class _Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, backend):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = SpanSelfAttention(dim, heads, kv_heads, backend=backend)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))

    def forward(self, x, mask, positions, layer_idx, cache, step):
        x = x + self.attention(
            self.attention_norm(x), mask, positions, cache=cache, layer_idx=layer_idx, step=step
        )
        return x + self.mlp(self.mlp_norm(x))


class TinyDecoder(nn.Module):
    """Embedding, pre-norm blocks of SpanSelfAttention (rotary, GQA) + MLP, LM head."""

    def __init__(self, vocab=97, dim=64, heads=4, kv_heads=2, layers=2, backend="auto"):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, kv_heads, backend) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids, mask=None, positions=None, cache=None, step=None):
        x = self.embed(ids)
        for index, block in enumerate(self.blocks):
            x = block(x, mask, positions, index, cache, step)
        return self.head(self.norm(x))


def _next_tokens(logits, generator):
    if generator is None:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits / 0.8, -1), 1, generator=generator)[:, 0]


def _generate_recomputing(model, prompts, new_tokens, generator):
    sequences = [list(p) for p in prompts]
    for _ in range(new_tokens):
        cu = torch.tensor([0] + [len(s) for s in sequences]).cumsum(0)
        ids = torch.tensor([t for s in sequences for t in s])
        logits = model(ids, SpanMask.causal(cu), packed_positions(cu))
        for s, token in zip(sequences, _next_tokens(logits[cu[1:] - 1], generator).tolist()):
            s.append(token)
    return [s[len(p) :] for s, p in zip(sequences, prompts)]


def _generate_cached(model, prompts, new_tokens, generator, block_size):
    cache = PagedKVCache(
        len(model.blocks), num_blocks=64, block_size=block_size, num_kv_heads=2, head_dim=16
    )
    seqs = [cache.allocate() for _ in prompts]
    step = cache.step(seqs, [len(p) for p in prompts])
    logits = model(
        torch.tensor([t for p in prompts for t in p]),
        SpanMask.causal(step.cu_seqlens),
        cache=cache,
        step=step,
    )
    tokens = _next_tokens(logits[step.cu_seqlens[1:].long() - 1], generator)
    generated = [[t] for t in tokens.tolist()]
    for _ in range(new_tokens - 1):
        step = cache.step(seqs, 1)
        tokens = _next_tokens(model(tokens, cache=cache, step=step), generator)
        for g, token in zip(generated, tokens.tolist()):
            g.append(token)
    return generated


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("sampling", [False, True])
def test_generation_with_cache_matches_recomputing(backend, sampling):
    _require(backend)
    torch.manual_seed(0)
    model = TinyDecoder(backend=backend).eval()
    prompts = [[5, 17, 3, 88, 42, 7, 61], [9, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12]]

    def generator():
        return torch.Generator().manual_seed(1234) if sampling else None

    with torch.no_grad():
        expected = _generate_recomputing(model, prompts, 12, generator())
        cached = _generate_cached(model, prompts, 12, generator(), block_size=4)
    assert cached == expected


def test_generation_triton_backend_greedy():
    """The triton kernels (interpreter) inside the module: prefill, append, decode."""
    _require("triton")
    torch.manual_seed(0)
    model = TinyDecoder(layers=1, backend="triton").eval()
    prompts = [[5, 17, 3], [9, 1, 2, 3, 4]]
    with torch.no_grad():
        expected = _generate_recomputing(model, prompts, 4, None)
        cached = _generate_cached(model, prompts, 4, None, block_size=2)
    assert cached == expected
