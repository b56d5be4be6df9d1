"""SpanMask constructors against brute-force definitions, and their validation."""

import pytest
import torch

from metalm_fast import SpanMask

CU = [0, 5, 5, 12, 13]  # includes a zero-length sequence and a length-1 sequence


def _doc_index(t, cu):
    return next(i for i in range(len(cu) - 1) if cu[i] <= t < cu[i + 1])


def _doc_of(t, cu):
    i = _doc_index(t, cu)
    return cu[i], cu[i + 1]


def _brute(rule, cu):
    total = cu[-1]
    dense = torch.zeros(total, total, dtype=torch.bool)
    for t in range(total):
        for j in range(total):
            dense[t, j] = rule(t, j, *_doc_of(t, cu))
    return dense


def test_causal():
    mask = SpanMask.causal(torch.tensor(CU))
    assert mask.kv_start.dtype == torch.int32 and mask.monotone
    assert torch.equal(mask.to_dense(), _brute(lambda t, j, s, e: s <= j <= t, CU))


def test_bidirectional():
    mask = SpanMask.bidirectional(CU)
    assert torch.equal(mask.to_dense(), _brute(lambda t, j, s, e: s <= j < e, CU))


def test_semi_causal():
    spans = [(1, 3), (6, 9), (12, 13)]
    mask = SpanMask.semi_causal(CU, [a for a, _ in spans], [b for _, b in spans])

    def rule(t, j, s, e):
        span_end = next((b for a, b in spans if a <= t < b), 0)
        return s <= j < max(t + 1, span_end)

    assert torch.equal(mask.to_dense(), _brute(rule, CU))
    assert mask.monotone


def test_semi_causal_unsorted_spans_equal_sorted():
    a = SpanMask.semi_causal(CU, [6, 1], [9, 3])
    b = SpanMask.semi_causal(CU, [1, 6], [3, 9])
    assert torch.equal(a.kv_end, b.kv_end)


def test_prefix_lm():
    prefix = [2, 0, 4, 1]
    mask = SpanMask.prefix_lm(CU, prefix)

    def rule(t, j, s, e):
        return s <= j < max(t + 1, s + prefix[_doc_index(t, CU)])

    assert torch.equal(mask.to_dense(), _brute(rule, CU))


@pytest.mark.parametrize("window", [1, 2, 4, 100])
def test_sliding_window(window):
    mask = SpanMask.sliding_window(CU, window)
    assert torch.equal(
        mask.to_dense(), _brute(lambda t, j, s, e: max(s, t - window + 1) <= j <= t, CU)
    )


def test_from_intervals_and_num_pairs():
    mask = SpanMask.from_intervals([0, 2, 1], [0, 4, 3], num_keys=4)
    assert mask.num_keys == 4 and mask.num_queries == 3
    assert mask.num_pairs() == 4
    assert mask.to_dense().sum() == 4
    assert not mask.monotone


def test_select_queries_keeps_their_intervals_and_the_keys():
    mask = SpanMask.semi_causal([0, 10, 16], [2], [6])
    rows = torch.tensor([9, 3, 15])
    picked = mask.select_queries(rows)
    assert picked.num_queries == 3 and picked.num_keys == 16
    assert torch.equal(picked.to_dense(), mask.to_dense()[rows])
    for bad in ([16], [-1]):
        with pytest.raises(ValueError, match=r"rows must lie in \[0, 16\)"):
            mask.select_queries(torch.tensor(bad))
    with pytest.raises(ValueError, match="rows must be 1-D"):
        mask.select_queries(torch.tensor([[1]]))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: SpanMask.causal([1, 4]), "cu_seqlens must start at 0"),
        (lambda: SpanMask.causal([0, 4, 3, 6]), "cu_seqlens must be non-decreasing"),
        (lambda: SpanMask.causal([0, 4], num_tokens=5), "cu_seqlens must end at"),
        (lambda: SpanMask.causal([[0, 4]]), "cu_seqlens must be 1-D"),
        (lambda: SpanMask.causal(torch.tensor([0.0, 4.0])), "cu_seqlens must be an integer"),
        (lambda: SpanMask.semi_causal([0, 4, 8], [2], [6]), "crosses a sequence boundary"),
        (lambda: SpanMask.semi_causal([0, 8], [1, 3], [4, 6]), "spans overlap"),
        (lambda: SpanMask.semi_causal([0, 8], [5], [3]), "span_starts\\[0\\]=5 is after"),
        (lambda: SpanMask.semi_causal([0, 8], [1, 2], [3]), "same length"),
        (lambda: SpanMask.semi_causal([0, 8], [6], [9]), "spans must lie inside"),
        (lambda: SpanMask.prefix_lm([0, 4, 8], [5, 1]), "prefix_lens\\[0\\]=5"),
        (lambda: SpanMask.prefix_lm([0, 4, 8], [1]), "one entry per sequence"),
        (lambda: SpanMask.sliding_window([0, 4], 0), "window must be a positive int"),
        (lambda: SpanMask.from_intervals([0, 3], [2, 2]), "kv_start\\[1\\]=3 is greater"),
        (lambda: SpanMask.from_intervals([0, -1], [2, 2]), "kv_start\\[1\\]=-1 is negative"),
        (
            lambda: SpanMask.from_intervals([0, 0], [2, 5], 4),
            "kv_end\\[1\\]=5 is beyond num_keys=4",
        ),
        (lambda: SpanMask.from_intervals([0], [2, 2]), "same length"),
    ],
)
def test_bad_mask_inputs_raise_naming_the_argument(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()
