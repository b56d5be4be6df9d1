"""Every way of building a SpanMask validates it; no index is narrowed before it is checked.

Guards issue 13: the raw ``SpanMask(...)`` accepted any intervals, Python
float lists were truncated, bools passed as ints, and a bool ``rows`` tensor
was read as the indices 0 and 1.
"""

import dataclasses

import pytest
import torch

from metalm_fast import SpanMask

BIG = 2**32 + 3  # narrowed to int32 this is 3: a valid-looking index


def _i64(values):
    return torch.tensor(values, dtype=torch.int64)


# ----------------------------------------------------------------------------- raw constructor
def test_raw_constructor_keeps_a_valid_mask_and_narrows_to_int32():
    mask = SpanMask(_i64([0, 0, 2]), _i64([1, 2, 4]), 4)
    assert mask.kv_start.dtype == torch.int32 and mask.kv_end.dtype == torch.int32
    assert torch.equal(mask.to_dense(), SpanMask.from_intervals([0, 0, 2], [1, 2, 4], 4).to_dense())
    assert mask.monotone  # computed: False was only the default


@pytest.mark.parametrize(
    "start, end, num_keys, match",
    [
        ([0, 3], [2, 2], 4, r"kv_start\[1\]=3 is greater than kv_end\[1\]=2"),
        ([0, -1], [2, 2], 4, r"kv_start\[1\]=-1 is negative"),
        ([0, 0], [2, 5], 4, r"kv_end\[1\]=5 is beyond num_keys=4"),
        ([0, 0], [2, BIG], 4, rf"kv_end\[1\]={BIG} is beyond num_keys=4"),
        ([0], [1, 1], 4, "same length"),
        ([0], [1], -1, "num_keys must be a non-negative int"),
        ([0], [1], 2**31, "num_keys must be below 2\\*\\*31"),
    ],
)
def test_raw_constructor_rejects_invalid_intervals(start, end, num_keys, match):
    with pytest.raises(ValueError, match=match):
        SpanMask(_i64(start), _i64(end), num_keys)
    with pytest.raises(ValueError, match=match):  # the same checks as from_intervals
        SpanMask.from_intervals(_i64(start), _i64(end), num_keys)


def test_raw_constructor_rejects_a_false_monotone_claim():
    with pytest.raises(ValueError, match="monotone=True but"):
        SpanMask(_i64([0, 2, 1]), _i64([0, 4, 3]), 4, True)
    with pytest.raises(ValueError, match="monotone=True but"):
        SpanMask(_i64([0, 0, 0]), _i64([3, 2, 4]), 4, monotone=True)
    assert not SpanMask(_i64([0, 2, 1]), _i64([0, 4, 3]), 4).monotone
    with pytest.raises(TypeError, match="monotone must be a bool"):
        SpanMask(_i64([0]), _i64([1]), 1, 1)


@pytest.mark.parametrize(
    "num_keys, error",
    [(True, TypeError), (4.0, TypeError), ("4", TypeError), (torch.tensor(True), TypeError)],
)
def test_num_keys_must_be_a_real_int(num_keys, error):
    with pytest.raises(error, match="num_keys must be an int"):
        SpanMask(_i64([0]), _i64([1]), num_keys)
    with pytest.raises(error, match="num_keys must be an int"):
        SpanMask.from_intervals([0], [1], num_keys)


def test_replace_validates_too():
    mask = SpanMask.causal([0, 4])
    with pytest.raises(ValueError, match="beyond num_keys"):
        dataclasses.replace(mask, num_keys=2)


def test_to_device_keeps_the_mask():
    mask = SpanMask.semi_causal([0, 6], [1], [4])
    moved = mask.to("meta")
    assert moved.device.type == "meta" and moved.num_keys == 6 and moved.monotone
    back = mask.to("cpu")
    assert torch.equal(back.kv_end, mask.kv_end) and back.monotone == mask.monotone


# ----------------------------------------------------------------------------- floats and bools
@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: SpanMask.causal([0, 2.7, 5]), "cu_seqlens"),
        (lambda: SpanMask.causal([0.0, 5.0]), "cu_seqlens"),
        (lambda: SpanMask.causal([0, True, 5]), "cu_seqlens"),
        (lambda: SpanMask.causal(torch.tensor([False, True])), "cu_seqlens"),
        (lambda: SpanMask.causal([0, 5], num_tokens=5.0), "num_tokens"),
        (lambda: SpanMask.causal([0, 1], num_tokens=True), "num_tokens"),
        (lambda: SpanMask.bidirectional([0, 1.5, 3]), "cu_seqlens"),
        (lambda: SpanMask.semi_causal([0, 8], [1.9], [4]), "span_starts"),
        (lambda: SpanMask.semi_causal([0, 8], [1], [True]), "span_ends"),
        (lambda: SpanMask.prefix_lm([0, 4, 8], [1.5, 2]), "prefix_lens"),
        (lambda: SpanMask.prefix_lm([0, 4, 8], [True, False]), "prefix_lens"),
        (lambda: SpanMask.sliding_window([0, 4], True), "window"),
        (lambda: SpanMask.sliding_window([0, 4], 2.0), "window"),
        (lambda: SpanMask.from_intervals([0, 0.5], [1, 1]), "kv_start"),
        (lambda: SpanMask.from_intervals([0, 0], [True, True]), "kv_end"),
        (lambda: SpanMask([0, 0], torch.tensor([1.0, 1.0]), 2), "kv_end"),
    ],
)
def test_floats_and_bools_raise_type_error_naming_the_argument(build, name):
    with pytest.raises(TypeError, match=name):
        build()


def test_lists_of_ints_still_work():
    assert SpanMask.causal([0, 2, 5], num_tokens=5).kv_end.tolist() == [1, 2, 3, 4, 5]
    assert SpanMask.semi_causal([0, 4], [], []).monotone
    assert SpanMask.sliding_window((0, 3), torch.tensor(2)).kv_start.tolist() == [0, 0, 1]


# ----------------------------------------------------------------------------- 64-bit indices
@pytest.mark.parametrize(
    "build, match",
    [
        # num_tokens makes an unguarded build fail before allocating 2**32 positions
        (lambda: SpanMask.causal(_i64([0, BIG]), 3), "cu_seqlens must end below 2\\*\\*31"),
        (lambda: SpanMask.causal(_i64([0, 2**31]), 0), "cu_seqlens must end below 2\\*\\*31"),
        (lambda: SpanMask.causal(_i64([0, BIG, 5])), "non-decreasing"),
        (lambda: SpanMask.semi_causal([0, 8], _i64([BIG]), _i64([BIG + 1])), "inside"),
        (lambda: SpanMask.semi_causal([0, 8], _i64([1 - 2**32]), _i64([2])), "inside"),
        (lambda: SpanMask.prefix_lm([0, 8], _i64([BIG])), r"prefix_lens\[0\]"),
        (lambda: SpanMask.from_intervals(_i64([BIG]), _i64([BIG]), 8), "beyond num_keys"),
        (lambda: SpanMask.causal([0, 2**64]), "cu_seqlens"),
    ],
)
def test_indices_are_checked_in_int64_before_narrowing(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_span_tensors_on_another_device_raise():
    with pytest.raises(ValueError, match="span_starts must be on cu_seqlens's device"):
        SpanMask.semi_causal([0, 8], torch.tensor([1], device="meta"), [3])


# ----------------------------------------------------------------------------- select_queries
def test_select_queries_rejects_bool_and_float_rows():
    mask = SpanMask.causal([0, 5])
    with pytest.raises(TypeError, match=r"rows must be integer indices.*torch.nonzero"):
        mask.select_queries(torch.tensor([True, False, False, True, False]))
    with pytest.raises(TypeError, match="rows must hold ints"):
        mask.select_queries([True, False])
    with pytest.raises(TypeError, match="rows must be an integer"):
        mask.select_queries(torch.tensor([1.0, 3.0]))
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 5\)"):
        mask.select_queries(_i64([BIG]))
    picked = mask.select_queries([4, 1])
    assert picked.kv_end.tolist() == [5, 2]
