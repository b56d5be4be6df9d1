"""TransformerBlock: one block of any architecture a BlockArchitecture describes.

Pre-norm (the default): ``x + attn(norm(x))`` then ``x + mlp(norm(x))``;
post-norm (BERT): ``norm(x + attn(x))`` then ``norm(x + mlp(x))``; parallel
residual (GPT-NeoX): ``x + attn(norm1(x)) + mlp(norm2(x))``. Attention is
:class:`~metalm_fast.nn.attention.SpanSelfAttention` (fused qkv, rotary over
packed positions, any SpanMask), the feed-forward
:class:`~metalm_fast.nn.mlp.MLP`. A decode step through a paged KV cache runs as
one fused C++ call where that computes exactly what the modules would
(:func:`metalm_fast.nn.fused_decode.fused_decode_block`).
"""

from __future__ import annotations

import torch
from torch import nn

from metalm_fast.masks import SpanMask
from metalm_fast.nn.architecture import BlockArchitecture, make_norm
from metalm_fast.nn.attention import SpanSelfAttention
from metalm_fast.nn.fused_decode import fused_decode_block
from metalm_fast.nn.mlp import MLP
from metalm_fast.nn.paged_kv_cache import CacheStep, PagedKVCache
from metalm_fast.nn.rotary import RotaryEmbedding

__all__ = ["TransformerBlock"]


class TransformerBlock(nn.Module):
    """``forward(x [T, Dm], mask, positions [T] | None) -> [T, Dm]``; with a cache, as
    :class:`~metalm_fast.nn.attention.SpanSelfAttention` (``cache``, ``layer_idx``,
    ``step``); ``query_rows``: only these rows' outputs ([R, Dm]).

    Example
    -------
    >>> import torch
    >>> from metalm_fast.masks import SpanMask
    >>> block = TransformerBlock(32, num_heads=2, num_kv_heads=1, mlp_hidden=64,
    ...                          backend="reference")
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
        mlp_hidden: int,
        architecture: BlockArchitecture | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        arch = BlockArchitecture() if architecture is None else architecture
        self.architecture = arch
        head_dim = arch.head_dim or dim // num_heads
        rotary = False
        if arch.rotary:
            rotary = RotaryEmbedding(
                head_dim,
                arch.rotary_base,
                rotary_dim=arch.rotary_dim(head_dim),
                inv_freq=arch.inverse_frequencies(head_dim),
            )
        self.attention_norm = make_norm(arch, dim)
        self.attention = SpanSelfAttention(
            dim,
            num_heads,
            num_kv_heads,
            arch.head_dim,
            rotary=rotary,
            qkv_bias=arch.qkv_bias,
            out_bias=arch.out_bias,
            backend=backend,
        )
        self.mlp_norm = make_norm(arch, dim)
        self.mlp = MLP(dim, mlp_hidden, arch.mlp_kind, bias=arch.mlp_bias)

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
        arch = self.architecture
        attend = dict(cache=cache, layer_idx=layer_idx, step=step, query_rows=query_rows)
        if arch.post_norm:
            attended = self.attention(x, mask, positions, **attend)
            x = self.attention_norm(self._rows(x, query_rows) + attended)
            return self.mlp_norm(x + self.mlp(x))
        attended = self.attention(self.attention_norm(x), mask, positions, **attend)
        rows = self._rows(x, query_rows)  # after attention, which checks query_rows
        if arch.parallel_residual:
            return rows + attended + self.mlp(self.mlp_norm(rows))
        x = rows + attended
        return x + self.mlp(self.mlp_norm(x))

    @staticmethod
    def _rows(x: torch.Tensor, query_rows: torch.Tensor | None) -> torch.Tensor:
        return x if query_rows is None else x[query_rows]
