"""feature_index builders."""

import pytest
import torch

from metalm_fast.data.feature_index import (
    feature_index_from_placeholders,
    feature_index_from_spans,
)


def test_from_spans_numbers_positions_in_order():
    assert feature_index_from_spans(8, [5, 1], [7, 3]).tolist() == [-1, 0, 1, -1, -1, 2, 3, -1]


def test_from_spans_count_mismatch_states_both_counts():
    with pytest.raises(ValueError, match="cover 4 positions but there are 5 feature rows"):
        feature_index_from_spans(8, [1, 5], [3, 7], num_features=5)


def test_from_spans_rejects_overlap_and_out_of_range():
    with pytest.raises(ValueError, match="overlap"):
        feature_index_from_spans(8, [1, 2], [4, 5])
    with pytest.raises(ValueError, match="span_ends <= 8"):
        feature_index_from_spans(8, [6], [9])


def test_from_placeholders():
    ids = torch.tensor([3, 99, 99, 4, 99])
    assert feature_index_from_placeholders(ids, 99, 3).tolist() == [-1, 0, 1, -1, 2]
    with pytest.raises(ValueError, match="cover 3 positions but there are 2 feature rows"):
        feature_index_from_placeholders(ids, 99, 2)
