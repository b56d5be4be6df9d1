"""EmbeddingScatter: what a MetaLM decoder uses in place of nn.Embedding + masked_scatter."""

from __future__ import annotations

import torch
from torch import nn

from metalm_fast.ops.embed_scatter import embed_scatter

__all__ = ["EmbeddingScatter"]


class EmbeddingScatter(nn.Module):
    """Token embedding table whose lookup also scatters encoder features in.

    Parameters
    ----------
    num_embeddings : V.
    dim : Dm.
    padding_idx : as in ``nn.Embedding`` (that row starts at zero and gets no gradient).
    scale : multiplies token embeddings (not features), e.g. ``sqrt(Dm)``.
    backend : embed_scatter backend ("auto" by default).

    ``forward(token_ids [T], features [F, Dm] | None, feature_index [T] | None) -> [T, Dm]``;
    without features it is a plain (scaled) embedding lookup. The weight can be
    tied to a decoder's output projection (``lm_head.weight = embedding.weight``).
    """

    def __init__(
        self,
        num_embeddings: int,
        dim: int,
        padding_idx: int | None = None,
        *,
        scale: float = 1.0,
        backend: str = "auto",
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        # isinstance(True, int) holds: a bool size or padding_idx=True (row 1) must not pass.
        for name, value in (("num_embeddings", num_embeddings), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TypeError(f"{name} must be a non-negative int, got {value!r}")
        if padding_idx is not None and (
            isinstance(padding_idx, bool) or not isinstance(padding_idx, int)
        ):
            raise TypeError(f"padding_idx must be an int or None, got {padding_idx!r}")
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(
                f"padding_idx must lie in [-{num_embeddings}, {num_embeddings}), got {padding_idx}"
            )
        self.num_embeddings, self.dim = num_embeddings, dim
        self.padding_idx, self.scale, self.backend = padding_idx, scale, backend
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.dim**-0.5)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].zero_()

    def forward(
        self,
        token_ids: torch.Tensor,
        features: torch.Tensor | None = None,
        feature_index: torch.Tensor | None = None,
        *,
        validate: bool = False,
    ) -> torch.Tensor:
        if (features is None) != (feature_index is None):
            raise ValueError("features and feature_index must be given together")
        if features is None:
            features = self.weight.new_empty((0, self.dim))
            feature_index = torch.full_like(token_ids, -1)
        return embed_scatter(
            token_ids,
            self.weight,
            features.to(self.weight.dtype),
            feature_index,
            scale=self.scale,
            padding_idx=self.padding_idx,
            validate=validate,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.dim}, padding_idx={self.padding_idx}, scale={self.scale}"
        )
