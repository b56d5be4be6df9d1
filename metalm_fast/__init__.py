"""metalm-fast: fast, exact kernels for MetaLM-style encoder-connector-decoder models.

Public API (see ../shared/DESIGN.md):

    SpanMask            the interval attention mask over packed tokens
    span_attention      fused span-masked attention, forward and backward
    embed_scatter       token embeddings with encoder features scattered in, one pass

Compiled extensions (metalm_fast._C, metalm_fast._cuda) and Triton are loaded
lazily, so this import never fails because a build is missing.
"""

from metalm_fast.masks import SpanMask
from metalm_fast.ops.embed_scatter import embed_scatter
from metalm_fast.ops.span_attention import span_attention

__all__ = ["SpanMask", "span_attention", "embed_scatter"]
__version__ = "0.1.0"
