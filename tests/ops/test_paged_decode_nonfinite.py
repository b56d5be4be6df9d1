"""paged_decode_attention with NaN and inf in q, k and v: each reaches exactly its rows.

The golden (tests/paged_cases.row_golden) computes every (sequence, query head) row
on its own in float64 over exactly its allowed keys; every backend must put NaN and
inf where it does, and meet the tolerance rule elsewhere. Values are placed in cache
rows of a sequence, past seq_lens in its last page, in other sequences' pages, in
free pages, and in q (rows with keys and an empty row).
"""

from __future__ import annotations

import math

import pytest
import torch

from metalm_fast import paged_decode_attention, reference
from tests.paged_cases import (
    assert_matches_golden,
    paged_layout,
    random_caches,
    require_backend,
    row_golden,
)

CPU_OP = "_paged_decode_attention_cpu"
BLOCK = 4
LENGTHS = [6, 9, 4, 1, 0]  # a partly filled last page, a full one, one key, no key
HEADS, KV_HEADS, DIM = 4, 2, 16  # two query heads per kv head
NAN, INF = math.nan, math.inf


def _problem(dtype, contiguous, lengths=LENGTHS, seed=21):
    num_blocks, table = paged_layout(lengths, BLOCK, spare=2, seed=seed, contiguous=contiguous)
    k_cache, v_cache = random_caches(num_blocks, BLOCK, KV_HEADS, DIM, torch.float64, seed)
    q = torch.randn(len(lengths), HEADS, DIM, generator=torch.Generator().manual_seed(seed + 5))
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    return q.double(), k_cache, v_cache, table, seq_lens


def _row(table, b, p):
    """(page, offset) of key p of sequence b."""
    return int(table[b, p // BLOCK]), p % BLOCK


def _used_pages(table, lengths):
    return {int(table[b, i]) for b, n in enumerate(lengths) for i in range(math.ceil(n / BLOCK))}


# Each case edits (q, k_cache, v_cache) in place, given the block table.
def _k_in_sequence(value):
    def place(q, k, v, table):
        k[_row(table, 0, 2)][1, 3] = value  # sequence 0, kv head 1: query heads 2, 3

    return place


def _v_in_sequence(value):
    def place(q, k, v, table):
        v[_row(table, 1, 8)][0, 5] = value  # sequence 1's last key, kv head 0, column 5

    return place


def _past_seq_len(q, k, v, table):
    for b, length in enumerate(LENGTHS):  # the rest of every last page, never a key
        for p in range(length, math.ceil(length / BLOCK) * BLOCK):
            k[_row(table, b, p)] = NAN
            v[_row(table, b, p)] = INF


def _other_sequence_pages(q, k, v, table):
    for i in range(math.ceil(LENGTHS[1] / BLOCK)):  # all of sequence 1: only its rows
        k[int(table[1, i])] = NAN
        v[int(table[1, i])] = NAN


def _free_pages(q, k, v, table):
    free = sorted(set(range(k.shape[0])) - _used_pages(table, LENGTHS))
    assert free
    k[free] = NAN
    v[free] = -INF


def _q_value(value):
    def place(q, k, v, table):
        q[2, 1, 0] = value  # one row of sequence 2

    return place


def _q_in_empty_row(q, k, v, table):
    q[4] = NAN  # sequence 4 has no key: its rows stay exact zeros


def _all_scores_neg_inf(q, k, v, table):
    # Sequence 3's one key and sequence 2's four keys score -inf for kv head 0's query
    # heads (q > 0 times -inf in column 0): softmax over -inf only is NaN.
    q[2:4, 0:2, 0] = 1.0
    for b in (2, 3):
        for p in range(LENGTHS[b]):
            k[_row(table, b, p)][0, 0] = -INF


def _one_score_neg_inf(q, k, v, table):
    q[1, 0:2, 0] = 1.0  # one key of sequence 1 scores -inf: weight 0, the row is finite
    k[_row(table, 1, 4)][0, 0] = -INF


CASES = {
    "k nan in a sequence": _k_in_sequence(NAN),
    "k +inf in a sequence": _k_in_sequence(INF),
    "k -inf in a sequence": _k_in_sequence(-INF),
    "v nan in a sequence": _v_in_sequence(NAN),
    "v +inf in a sequence": _v_in_sequence(INF),
    "past seq_lens in the last page": _past_seq_len,
    "another sequence's pages": _other_sequence_pages,
    "free pages": _free_pages,
    "q nan": _q_value(NAN),
    "q inf": _q_value(INF),
    "q nan in an empty row": _q_in_empty_row,
    "every score -inf": _all_scores_neg_inf,
    "one score -inf": _one_score_neg_inf,
}


def _run_case(backend, place, dtype, contiguous):
    q, k_cache, v_cache, table, seq_lens = _problem(dtype, contiguous)
    place(q, k_cache, v_cache, table)
    golden = row_golden(q, k_cache, v_cache, table, seq_lens)
    q, k_cache, v_cache = q.to(dtype), k_cache.to(dtype), v_cache.to(dtype)
    baseline = reference.paged_decode_attention(q, k_cache, v_cache, table, seq_lens)
    out = paged_decode_attention(q, k_cache, v_cache, table, seq_lens, backend=backend)
    assert_matches_golden(out, golden, baseline)
    assert torch.all(out[seq_lens == 0] == 0), "a row with no key must be exact zeros"
    return golden


def test_cases_are_not_vacuous():
    """Every case that should reach a row does (NaN or inf in the golden), and the
    masked placements leave every row finite."""
    contaminating = {name for name in CASES if "seq_lens" not in name and "free" not in name}
    contaminating -= {"q nan in an empty row", "one score -inf"}
    for name, place in CASES.items():
        golden = _run_case("reference", place, torch.float64, contiguous=False)
        assert bool(torch.isfinite(golden).all()) != (name in contaminating), name


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    "backend, dtype, contiguous",
    [
        ("reference", torch.float32, False),
        ("cpu", torch.float32, False),  # the tile step
        ("cpu", torch.float32, True),  # the register-resident step (pages in order)
        ("cpu", torch.float64, False),  # the double step
        ("cpu", torch.float16, True),  # staged rows
        ("triton", torch.float32, False),
    ],
)
def test_non_finite_reaches_exactly_its_rows(backend, dtype, contiguous, case):
    require_backend(backend, CPU_OP)
    _run_case(backend, CASES[case], dtype, contiguous)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("contiguous", [False, True])
def test_a_first_tile_of_neg_inf_scores(backend, contiguous):
    """The first 32 keys (the cpu kernel's first tile) all score -inf, the last 8 are
    finite: the row is the softmax of the finite ones (exp(-inf - -inf) must not arise)."""
    require_backend(backend, CPU_OP)
    lengths = [40, 3]
    q, k_cache, v_cache, table, seq_lens = _problem(torch.float32, contiguous, lengths, seed=3)
    q[0, 0:2, 0] = 1.0
    for p in range(32):
        k_cache[_row(table, 0, p)][0, 0] = -INF
    golden = row_golden(q, k_cache, v_cache, table, seq_lens)
    assert bool(torch.isfinite(golden).all())
    q, k_cache, v_cache = q.float(), k_cache.float(), v_cache.float()
    baseline = reference.paged_decode_attention(q, k_cache, v_cache, table, seq_lens)
    out = paged_decode_attention(q, k_cache, v_cache, table, seq_lens, backend=backend)
    assert_matches_golden(out, golden, baseline)


# ----------------------------------------------------------------------------- splits
def _split_problem(length, seed):
    num_blocks, table = paged_layout([length, 5], 16, spare=2, seed=seed)
    k_cache, v_cache = random_caches(num_blocks, 16, KV_HEADS, 64, torch.float32, seed)
    q = torch.randn(2, HEADS, 64, generator=torch.Generator().manual_seed(seed))
    return q, k_cache, v_cache, table, torch.tensor([length, 5], dtype=torch.int32)


def _split_cases(split_keys, length):
    """(name, edit) pairs for a sequence of ``length`` keys split every ``split_keys``."""

    def key_rows(table, first, last):
        return [(int(table[0, p // 16]), p % 16) for p in range(first, last)]

    def nan_key(q, k, v, table):  # a NaN score in the third split: its l is NaN
        k[key_rows(table, 2 * split_keys + 5, 2 * split_keys + 6)[0]][0, 1] = NAN

    def nan_value(q, k, v, table):
        v[key_rows(table, split_keys + 1, split_keys + 2)[0]][1, 7] = NAN

    def one_split_neg_inf(q, k, v, table):  # the second split scores -inf: weight 0
        q[0, 0:2, 0] = 1.0
        for row in key_rows(table, split_keys, 2 * split_keys):
            k[row][0, 0] = -INF

    def every_split_neg_inf(q, k, v, table):  # the whole row scores -inf: NaN
        q[0, 0:2, 0] = 1.0
        for row in key_rows(table, 0, length):
            k[row][0, 0] = -INF

    return {
        "nan score": nan_key,
        "nan value": nan_value,
        "one split -inf": one_split_neg_inf,
        "every split -inf": every_split_neg_inf,
    }


def _check_split_case(run, place, length, seed):
    q, k_cache, v_cache, table, seq_lens = _split_problem(length, seed)
    place(q, k_cache, v_cache, table)
    golden = row_golden(q, k_cache, v_cache, table, seq_lens)
    baseline = reference.paged_decode_attention(q, k_cache, v_cache, table, seq_lens)
    assert_matches_golden(run(q, k_cache, v_cache, table, seq_lens), golden, baseline)


@pytest.mark.parametrize("case", list(_split_cases(512, 2048)))
def test_cpu_splits_keep_non_finite(case):
    """2048 keys on two threads: 4 splits of 512 merged; a split whose l is NaN must not
    be dropped, one whose scores are all -inf weighs 0 (NaN if all are)."""
    require_backend("cpu", CPU_OP)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_split_case(
            lambda *args: paged_decode_attention(*args, backend="cpu"),
            _split_cases(512, 2048)[case],
            length=2048,
            seed=31,
        )
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("case", list(_split_cases(64, 256)))
def test_triton_splits_keep_non_finite(case):
    """256 keys in 4 forced splits of 64 and the merge kernel (interpreter)."""
    require_backend("triton", CPU_OP)
    from metalm_fast.kernels.paged_decode_attention import paged_decode_attention_forward

    def run(q, k_cache, v_cache, table, seq_lens):
        scale = 1.0 / math.sqrt(q.shape[-1])
        return paged_decode_attention_forward(
            q, k_cache, v_cache, table, seq_lens, scale, num_splits=4
        )

    _check_split_case(run, _split_cases(64, 256)[case], length=256, seed=32)
