"""Thin modules over metalm_fast.ops."""

from metalm_fast.nn.attention import SpanSelfAttention
from metalm_fast.nn.rotary import RotaryEmbedding, packed_positions

__all__ = ["SpanSelfAttention", "RotaryEmbedding", "packed_positions"]
