"""Reference embed_scatter: token embeddings with encoder features scattered in."""

from __future__ import annotations

import torch

__all__ = ["check_rows_in_range", "embed_scatter"]


def check_rows_in_range(token_ids, feature_index, num_embeddings: int, num_features: int) -> None:
    """The rows embed_scatter reads exist; every backend shares this contract.

    Raise RuntimeError, as the cpu kernel does, at the first position whose row is
    out of range: an id outside [0, V) at a token position, or a feature row >= F.

    Plain indexing would be looser: ``weight[-1]`` is the last row (Python's
    negative indexing). Compared in int64, so no id aliases another.
    """
    ids, rows = token_ids.to(torch.int64), feature_index.to(torch.int64)
    is_token = rows < 0
    bad = torch.where(is_token, (ids < 0) | (ids >= num_embeddings), rows >= num_features)
    if not bool(bad.any()):
        return
    t = int(torch.nonzero(bad)[0, 0])
    if bool(is_token[t]):
        raise RuntimeError(
            f"embed_scatter: token_ids[{t}]={int(ids[t])} is out of range for "
            f"{num_embeddings} embeddings"
        )
    raise RuntimeError(
        f"embed_scatter: feature_index[{t}]={int(rows[t])} is out of range for "
        f"{num_features} feature rows"
    )


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
    read. An id outside ``[0, V)`` at a token position, or a feature row
    ``>= F``, raises RuntimeError naming the position, as the cpu backend does
    (never Python's negative indexing). Autograd gives the reference gradients
    (weight rows of unused ids are 0).
    """
    check_rows_in_range(token_ids, feature_index, weight.shape[0], features.shape[0])
    is_feature = feature_index >= 0
    safe_ids = torch.where(is_feature, torch.zeros_like(token_ids), token_ids)
    safe_rows = torch.where(is_feature, feature_index, torch.zeros_like(feature_index))
    if weight.shape[0] == 0:  # every position is a feature (checked above): no row is read
        embedded = weight.new_zeros((token_ids.shape[0], weight.shape[1])) * scale
    else:
        embedded = weight[safe_ids] * scale
    if features.shape[0] == 0:
        return embedded
    scattered = features[safe_rows].to(embedded.dtype)
    return torch.where(is_feature[:, None], scattered, embedded)
