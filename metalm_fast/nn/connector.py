"""Connectors: map encoder outputs to the decoder width.

Kinds (MetaLM, Hao et al. 2022, and Kosmos):

- ``"linear"``: one Linear (the paper's language connector);
- ``"mlp"``: ``num_layers`` Linear layers with GELU between them (the paper's
  vision connector has 3);
- ``"resampler"``: ``num_latents`` learned latent queries cross-attend to each
  item's encoder outputs (Kosmos' attentive pooling), giving a fixed number of
  rows per item. Items are packed: one ``span_attention`` call with an interval
  mask per item (latents of item b attend keys ``[cu[b], cu[b+1])``), so a batch
  of different-length items needs no padding.
"""

from __future__ import annotations

import torch
from torch import nn

from metalm_fast.masks import SpanMask
from metalm_fast.ops.span_attention import span_attention

__all__ = ["Connector", "LatentResampler"]


def _check_count(name: str, value, minimum: int) -> None:
    # isinstance(True, int) holds: a bool would pass as a layer, head or latent count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_item_offsets(cu_seqlens, num_rows: int) -> torch.Tensor:
    """cu_seqlens as int64 [B + 1]: an integer tensor from 0 to the number of rows of x.

    A float tensor would be truncated by ``.to(int64)``, a bool one read as 0/1,
    and offsets not spanning x would leave rows unread; all raise instead.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype == torch.bool or cu_seqlens.dtype.is_floating_point:
        raise TypeError(f"cu_seqlens must be an integer tensor, got dtype {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [B + 1], got shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.to(torch.int64)
    if int(cu[0]) != 0 or int(cu[-1]) != num_rows:
        raise ValueError(
            f"cu_seqlens must run from 0 to the {num_rows} rows of x, got "
            f"[{int(cu[0])}, ..., {int(cu[-1])}]"
        )
    return cu


def _mlp(in_dim: int, out_dim: int, num_layers: int) -> nn.Sequential:
    _check_count("num_layers", num_layers, 1)
    linears = [nn.Linear(in_dim, out_dim)] + [
        nn.Linear(out_dim, out_dim) for _ in range(num_layers - 1)
    ]
    layers: list[nn.Module] = [linears[0]]
    for linear in linears[1:]:
        layers += [nn.GELU(), linear]
    # PyTorch's default Linear init scales each layer's output variance by ~1/3
    # (and GELU halves it), so after 3 layers the constant bias outweighs the
    # signal: every image reached the decoder as nearly the same rows and the
    # tiny model's digit VQA stalled at the answer prior. He init (gain 2 before
    # a GELU, 1 for the last layer) with zero bias keeps the variance.
    for i, linear in enumerate(linears):
        gain = 2.0 if i + 1 < len(linears) else 1.0
        nn.init.normal_(linear.weight, std=(gain / linear.in_features) ** 0.5)
        nn.init.zeros_(linear.bias)
    return nn.Sequential(*layers)


class LatentResampler(nn.Module):
    """Learned latent queries cross-attending to packed items.

    ``forward(x [N, in_dim], cu_seqlens int [B + 1]) -> [B * num_latents, out_dim]``,
    rows ``b * num_latents ... (b + 1) * num_latents - 1`` belonging to item b.
    An item of length 0 yields zero attention output (then the output projection's bias).
    """

    def __init__(
        self, in_dim: int, out_dim: int, num_latents: int, num_heads: int, backend: str = "auto"
    ):
        super().__init__()
        _check_count("num_latents", num_latents, 1)
        _check_count("num_heads", num_heads, 1)
        if out_dim % num_heads:
            raise ValueError(f"out_dim ({out_dim}) must be divisible by num_heads ({num_heads})")
        self.num_latents, self.num_heads, self.backend = num_latents, num_heads, backend
        self.head_dim = out_dim // num_heads
        self.latents = nn.Parameter(torch.randn(num_latents, out_dim) * out_dim**-0.5)
        self.norm = nn.LayerNorm(in_dim)
        self.q_proj = nn.Linear(out_dim, out_dim, bias=False)
        self.kv_proj = nn.Linear(in_dim, 2 * out_dim, bias=False)
        self.out_proj = nn.Linear(out_dim, out_dim)

    def item_mask(self, cu_seqlens: torch.Tensor, num_keys: int | None = None) -> SpanMask:
        """Latent queries of item b attend keys [cu[b], cu[b + 1]).

        ``num_keys`` (the rows of x; default ``cu[-1]``) must be where cu ends.
        """
        if num_keys is None and isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.numel():
            num_keys = int(cu_seqlens[-1])
        cu = _check_item_offsets(cu_seqlens, num_keys)
        starts = cu[:-1].repeat_interleave(self.num_latents)
        ends = cu[1:].repeat_interleave(self.num_latents)
        return SpanMask.from_intervals(starts, ends, num_keys=int(cu[-1]))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        items = cu_seqlens.numel() - 1
        heads, head_dim = self.num_heads, self.head_dim
        queries = self.q_proj(self.latents).repeat(items, 1).view(-1, heads, head_dim)
        keys_values = self.kv_proj(self.norm(x)).view(x.shape[0], 2, heads, head_dim)
        attended = span_attention(
            queries,
            keys_values[:, 0],
            keys_values[:, 1],
            self.item_mask(cu_seqlens, x.shape[0]),
            backend=self.backend,
        )
        return self.out_proj(attended.reshape(items * self.num_latents, heads * head_dim))


class Connector(nn.Module):
    """Encoder width -> decoder width, of kind "linear", "mlp" or "resampler".

    ``forward(x [N, in_dim], cu_seqlens=None)``: linear and mlp map each row
    ([N, out_dim]); the resampler needs ``cu_seqlens`` of the packed items and
    returns ``num_latents`` rows per item ([B * num_latents, out_dim]).
    """

    KINDS = ("linear", "mlp", "resampler")

    def __init__(
        self,
        kind: str,
        in_dim: int,
        out_dim: int,
        *,
        num_layers: int = 3,
        num_latents: int = 64,
        num_heads: int = 8,
        backend: str = "auto",
    ):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        self.kind = kind
        if kind == "linear":
            self.body = nn.Linear(in_dim, out_dim)
        elif kind == "mlp":
            self.body = _mlp(in_dim, out_dim, num_layers)
        else:
            self.body = LatentResampler(in_dim, out_dim, num_latents, num_heads, backend)

    def rows_per_item(self, lengths: torch.Tensor) -> torch.Tensor:
        """How many feature rows each item of ``lengths`` becomes."""
        if self.kind == "resampler":
            return torch.full_like(lengths, self.body.num_latents)
        return lengths

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "resampler":
            if cu_seqlens is None:
                raise ValueError("the resampler connector needs cu_seqlens of the packed items")
            return self.body(x, cu_seqlens)
        return self.body(x)
