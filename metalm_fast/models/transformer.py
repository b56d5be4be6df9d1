"""A pre-norm transformer over packed tokens: the body of every MetaLM stack.

Each block (:class:`metalm_fast.nn.TransformerBlock`) is ``x + attn(norm(x))``
then ``x + mlp(norm(x))``; attention is SpanSelfAttention (fused qkv, rotary
over packed positions, any SpanMask), so the same stack serves the causal
decoder (SpanMask.causal), the bidirectional encoders (SpanMask.bidirectional)
and the single-stack variant (SpanMask.semi_causal).
"""

from __future__ import annotations

import torch
from torch import nn

from metalm_fast.masks import SpanMask
from metalm_fast.nn.paged_kv_cache import CacheStep, PagedKVCache
from metalm_fast.nn.transformer_block import TransformerBlock

__all__ = ["TransformerStack"]


class TransformerStack(nn.Module):
    """``num_layers`` blocks and a final norm.

    ``forward(x [T, Dm], mask, positions [T]) -> [T, Dm]``. ``rotary=False``
    (a ViT with learned position embeddings) makes ``positions`` optional.

    With a paged KV cache (generation): ``forward(x [T_new, Dm], mask | None,
    cache=cache, step=step)``, ``step = cache.step(seq_ids, num_new_tokens)``
    built once per pass and shared by every layer; layer ``i`` keeps its keys
    and values in the cache's layer ``i``, positions default to ``step.positions``
    and ``mask`` (over the new tokens) is needed only for a prefill that is not
    causal (see metalm_fast.nn.kv_cache_attention).

    ``output_rows`` (int64 [R]): return only these rows ([R, Dm]). Every layer
    but the last runs on all rows (they are the next layer's keys and values);
    the last layer attends, and runs its MLP and the final norm, for these rows
    only: in a prefill, the last position of each prompt, the only rows the LM
    head reads (llama.cpp prunes its last layer the same way). The same math:
    each row's output depends only on its own query and on the keys and values.
    """

    def __init__(
        self,
        dim: int,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        mlp_ratio: float = 4.0,
        mlp_kind: str = "gelu",
        rotary: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.num_kv_heads, self.head_dim = num_kv_heads, dim // num_heads
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, num_kv_heads, mlp_ratio, mlp_kind, backend, rotary)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        mask: SpanMask | None = None,
        positions: torch.Tensor | None = None,
        *,
        cache: PagedKVCache | None = None,
        step: CacheStep | None = None,
        output_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        last = len(self.blocks) - 1
        for layer_idx, block in enumerate(self.blocks):  # layer_idx, step: used with a cache
            rows = output_rows if layer_idx == last else None
            x = block(
                x, mask, positions, cache=cache, layer_idx=layer_idx, step=step, query_rows=rows
            )
        if output_rows is not None and not self.blocks:
            x = x[output_rows]
        return self.norm(x)
