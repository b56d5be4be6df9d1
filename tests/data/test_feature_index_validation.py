"""feature_index builders take only real integers, checked in int64 (issue 13)."""

import pytest
import torch

from metalm_fast.data.feature_index import (
    feature_index_from_placeholders,
    feature_index_from_spans,
)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: feature_index_from_spans(8, [1.7], [3]), "span_starts"),
        (lambda: feature_index_from_spans(8, [1], [True]), "span_ends"),
        (lambda: feature_index_from_spans(8, torch.tensor([1.0]), [3]), "span_starts"),
        (lambda: feature_index_from_spans(8.0, [1], [3]), "num_tokens"),
        (lambda: feature_index_from_spans(True, [0], [1]), "num_tokens"),
        (lambda: feature_index_from_spans(8, [1], [3], num_features=True), "num_features"),
        (lambda: feature_index_from_placeholders(torch.tensor([1, 1]), True, 2), "placeholder_id"),
        (lambda: feature_index_from_placeholders(torch.tensor([1, 1]), 1.0, 2), "placeholder_id"),
        (lambda: feature_index_from_placeholders(torch.tensor([1, 1]), 1, 2.0), "num_features"),
        (lambda: feature_index_from_placeholders(torch.tensor([1.0]), 1, 1), "token_ids"),
        (lambda: feature_index_from_placeholders(torch.tensor([True]), 1, 1), "token_ids"),
    ],
)
def test_floats_and_bools_raise_type_error_naming_the_argument(call, name):
    with pytest.raises(TypeError, match=name):
        call()


def test_span_positions_are_checked_in_int64():
    big = torch.tensor([2**32 + 1], dtype=torch.int64)  # 1 once narrowed to int32
    with pytest.raises(ValueError, match="span_ends <= 8"):
        feature_index_from_spans(8, big, big + 2)
    with pytest.raises(ValueError, match="num_tokens must be >= 0"):
        feature_index_from_spans(-1, [], [])
    assert feature_index_from_spans(3, [], []).tolist() == [-1, -1, -1]


def test_placeholder_beyond_the_id_dtype_matches_nothing():
    ids = torch.tensor([3, 7, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="cover 0 positions but there are 2 feature rows"):
        feature_index_from_placeholders(ids, 2**32 + 3, 2)
    assert feature_index_from_placeholders(ids, 2**32 + 3, 0).tolist() == [-1, -1, -1]
    assert feature_index_from_placeholders(ids, 3, 2).tolist() == [0, -1, 1]
