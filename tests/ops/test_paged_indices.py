"""Paged indices are range-checked in their own width: int64 never aliases after narrowing.

2**32 + 1 narrowed to int32 is 1: a block-table entry of 2**32 + 1 would read page 1,
seq_lens of 2**32 + 2 would attend 2 keys, a slot of 2**32 + 1 would write slot 1.
Every backend must treat them as what they are (outside the pool: skipped; a length
past the table: clamped), the cpu op called directly too, and validate=True names them.
The reference keeps the same out-of-range contract as the kernels.
"""

from __future__ import annotations

import pytest
import torch

from metalm_fast import kv_cache_append, paged_decode_attention, reference
from tests.paged_cases import (
    assert_matches_golden,
    paged_layout,
    random_caches,
    require_backend,
    row_golden,
)

CPU_OP = "_paged_decode_attention_cpu"
APPEND_OP = "_kv_cache_append_cpu"
BACKENDS = ["reference", "cpu", "triton"]
WRAP = 2**32


def _problem(seed=0):
    lengths = [7, 12, 3]
    num_blocks, table = paged_layout(lengths, 4, spare=2, seed=seed)
    k_cache, v_cache = random_caches(num_blocks, 4, 2, 16, torch.float32, seed)
    q = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(seed + 9))
    return q, k_cache, v_cache, table, torch.tensor(lengths, dtype=torch.int32)


def _decode(backend, q, k_cache, v_cache, table, seq_lens):
    if backend == "cpu op":  # the compiled op itself, without the op layer's narrowing
        return torch.ops.metalm._paged_decode_attention_cpu(
            q, k_cache, v_cache, table, seq_lens, 0.25
        )
    return paged_decode_attention(q, k_cache, v_cache, table, seq_lens, backend=backend)


@pytest.mark.parametrize("backend", [*BACKENDS, "cpu op"])
def test_block_table_entry_past_int32_is_outside_the_pool(backend):
    require_backend("cpu" if backend == "cpu op" else backend, CPU_OP)
    q, k_cache, v_cache, table, seq_lens = _problem()
    wide = table.to(torch.int64)
    wide[1, 1] = WRAP + int(table[1, 1])  # narrowed, it would be sequence 1's own page
    wide[0, 0] = -WRAP + int(table[0, 0])
    skipped = table.clone()
    skipped[1, 1], skipped[0, 0] = -1, -1
    out = _decode(backend, q, k_cache, v_cache, wide, seq_lens)
    expected = _decode(backend, q, k_cache, v_cache, skipped, seq_lens)
    aliased = _decode(backend, q, k_cache, v_cache, table, seq_lens)
    assert torch.equal(out, expected)
    assert not torch.allclose(out, aliased), "the pages must not be read through an alias"


@pytest.mark.parametrize("backend", [*BACKENDS, "cpu op"])
def test_seq_lens_past_int32_is_clamped_not_wrapped(backend):
    require_backend("cpu" if backend == "cpu op" else backend, CPU_OP)
    q, k_cache, v_cache, table, seq_lens = _problem(seed=1)
    capacity = table.shape[1] * k_cache.shape[1]
    wide = torch.tensor([WRAP + 2, 5, -WRAP + 3], dtype=torch.int64)
    clamped = torch.tensor([capacity, 5, 0], dtype=torch.int32)
    wrapped = torch.tensor([2, 5, 3], dtype=torch.int32)
    out = _decode(backend, q, k_cache, v_cache, table, wide)
    assert torch.equal(out, _decode(backend, q, k_cache, v_cache, table, clamped))
    assert torch.all(out[2] == 0), "a negative length attends no key"
    assert not torch.allclose(out[0], _decode(backend, q, k_cache, v_cache, table, wrapped)[0])


def test_validate_names_wide_indices():
    q, k_cache, v_cache, table, seq_lens = _problem()
    wide = table.to(torch.int64)
    wide[1, 1] = WRAP + 1
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 4294967297 is outside the pool"):
        paged_decode_attention(q, k_cache, v_cache, wide, seq_lens, validate=True)
    lengths = seq_lens.to(torch.int64)
    lengths[2] = WRAP + 2
    with pytest.raises(ValueError, match=r"seq_lens\[2\] = 4294967298 is beyond"):
        paged_decode_attention(q, k_cache, v_cache, table, lengths, validate=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pages_outside_the_pool_are_skipped_on_every_backend(backend):
    """Page -1 and page num_blocks in used entries: skipped (the reference neither reads
    the last page for -1 nor raises IndexError for num_blocks); lengths past the table
    clamped; against the per-row golden over the remaining keys."""
    require_backend(backend, CPU_OP)
    q, k_cache, v_cache, table, _ = _problem(seed=2)
    table[0, 1] = -1
    table[1, 0] = k_cache.shape[0]
    table[2, 0] = 10**6
    seq_lens = torch.tensor([7, 12, 10**6], dtype=torch.int32)
    golden = row_golden(q, k_cache, v_cache, table, seq_lens)
    baseline = reference.paged_decode_attention(q, k_cache, v_cache, table, seq_lens)
    out = paged_decode_attention(q, k_cache, v_cache, table, seq_lens, backend=backend)
    assert_matches_golden(out, golden, baseline)
    every_page_outside = table.clone()
    every_page_outside[1] = -3
    out = paged_decode_attention(q, k_cache, v_cache, every_page_outside, seq_lens, backend=backend)
    assert torch.all(out[1] == 0), "a sequence whose pages are all skipped has no key: zeros"


# ----------------------------------------------------------------------------- append
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cpu op"])
def test_slot_past_int32_is_never_written(backend):
    require_backend("cpu" if backend == "cpu op" else backend, APPEND_OP)
    k_cache, v_cache = torch.zeros(4, 4, 2, 16), torch.zeros(4, 4, 2, 16)
    k_new, v_new = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    slots = torch.tensor([WRAP + 1, 6, -WRAP + 2], dtype=torch.int64)
    if backend == "cpu op":
        torch.ops.metalm._kv_cache_append_cpu(k_cache, v_cache, k_new, v_new, slots)
    else:
        kv_cache_append(k_cache, v_cache, k_new, v_new, slots, backend=backend)
    written = torch.zeros(4, 4, dtype=torch.bool)
    written[1, 2] = True  # slot 6 only; slots 1 and 2 (the aliases) stay zero
    assert torch.equal(k_cache[1, 2], k_new[1]) and torch.equal(v_cache[1, 2], v_new[1])
    assert torch.all(k_cache[~written] == 0) and torch.all(v_cache[~written] == 0)


def test_append_validate_names_a_wide_slot():
    k_cache, v_cache = torch.zeros(4, 4, 2, 16), torch.zeros(4, 4, 2, 16)
    slots = torch.tensor([WRAP + 1], dtype=torch.int64)
    with pytest.raises(ValueError, match=r"slot_mapping\[0\] = 4294967297 is outside the pool"):
        kv_cache_append(
            k_cache, v_cache, torch.ones(1, 2, 16), torch.ones(1, 2, 16), slots, validate=True
        )
