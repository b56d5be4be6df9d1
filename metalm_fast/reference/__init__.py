"""The oracle: every op in plain PyTorch with dense masks, in any dtype.

Nothing here is fast; everything here is obviously right. Tests compare the
kernels against these functions run in float64 (the golden) and in the test
dtype (the baseline), as docs/ARCHITECTURE.md's correctness policy describes.
Autograd through these functions gives the reference gradients; they are
written so that queries with an empty interval get output 0, lse -inf and
zero gradients, with no NaN anywhere. One module per op:

- ``attention``: span_attention and its explicit backward;
- ``cross_entropy``: fused_linear_cross_entropy and its explicit gradients;
- ``embedding``: embed_scatter;
- ``paged_cache``: kv_cache_append, gather_paged_kv, paged_decode_attention.
"""

from metalm_fast.reference.attention import span_attention, span_attention_backward
from metalm_fast.reference.cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_grads,
)
from metalm_fast.reference.embedding import embed_scatter
from metalm_fast.reference.paged_cache import (
    gather_paged_kv,
    kv_cache_append,
    paged_decode_attention,
)

__all__ = [
    "embed_scatter",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_grads",
    "gather_paged_kv",
    "kv_cache_append",
    "paged_decode_attention",
    "span_attention",
    "span_attention_backward",
]
