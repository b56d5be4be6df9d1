"""Thin modules over metalm_fast.ops: attention, MLP, transformer block, paged KV cache."""

from metalm_fast.nn.architecture import BlockArchitecture
from metalm_fast.nn.attention import SpanSelfAttention
from metalm_fast.nn.connector import Connector, LatentResampler
from metalm_fast.nn.embedding import EmbeddingScatter
from metalm_fast.nn.linear import DecodeLinear
from metalm_fast.nn.mlp import MLP
from metalm_fast.nn.paged_kv_cache import CacheStep, KVCacheFullError, PagedKVCache
from metalm_fast.nn.rotary import RotaryEmbedding, packed_positions
from metalm_fast.nn.transformer_block import TransformerBlock

__all__ = [
    "BlockArchitecture",
    "CacheStep",
    "Connector",
    "DecodeLinear",
    "EmbeddingScatter",
    "KVCacheFullError",
    "LatentResampler",
    "MLP",
    "PagedKVCache",
    "RotaryEmbedding",
    "SpanSelfAttention",
    "TransformerBlock",
    "packed_positions",
]
