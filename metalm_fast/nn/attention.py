"""SpanSelfAttention: fused qkv projection, rotary, span attention, output projection."""

from __future__ import annotations

import torch
from torch import nn

from metalm_fast.masks import SpanMask
from metalm_fast.nn.inference import (
    INFERENCE_CHUNK_ROWS,
    chunk_rows,
    linear_into,
    linear_into_serves,
)
from metalm_fast.nn.kv_cache_attention import cached_attention
from metalm_fast.nn.linear import DecodeLinear
from metalm_fast.nn.paged_kv_cache import CacheStep, PagedKVCache
from metalm_fast.nn.rotary import RotaryEmbedding
from metalm_fast.ops.rotary import apply_rotary_
from metalm_fast.ops.span_attention import span_attention

__all__ = ["SpanSelfAttention"]


class SpanSelfAttention(nn.Module):
    """Multi-head (GQA) self-attention over packed tokens with a SpanMask.

    Parameters
    ----------
    dim : model width Dm.
    num_heads : query heads Hq.
    num_kv_heads : key/value heads Hkv (default Hq); Hq must be a multiple of it.
    head_dim : D (default ``dim // num_heads``).
    rotary : apply rotary position embedding to q and k (needs ``positions``): True
        (every dim of each head, base ``rotary_base``), False, or a
        :class:`~metalm_fast.nn.rotary.RotaryEmbedding` (partial, scaled).
    qkv_bias, out_bias : bias in the qkv and in the output projection.
    backend : span_attention backend ("auto" by default).

    Shapes: ``forward(x [T, Dm], mask, positions int [T] | None) -> [T, Dm]``.
    q, k and v are views into one fused projection, so without rotary the
    kernel reads them strided from the [T, (Hq + 2 Hkv) D] buffer, uncopied.

    ``query_rows`` (int64 [R]): only these rows' outputs are computed ([R, Dm]);
    every row still serves as a key and value (and reaches the cache). A
    prefill passes each prompt's last position in the last layer, the only rows
    the LM head reads.

    With a paged KV cache (generation): ``forward(x [T_new, Dm], mask | None,
    cache=cache, layer_idx=i, step=step)`` where ``step = cache.step(seq_ids,
    num_new_tokens)`` is built once per forward pass and shared by all layers.
    The new tokens' keys and values are appended to layer ``i``'s pages and
    the tokens attend to their whole cached prefix (see
    metalm_fast.nn.kv_cache_attention); positions default to ``step.positions``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        rotary: bool | RotaryEmbedding = True,
        rotary_base: float = 10000.0,
        qkv_bias: bool = False,
        out_bias: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
            head_dim = dim // num_heads
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.backend = backend
        self.qkv = DecodeLinear(dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=qkv_bias)
        self.out = DecodeLinear(num_heads * head_dim, dim, bias=out_bias)
        if rotary is True:
            rotary = RotaryEmbedding(head_dim, rotary_base)
        elif isinstance(rotary, RotaryEmbedding) and rotary.head_dim != head_dim:
            raise ValueError(f"rotary is for head_dim {rotary.head_dim}, not {head_dim}")
        self.rotary = rotary if isinstance(rotary, RotaryEmbedding) else None

    def project_qkv(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        rotary_memo: dict | None = None,
    ):
        """x [T, Dm] -> q [T, Hq, D], k and v [T, Hkv, D] (rotary applied to q and k).

        ``rotary_memo``: see :meth:`RotaryEmbedding.rotate_pair` (cos/sin shared by layers).
        """
        if self.rotary is not None and positions is None:
            raise ValueError("positions (int [T]) are required when rotary=True")
        if self._projects_in_chunks(x):
            return self._split(self._project_in_chunks(x, positions, rotary_memo))
        q, k, v = self._split(self.qkv(x))
        if self.rotary is not None:
            q, k = self.rotary.rotate_pair(q, k, positions, rotary_memo)
        return q, k, v

    def _split(self, fused: torch.Tensor):
        """Views q [T, Hq, D], k and v [T, Hkv, D] of the fused projection [T, (Hq + 2 Hkv) D]."""
        tokens = fused.shape[0]
        q_width = self.num_heads * self.head_dim
        kv_width = self.num_kv_heads * self.head_dim
        q = fused[:, :q_width].view(tokens, self.num_heads, self.head_dim)
        k = fused[:, q_width : q_width + kv_width].view(tokens, self.num_kv_heads, self.head_dim)
        v = fused[:, q_width + kv_width :].view(tokens, self.num_kv_heads, self.head_dim)
        return q, k, v

    # ------------------------------------------------------------------ inference prefill
    # Without autograd on CPU, where the projection would be F.linear (a prefill: more
    # rows than DecodeLinear's kernel takes; see linear_into_serves), it runs in equal
    # chunks of at most INFERENCE_CHUNK_ROWS rows, and each chunk's q and k are rotated
    # in place while the chunk is in cache: rotating the whole [T, Hq, D] q afterwards
    # read it back from memory and wrote a fresh tensor, which made the rotations cost
    # a sizeable share of the projection. Each chunk is F.linear's own addmm / mm and
    # the rotation the same kernel, so the values are the module path's up to the
    # rounding of the matmul kernel the BLAS picks for a row count (bit for bit in the
    # measured prefills).
    INFERENCE_CHUNK_ROWS = INFERENCE_CHUNK_ROWS

    def _projects_in_chunks(self, x: torch.Tensor) -> bool:
        return (
            self.rotary is not None
            and x.dim() == 2
            and x.is_cpu
            and linear_into_serves(self.qkv, x)
        )

    def _project_in_chunks(
        self, x: torch.Tensor, positions: torch.Tensor, rotary_memo: dict | None
    ) -> torch.Tensor:
        weight, bias = self.qkv.weight, self.qkv.bias
        compute = torch.promote_types(x.dtype, torch.float32)
        cos, signed_sin = self.rotary.tables(positions, compute, rotary_memo)
        tokens = x.shape[0]
        rows = chunk_rows(tokens, self.INFERENCE_CHUNK_ROWS)
        fused = x.new_empty(tokens, weight.shape[0])
        for start in range(0, tokens, rows):
            end = min(start + rows, tokens)
            chunk = fused[start:end]
            linear_into(x[start:end], weight, bias, chunk)
            q, k, _ = self._split(chunk)
            rotated = self.rotary.rotary_dim  # GPT-NeoX turns the leading dims only
            apply_rotary_(q[..., :rotated], cos[start:end], signed_sin[start:end])
            apply_rotary_(k[..., :rotated], cos[start:end], signed_sin[start:end])
        return fused

    def forward(
        self,
        x: torch.Tensor,
        mask: SpanMask | None = None,
        positions: torch.Tensor | None = None,
        *,
        cache: PagedKVCache | None = None,
        layer_idx: int | None = None,
        step: CacheStep | None = None,
        query_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if cache is None:
            if mask is None:
                raise ValueError("mask is required when no cache is given")
            q, k, v = self.project_qkv(x, positions)
            if query_rows is not None:
                mask = mask.select_queries(query_rows)  # checks the rows first
                q = q[query_rows]
            attended = span_attention(q, k, v, mask, backend=self.backend)
        else:
            if step is None or layer_idx is None:
                raise ValueError("with a cache, step (cache.step(...)) and layer_idx are required")
            # With the step's positions, cos/sin are computed once per step, not per layer.
            if positions is None:
                q, k, v = self.project_qkv(x, step.positions, step.memo)
            else:
                q, k, v = self.project_qkv(x, positions)
            attended = cached_attention(
                q,
                k,
                v,
                cache=cache,
                layer_idx=layer_idx,
                step=step,
                mask=mask,
                backend=self.backend,
                query_rows=query_rows,
            )
        return self.out(attended.reshape(attended.shape[0], self.num_heads * self.head_dim))
