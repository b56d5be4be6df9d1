"""TransformerBlock: one pre-norm block, ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

Attention is :class:`~metalm_fast.nn.attention.SpanSelfAttention` (fused qkv,
rotary over packed positions, any SpanMask), the feed-forward
:class:`~metalm_fast.nn.mlp.MLP`. A decode step through a paged KV cache runs as
one fused C++ call where that computes exactly what the modules would
(:func:`metalm_fast.nn.fused_decode.fused_decode_block`).
"""

from __future__ import annotations

import torch
from torch import nn

from metalm_fast.masks import SpanMask
from metalm_fast.nn.attention import SpanSelfAttention
from metalm_fast.nn.fused_decode import fused_decode_block
from metalm_fast.nn.mlp import MLP
from metalm_fast.nn.paged_kv_cache import CacheStep, PagedKVCache

__all__ = ["TransformerBlock"]


class TransformerBlock(nn.Module):
    """``forward(x [T, Dm], mask, positions [T] | None) -> [T, Dm]``; with a cache, as
    :class:`~metalm_fast.nn.attention.SpanSelfAttention` (``cache``, ``layer_idx``,
    ``step``); ``query_rows``: only these rows' outputs ([R, Dm]).

    Example
    -------
    >>> import torch
    >>> from metalm_fast.masks import SpanMask
    >>> block = TransformerBlock(32, num_heads=2, num_kv_heads=1, mlp_ratio=2.0,
    ...                          mlp_kind="gelu", backend="reference")
    >>> cu = torch.tensor([0, 3, 7])
    >>> positions = torch.tensor([0, 1, 2, 0, 1, 2, 3])
    >>> block(torch.randn(7, 32), SpanMask.causal(cu), positions).shape
    torch.Size([7, 32])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        mlp_ratio: float,
        mlp_kind: str,
        backend: str,
        rotary: bool = True,
    ):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = SpanSelfAttention(
            dim, num_heads, num_kv_heads, rotary=rotary, backend=backend
        )
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), mlp_kind)

    def forward(
        self,
        x: torch.Tensor,
        mask: SpanMask | None,
        positions: torch.Tensor | None,
        *,
        cache: PagedKVCache | None = None,
        layer_idx: int | None = None,
        step: CacheStep | None = None,
        query_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (
            cache is not None
            and step is not None
            and step.is_decode
            and mask is None
            and positions is None
            and query_rows is None
        ):
            fused = fused_decode_block(self, x, cache, layer_idx, step)
            if fused is not None:  # None: the modules below run (see nn/fused_decode.py)
                return fused
        attended = self.attention(
            self.attention_norm(x),
            mask,
            positions,
            cache=cache,
            layer_idx=layer_idx,
            step=step,
            query_rows=query_rows,
        )
        x = (x if query_rows is None else x[query_rows]) + attended
        return x + self.mlp(self.mlp_norm(x))
