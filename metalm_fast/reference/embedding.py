"""Reference embed_scatter: token embeddings with encoder features scattered in."""

from __future__ import annotations

import torch

__all__ = ["embed_scatter"]


def embed_scatter(
    token_ids: torch.Tensor,
    weight: torch.Tensor,
    features: torch.Tensor,
    feature_index: torch.Tensor,
    *,
    scale: float = 1.0,
) -> torch.Tensor:
    """Token embeddings with encoder features scattered in, in ``weight.dtype``.

    ``out[t] = weight[token_ids[t]] * scale`` where ``feature_index[t] < 0``, else
    ``features[feature_index[t]]``. Token ids at feature positions are never
    read. Autograd gives the reference gradients (weight rows of unused ids are 0).
    """
    is_feature = feature_index >= 0
    safe_ids = torch.where(is_feature, torch.zeros_like(token_ids), token_ids)
    safe_rows = torch.where(is_feature, feature_index, torch.zeros_like(feature_index))
    embedded = weight[safe_ids] * scale
    if features.shape[0] == 0:
        return embedded
    scattered = features[safe_rows].to(embedded.dtype)
    return torch.where(is_feature[:, None], scattered, embedded)
