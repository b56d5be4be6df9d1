"""Build ``feature_index`` (for embed_scatter) from a batch description.

Two ways a batch says where encoder features go:

- spans given as packed offsets ``[span_starts[i], span_ends[i])`` (semi-causal
  training: span tokens go through the encoder, row for row);
- a placeholder token id (vision-language prompts: ``<image>`` tokens stand
  where the connector's rows go).

Feature rows are assigned in increasing position order, which is the order the
encoder (and connector) emit them when items are packed in position order.
"""

from __future__ import annotations

import torch

from metalm_fast.checks import index_vector, integer

__all__ = ["feature_index_from_spans", "feature_index_from_placeholders"]


def _check_count(positions: int, num_features: int | None, what: str) -> None:
    if num_features is not None and positions != num_features:
        raise ValueError(
            f"{what} cover {positions} positions but there are {num_features} feature rows; "
            "they must be equal"
        )


def feature_index_from_spans(
    num_tokens: int, span_starts, span_ends, num_features: int | None = None
) -> torch.Tensor:
    """int64 [T]: row ``r`` at the r-th covered position (in position order), -1 elsewhere.

    Spans must lie in ``[0, num_tokens]`` and must not overlap. ``num_features``,
    if given, must equal the number of covered positions.

    >>> feature_index_from_spans(6, [1, 4], [3, 5]).tolist()
    [-1, 0, 1, -1, 2, -1]
    """
    num_tokens = integer(num_tokens, "num_tokens")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if num_features is not None:
        num_features = integer(num_features, "num_features")
    starts = index_vector(span_starts, "span_starts")
    ends = index_vector(span_ends, "span_ends")
    if starts.shape != ends.shape:
        raise ValueError(
            f"span_starts and span_ends must have the same length, got {starts.numel()} "
            f"and {ends.numel()}"
        )
    if bool((starts > ends).any()) or bool((starts < 0).any()) or bool((ends > num_tokens).any()):
        raise ValueError(f"spans must satisfy 0 <= span_starts <= span_ends <= {num_tokens}")
    coverage = torch.zeros(num_tokens + 1, dtype=torch.int64)
    coverage.index_add_(0, starts, torch.ones_like(starts))
    coverage.index_add_(0, ends, -torch.ones_like(ends))
    covered = coverage.cumsum(0)[:num_tokens]
    if bool((covered > 1).any()):
        raise ValueError("spans overlap (span_starts, span_ends)")
    is_feature = covered == 1
    _check_count(int(is_feature.sum()), num_features, "spans")
    return _number_positions(is_feature)


def feature_index_from_placeholders(
    token_ids: torch.Tensor, placeholder_id: int, num_features: int
) -> torch.Tensor:
    """int64 [T]: row ``r`` at the r-th ``placeholder_id`` token, -1 elsewhere.

    Raises ValueError, stating both counts, when the number of placeholder
    tokens differs from ``num_features``. ``token_ids`` must be an integer
    tensor and ``placeholder_id`` an int (not a bool); an id the dtype of
    ``token_ids`` cannot hold matches nothing (comparing would wrap it:
    2**32 + 3 equals 3 in int32).
    """
    placeholder_id = integer(placeholder_id, "placeholder_id")
    num_features = integer(num_features, "num_features")
    if not isinstance(token_ids, torch.Tensor) or token_ids.dtype not in (
        torch.int32,
        torch.int64,
    ):
        found = token_ids.dtype if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
        raise TypeError(f"token_ids must be an int32 or int64 tensor, got {found}")
    limits = torch.iinfo(token_ids.dtype)
    if limits.min <= placeholder_id <= limits.max:
        is_feature = token_ids == placeholder_id
    else:
        is_feature = torch.zeros_like(token_ids, dtype=torch.bool)
    _check_count(int(is_feature.sum()), num_features, f"placeholder tokens (id {placeholder_id})")
    return _number_positions(is_feature)


def _number_positions(is_feature: torch.Tensor) -> torch.Tensor:
    rows = torch.cumsum(is_feature.to(torch.int64), 0) - 1
    return torch.where(is_feature, rows, torch.full_like(rows, -1))
