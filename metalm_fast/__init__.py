"""metalm-fast: fast, exact kernels for MetaLM-style encoder-connector-decoder models.

Public API (see docs/ARCHITECTURE.md):

    SpanMask            the interval attention mask over packed tokens
    span_attention      fused span-masked attention, forward and backward
    embed_scatter       token embeddings with encoder features scattered in, one pass
    PagedKVCache        a paged key/value pool for generation, with its allocator
    kv_cache_append     write new keys and values into their cache slots, in place
    paged_decode_attention  one query token per sequence over its cached pages
    decode_linear       the linear layers of a decode step (few rows, weight streamed)
    fused_linear_cross_entropy  the LM head's loss in row chunks, no [T, V] logits

Compiled extensions (metalm_fast._C, metalm_fast._cuda) and Triton are loaded
lazily, so this import never fails because a build is missing.
"""

from metalm_fast.masks import SpanMask
from metalm_fast.nn.paged_kv_cache import PagedKVCache
from metalm_fast.ops.decode_linear import decode_linear
from metalm_fast.ops.embed_scatter import embed_scatter
from metalm_fast.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from metalm_fast.ops.kv_cache_append import kv_cache_append
from metalm_fast.ops.paged_decode_attention import paged_decode_attention
from metalm_fast.ops.span_attention import span_attention

__all__ = [
    "SpanMask",
    "span_attention",
    "embed_scatter",
    "PagedKVCache",
    "kv_cache_append",
    "paged_decode_attention",
    "decode_linear",
    "fused_linear_cross_entropy",
]
__version__ = "0.1.0"
