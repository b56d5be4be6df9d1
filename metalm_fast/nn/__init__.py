"""Thin modules over metalm_fast.ops."""

from metalm_fast.nn.attention import SpanSelfAttention
from metalm_fast.nn.connector import Connector, LatentResampler
from metalm_fast.nn.embedding import EmbeddingScatter
from metalm_fast.nn.linear import DecodeLinear
from metalm_fast.nn.rotary import RotaryEmbedding, packed_positions

__all__ = [
    "Connector",
    "DecodeLinear",
    "EmbeddingScatter",
    "LatentResampler",
    "RotaryEmbedding",
    "SpanSelfAttention",
    "packed_positions",
]
