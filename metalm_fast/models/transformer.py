"""A pre-norm transformer over packed tokens: the body of every MetaLM stack.

Each block is ``x + attn(norm(x))`` then ``x + mlp(norm(x))``; attention is
:class:`SpanSelfAttention` (fused qkv, rotary over packed positions, any
SpanMask), so the same stack serves the causal decoder (SpanMask.causal), the
bidirectional encoders (SpanMask.bidirectional) and the single-stack variant
(SpanMask.semi_causal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metalm_fast.masks import SpanMask
from metalm_fast.models.fused_decode import fused_decode_block
from metalm_fast.nn._inference import chunk_rows, linear_into, linear_into_serves
from metalm_fast.nn.attention import SpanSelfAttention
from metalm_fast.nn.linear import DecodeLinear
from metalm_fast.ops.kv_cache import CacheStep, PagedKVCache

__all__ = ["MLP", "TransformerBlock", "TransformerStack"]


class MLP(nn.Module):
    """GELU (``Linear-GELU-Linear``) or SwiGLU (``W2(silu(W1 x) * W3 x)``) feed-forward.

    ``forward(x [T, dim]) -> [T, dim]``. Without autograd (inference), rows go
    through in equal chunks of at most :attr:`INFERENCE_CHUNK_ROWS` and the
    activation runs in place: a chunk's [rows, hidden] activation stays in cache
    and its memory is reused, where a whole prefill's would be a fresh [T, hidden]
    tensor (80 MB at T = 19 K) faulted in page by page. Rows are independent, so
    the result is the same as one pass, up to the rounding of the matmul kernel
    chosen for each row count.
    """

    INFERENCE_CHUNK_ROWS = 1024

    def __init__(self, dim: int, hidden: int, kind: str = "gelu"):
        super().__init__()
        if kind not in ("gelu", "swiglu"):
            raise ValueError(f"mlp kind must be 'gelu' or 'swiglu', got {kind!r}")
        self.kind = kind
        self.up = DecodeLinear(dim, 2 * hidden if kind == "swiglu" else hidden)
        self.down = DecodeLinear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.down(self._hidden(x, in_place=False))
        if x.dim() != 2 or x.shape[0] <= self.INFERENCE_CHUNK_ROWS:
            return self.down(self._hidden(x, in_place=True))
        # Each chunk's down projection is written into its rows of out.
        tokens = x.shape[0]
        rows = chunk_rows(tokens, self.INFERENCE_CHUNK_ROWS)
        out = x.new_empty(tokens, self.down.out_features)
        for start in range(0, tokens, rows):
            self._down_into(self._hidden(x[start : start + rows], in_place=True),
                            out[start : start + rows])
        return out

    def _hidden(self, x: torch.Tensor, *, in_place: bool) -> torch.Tensor:
        """The activation of the up projection; ``in_place``: it overwrites the projection
        (no autograd only)."""
        hidden = self.up(x)
        if self.kind == "swiglu":
            gate, value = hidden.chunk(2, dim=-1)
            return F.silu(gate, inplace=in_place) * value
        return torch.ops.aten.gelu_(hidden) if in_place else F.gelu(hidden)

    def _down_into(self, hidden: torch.Tensor, out: torch.Tensor) -> None:
        """out = self.down(hidden), written in place where that is F.linear's own addmm
        (a copy of the chunk's result was ~2 % of a small-preset prefill)."""
        down = self.down
        if linear_into_serves(down, hidden):
            linear_into(hidden, down.weight, down.bias, out)
        else:
            out.copy_(down(hidden))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, mlp_ratio: float,
                 mlp_kind: str, backend: str, rotary: bool = True):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = SpanSelfAttention(dim, num_heads, num_kv_heads, rotary=rotary,
                                           backend=backend)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), mlp_kind)

    def forward(self, x: torch.Tensor, mask: SpanMask | None, positions: torch.Tensor | None,
                *, cache: PagedKVCache | None = None, layer_idx: int | None = None,
                step: CacheStep | None = None, query_rows: torch.Tensor | None = None
                ) -> torch.Tensor:
        if cache is not None and step is not None and step.is_decode and mask is None \
                and positions is None and query_rows is None:
            fused = fused_decode_block(self, x, cache, layer_idx, step)
            if fused is not None:  # None: the modules below run (see models/fused_decode.py)
                return fused
        attended = self.attention(self.attention_norm(x), mask, positions, cache=cache,
                                  layer_idx=layer_idx, step=step, query_rows=query_rows)
        x = (x if query_rows is None else x[query_rows]) + attended
        return x + self.mlp(self.mlp_norm(x))


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

    def __init__(self, dim: int, num_layers: int, num_heads: int, num_kv_heads: int | None = None,
                 *, mlp_ratio: float = 4.0, mlp_kind: str = "gelu", rotary: bool = True,
                 backend: str = "auto"):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.num_kv_heads, self.head_dim = num_kv_heads, dim // num_heads
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, num_kv_heads, mlp_ratio, mlp_kind, backend, rotary)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: SpanMask | None = None,
                positions: torch.Tensor | None = None, *, cache: PagedKVCache | None = None,
                step: CacheStep | None = None, output_rows: torch.Tensor | None = None
                ) -> torch.Tensor:
        last = len(self.blocks) - 1
        for layer_idx, block in enumerate(self.blocks):  # layer_idx, step: used with a cache
            rows = output_rows if layer_idx == last else None
            x = block(x, mask, positions, cache=cache, layer_idx=layer_idx, step=step,
                      query_rows=rows)
        if output_rows is not None and not self.blocks:
            x = x[output_rows]
        return self.norm(x)
