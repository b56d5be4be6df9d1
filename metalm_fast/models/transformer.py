"""A transformer over packed tokens: the body of every MetaLM stack.

Its blocks (:class:`metalm_fast.nn.TransformerBlock`) compute what a
:class:`~metalm_fast.nn.BlockArchitecture` says (by default pre-norm,
``x + attn(norm(x))`` then ``x + mlp(norm(x))``, rotary over packed positions);
attention is SpanSelfAttention over any SpanMask, so the same stack serves the
causal decoder (SpanMask.causal, or SpanMask.sliding_window), the bidirectional
encoders (SpanMask.bidirectional) and the single-stack variant
(SpanMask.semi_causal). With learned absolute positions (GPT-2) the stack adds
its position table to its input.
"""

from __future__ import annotations

import torch
from torch import nn

from metalm_fast.masks import SpanMask
from metalm_fast.nn.architecture import BlockArchitecture, make_norm
from metalm_fast.nn.paged_kv_cache import CacheStep, PagedKVCache
from metalm_fast.nn.transformer_block import TransformerBlock

__all__ = ["TransformerStack"]


class TransformerStack(nn.Module):
    """``num_layers`` blocks and a final norm.

    ``forward(x [T, Dm], mask, positions [T]) -> [T, Dm]``. An architecture with
    positions "none" (a ViT, BERT: their embeddings hold the positions) makes
    ``positions`` optional. ``mlp_hidden`` (default ``mlp_ratio * dim``): the MLP width.

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
        mlp_hidden: int | None = None,
        architecture: BlockArchitecture | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        arch = BlockArchitecture() if architecture is None else architecture
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.architecture = arch
        self.num_kv_heads, self.head_dim = num_kv_heads, arch.head_dim or dim // num_heads
        hidden = int(dim * mlp_ratio) if mlp_hidden is None else mlp_hidden
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, num_kv_heads, hidden, arch, backend)
            for _ in range(num_layers)
        )
        if arch.positions == "learned":
            self.position_embedding = nn.Embedding(arch.max_positions, dim)
        self.norm = make_norm(arch, dim) if arch.final_norm else nn.Identity()

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
        if self.architecture.positions == "learned":
            x = x + self._position_rows(
                positions if positions is not None or step is None else step.positions
            )
            positions = positions if step is None else None  # the blocks need none
        last = len(self.blocks) - 1
        for layer_idx, block in enumerate(self.blocks):  # layer_idx, step: used with a cache
            rows = output_rows if layer_idx == last else None
            x = block(
                x, mask, positions, cache=cache, layer_idx=layer_idx, step=step, query_rows=rows
            )
        if output_rows is not None and not self.blocks:
            x = x[output_rows]
        return self.norm(x)

    def _position_rows(self, positions: torch.Tensor | None) -> torch.Tensor:
        """The learned position table's rows for ``positions`` [T] (checked: in the table)."""
        if positions is None:
            raise ValueError("positions (int [T]) are required with learned positions")
        table = self.position_embedding.weight
        if positions.numel() and int(positions.max()) >= table.shape[0]:
            raise ValueError(
                f"positions reach {int(positions.max())} but the learned position table has "
                f"{table.shape[0]} rows (max_positions)"
            )
        return table[positions]
